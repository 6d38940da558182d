"""The language side: LLaMA / Vicuna with MMFS layers (paper §3.2, reference §3), KV cache, tokenizer, generation.

Read top-down: the config, the building blocks (RMSNorm, rotary embedding, attention, MLP, the MMFS cross-attention
block), the decoder layer and `LLaMA` with `from_pretrained`, then what the whole model (model.py) needs around it:
the §3.4 image-visibility mask, visual-token insertion, the §3.3 text head for a frozen LLM, the sentencepiece
`Tokenizer` and `generate`.

Module names equal the Hugging Face LLaMA keys (`model.layers.{i}.self_attn.q_proj`, ...), and the MMFS block of a
layer is `model.layers.{i}.llama_cross_attn` = {`gate`, `norm1`, `norm2`, `attn` (the mmfs.MMFS)} as in the authors'
code, so their optimiser groups (`llama_cross_attn.gate`, `llama_cross_attn`, `sampling_offsets`) match by substring.
The learnable `<BoI>` vector (`soi_token`) belongs to the whole model (model.py), as in the authors' code; it is
passed to `insert_visual_tokens`.
"""
import re
from dataclasses import dataclass, replace
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import weights
from mmfs import MMFS


@dataclass
class LLaMAConfig:
    vocab_size: int = 32002  # embedding rows: the sentencepiece vocabulary + <BoI> + <image>
    dim: int = 5120
    n_layers: int = 40
    n_heads: int = 40
    n_kv_heads: int = 40  # < n_heads: grouped-query attention (each key/value head serves n_heads/n_kv_heads)
    head_dim: int = 0  # 0 = dim // n_heads
    ffn_dim: int = 13824  # SwiGLU hidden width
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048  # rotary table length; longer sequences are an error
    tie_embeddings: bool = False  # lm_head shares embed_tokens' weight (HF tie_word_embeddings)
    # MMFS blocks (reference §1.6, §3.1): in layers f, f+k, f+2k, ... for mmfs_first = f, mmfs_every = k; k = 0: none
    mmfs_every: int = 4
    # the first layer with an MMFS block (then every mmfs_every-th): 0 as the paper. A later start gives each block a
    # query that has already read the visual tokens through more self-attention (EXPERIMENTS.md: "Where the LLM reads")
    mmfs_first: int = 0
    image_dim: int = 1024  # channels of the image feature pyramid (MMFS values)
    mmfs_levels: tuple = (32, 16, 8)  # square map sizes of the pyramid levels MMFS reads, largest first
    mmfs_base: int = 16  # offsets are in cells of a base × base grid
    mmfs_heads: int = 16
    mmfs_points: int = 8
    mmfs_offset_init: float = 3.0  # initial offsets ~ U(±3) cells
    max_images: int = 50  # relative-index table size: a token may see at most max_images - 1 images

    def __post_init__(self):
        self.mmfs_levels = tuple(self.mmfs_levels)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LLaMAConfig: n_heads = {self.n_heads} is not a multiple of "
                             f"n_kv_heads = {self.n_kv_heads}")

    @property
    def d_head(self):
        return self.head_dim or self.dim // self.n_heads

    def has_mmfs(self, layer):
        return self.mmfs_every > 0 and layer >= self.mmfs_first and (layer - self.mmfs_first) % self.mmfs_every == 0


PRESETS = {
    "tiny": LLaMAConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=128,
                        mmfs_every=1, image_dim=16, mmfs_levels=(4, 2), mmfs_base=4, mmfs_heads=2, mmfs_points=2,
                        mmfs_offset_init=1.0, max_images=8),
    # train.py --small on ShapeStories: 512 sentencepiece pieces (Tokenizer.train) + <BoI>, <image>
    "small": LLaMAConfig(vocab_size=514, dim=256, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=704, max_seq_len=1024,
                         mmfs_every=2, image_dim=128, mmfs_levels=(16, 8, 4), mmfs_base=8, mmfs_heads=4, mmfs_points=4,
                         max_images=16),
    "paper": LLaMAConfig(),  # Vicuna-13B v1.3 + the MM-Interleaved MMFS settings
    "vicuna-7b": LLaMAConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008),
}


# ----------------------------------------------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    """x / rms(x) · w, computed in float32 (as HF LLaMA)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(head_dim, max_len, theta):
    """cos, sin (max_len, head_dim) for rotary embedding in HF's half-split layout: angle_i repeated twice."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
    angles = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]           # (max_len, hd/2)
    angles = torch.cat([angles, angles], dim=-1)                                               # (max_len, hd)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+hd/2}) by angle_i: HF's rotate_half form, so q/k weights load unpermuted."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Causal multi-head (or grouped-query) self-attention with rotary positions and an optional KV cache."""

    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.d_head, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.d_head, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.d_head, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.d_head, cfg.dim, bias=False)

    def forward(self, x, cos, sin, kv=None, start_pos=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:  # write the new keys/values into the preallocated cache
            cache_k, cache_v = kv
            cache_k[:, :, start_pos:start_pos + T] = k
            cache_v[:, :, start_pos:start_pos + T] = v
            if start_pos > 0:  # and attend to everything so far
                k, v = cache_k[:, :, :start_pos + T], cache_v[:, :, :start_pos + T]       # (B, Hkv, S, hd)
        S = k.shape[2]
        mask, causal = None, False
        if T == S:
            causal = T > 1
        elif T > 1:  # a chunk after a cached prefix: token i sees keys 0 .. S - T + i
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)           # (T, S)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)     # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))                            # (B, T, H·hd) -> (B, T, C)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) · up(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class CrossAttention(nn.Module):
    """The LLM's MMFS block (reference §3.1): tanh(gate) · MMFS(RMSNorm(h), RMSNorm(image features), visibility)."""

    def __init__(self, cfg):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(1))  # tanh(0) = 0: the block starts as the identity on the LLM
        self.norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.norm2 = RMSNorm(cfg.image_dim, cfg.norm_eps)
        ratio = (cfg.image_dim + 0.5) / cfg.dim  # MMFS's value width int(dim · ratio) = image_dim, rounding-proof
        self.attn = MMFS(cfg.dim, len(cfg.mmfs_levels), cfg.mmfs_heads, cfg.mmfs_points, list(cfg.mmfs_levels),
                         cfg.mmfs_base, d_value=cfg.image_dim, ratio=ratio,
                         offset_init_magnitude=cfg.mmfs_offset_init, max_num_image_per_seq=cfg.max_images)

    def reset_parameters(self, std=0.02):
        """§1.6: the HF init N(0, std) on the two linears MMFS leaves alone, then MMFS's own init; gate 0."""
        nn.init.zeros_(self.gate)
        nn.init.ones_(self.norm1.weight)
        nn.init.ones_(self.norm2.weight)
        nn.init.normal_(self.attn.attention_weights.weight, std=std)
        nn.init.normal_(self.attn.dynamic_offset_mask.weight, std=std)
        self.attn.reset_parameters()

    def forward(self, h, images, image_mask, memo=None):
        ref = h.new_full((1, 1, 2), 0.5)  # every token looks around the image centre (x, y) = (0.5, 0.5)
        if memo is None:
            return torch.tanh(self.gate) * self.attn(self.norm1(h), ref, self.norm2(images), image_mask)
        # cached decoding: project the image features once per `images` tensor, not once per new token
        if memo.get("images") is not images or memo.get("version") != images._version:  # new or edited in place
            memo.update(images=images, version=images._version, values=self.attn.value_proj(self.norm2(images)))
        return torch.tanh(self.gate) * self.attn(self.norm1(h), ref, memo["values"], image_mask, value_projected=True)


class DecoderLayer(nn.Module):
    """Pre-norm LLaMA layer; an MMFS block, when present, sits between self-attention and the MLP."""

    def __init__(self, cfg, mmfs):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.llama_cross_attn = CrossAttention(cfg) if mmfs else None
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, h, cos, sin, images=None, image_mask=None, kv=None, start_pos=0, memo=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, kv, start_pos)
        if self.llama_cross_attn is not None and images is not None:
            h = h + self.llama_cross_attn(h, images, image_mask, memo)
        return h + self.mlp(self.post_attention_layernorm(h))


class KVCache:
    """Preallocated keys and values of every layer: (B, n_kv_heads, max_len, head_dim) each, written in place;
    plus, per layer, the MMFS value projection of the last `images` tensor seen (by identity and version)."""

    def __init__(self, cfg, batch, max_len, dtype=torch.float32, device="cpu"):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.d_head)
        self.max_len = max_len
        self.layers = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                       for _ in range(cfg.n_layers)]
        self.mmfs = [{} for _ in range(cfg.n_layers)]


# ----------------------------------------------------------------------------------------------------------------
# the model


class Transformer(nn.Module):
    """LlamaModel: embeddings, decoder layers, final norm (the HF `model.` prefix)."""

    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, cfg.has_mmfs(i)) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class LLaMA(nn.Module):
    """LlamaForCausalLM with MMFS blocks: tokens or embeddings (+ image pyramids) -> logits and final hidden states."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.grad_checkpointing = False  # recompute each layer in backward (the authors checkpoint per layer)
        self._init_buffers()
        if self.model.norm.weight.device.type != "meta":
            self.init_weights()

    def _init_buffers(self):
        """Rotary tables are derived, not stored: recompute after building on the meta device."""
        cos, sin = rope_tables(self.cfg.d_head, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.register_buffer("rope_cos", cos.to(self.lm_head.weight.device), persistent=False)
        self.register_buffer("rope_sin", sin.to(self.lm_head.weight.device), persistent=False)

    def init_weights(self, std=0.02):
        """HF LLaMA init (linears and embeddings N(0, std), norms 1), then each MMFS block's init (§1.6)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        for m in self.modules():
            if isinstance(m, CrossAttention):
                m.reset_parameters(std)

    @property
    def dtype(self):
        return self.lm_head.weight.dtype

    def new_cache(self, batch, max_len=None):
        return KVCache(self.cfg, batch, max_len or self.cfg.max_seq_len, self.dtype, self.lm_head.weight.device)

    def check_vocab(self, tokenizer):
        """A tokenizer whose ids do not fit the embedding is an error, not a silent index crash."""
        if tokenizer.n_vocab != self.cfg.vocab_size:
            raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.n_vocab} ids (sentencepiece + <BoI>, "
                             f"<image>) but the model's vocab_size is {self.cfg.vocab_size}")

    def hidden(self, tokens=None, inputs_embeds=None, images=None, image_mask=None, cache=None, start_pos=0):
        """Final-normed last hidden states (B, T, dim): the text head's input and the image decoder's context.

        `images` (B, n, Σ H_l·W_l, image_dim) are the pyramids (levels concatenated, row-major) of each row's image
        slots and `image_mask` (B, T, n) their §3.4 visibility for the T tokens processed; only MMFS blocks read
        them (a model without, e.g. --no-mmfs, ignores them). With a cache, tokens go at positions start_pos...
        """
        if (tokens is None) == (inputs_embeds is None):
            raise ValueError("LLaMA: pass exactly one of tokens (B, T) and inputs_embeds (B, T, dim)")
        if tokens is not None:
            if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.vocab_size):
                raise ValueError(f"LLaMA: token ids must lie in [0, {self.cfg.vocab_size}), got "
                                 f"[{int(tokens.min())}, {int(tokens.max())}]")
            inputs_embeds = self.model.embed_tokens(tokens)                                  # (B, T, C)
        B, T, _ = inputs_embeds.shape
        end = start_pos + T
        if end > self.cfg.max_seq_len:
            raise ValueError(f"LLaMA: sequence of {end} tokens is longer than max_seq_len = {self.cfg.max_seq_len}")
        if cache is None and start_pos:
            raise ValueError(f"LLaMA: start_pos = {start_pos} needs the KV cache of the tokens before it")
        if cache is not None and end > cache.max_len:
            raise ValueError(f"LLaMA: sequence of {end} tokens does not fit the KV cache of {cache.max_len}")
        if images is not None:
            n = images.shape[1]
            if image_mask is None or tuple(image_mask.shape) != (B, T, n):
                got = None if image_mask is None else tuple(image_mask.shape)
                raise ValueError(f"LLaMA: with images (B, n={n}, S, C) image_mask must be (B, T, n) = {(B, T, n)} "
                                 f"for the tokens being processed, got {got}")
        cos = self.rope_cos[start_pos:end].to(inputs_embeds.dtype)                           # (T, hd)
        sin = self.rope_sin[start_pos:end].to(inputs_embeds.dtype)                           # (T, hd)
        h = inputs_embeds
        for i, layer in enumerate(self.model.layers):
            kv, memo = (cache.layers[i], cache.mmfs[i]) if cache is not None else (None, None)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, images, image_mask, kv, start_pos, memo, use_reentrant=False)
            else:
                h = layer(h, cos, sin, images, image_mask, kv, start_pos, memo)
        return self.model.norm(h)

    def forward(self, tokens=None, inputs_embeds=None, images=None, image_mask=None, cache=None, start_pos=0,
                return_hidden=False):
        """Logits (B, T, vocab); with return_hidden, (logits, final-normed hidden states (B, T, dim))."""
        h = self.hidden(tokens, inputs_embeds, images, image_mask, cache, start_pos)
        logits = self.lm_head(h)
        return (logits, h) if return_hidden else logits

    def resize_vocab(self, vocab_size, std=0.02):
        """Grow the embedding and lm_head for added tokens (new rows N(0, std), as HF resize_token_embeddings)."""
        old = self.cfg.vocab_size
        if vocab_size < old:
            raise ValueError(f"LLaMA.resize_vocab: cannot shrink the vocabulary from {old} to {vocab_size}")
        with torch.no_grad():
            for mod in (self.model.embed_tokens, self.lm_head):
                w = mod.weight
                mod.weight = nn.Parameter(torch.cat([w, torch.randn(vocab_size - old, w.shape[1], dtype=w.dtype,
                                                                    device=w.device) * std]))
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.cfg = replace(self.cfg, vocab_size=vocab_size)
        self.model.embed_tokens.num_embeddings = vocab_size
        self.lm_head.out_features = vocab_size
        return self

    @staticmethod
    def config_from_hf(path, **overrides):
        """LLaMAConfig from a HF LLaMA config.json (unsupported variants are refused, not silently mis-built)."""
        hf = weights.read_json(Path(path) / "config.json")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type, act = rope.get("rope_type", rope.get("type", "default")), hf.get("hidden_act", "silu")
        bad = [k for k in ("attention_bias", "mlp_bias") if hf.get(k)]
        bad += [f"rope_type={rope_type}"] if rope_type != "default" else []
        bad += [f"hidden_act={act}"] if act != "silu" else []
        if bad:
            raise weights.WeightsError(f"{Path(path) / 'config.json'}: unsupported LLaMA variant ({', '.join(bad)})")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or 0  # keep 0 (= dim // n_heads) unless the checkpoint says otherwise
        head_dim = 0 if head_dim == hf["hidden_size"] // heads else head_dim
        cfg = dict(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                   n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
                   ffn_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                   rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                   max_seq_len=hf.get("max_position_embeddings", 2048),
                   tie_embeddings=bool(hf.get("tie_word_embeddings", False)), mmfs_every=0)
        return LLaMAConfig(**{**cfg, **overrides})

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, vocab_size=None, **overrides):
        """Load a HF LLaMA/Vicuna directory strictly into the base model, then add freshly initialised MMFS blocks.

        The checkpoint must match the plain LLaMA exactly (every key, every shape); the MMFS blocks (`mmfs_every`
        and the other MMFS fields in `overrides`; default none) are built after loading, so they are never "missing
        keys", and initialised as the authors' (§1.6). `vocab_size` grows the vocabulary for added tokens. Float
        weights are cast to `dtype` one tensor at a time, so memory stays near one copy of the weights.
        """
        cfg = cls.config_from_hf(path, **overrides)
        with torch.device("meta"):
            model = cls(replace(cfg, mmfs_every=0))
        state, _ = weights.load_state(path)
        if cfg.tie_embeddings and "model.embed_tokens.weight" in state:  # HF saves a tied head once
            state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
        weights.load_into(model, state, path, dtype)
        if cfg.tie_embeddings:  # assignment made two parameters: tie them again
            model.lm_head.weight = model.model.embed_tokens.weight
        model._init_buffers()
        model.add_mmfs(cfg)
        if vocab_size is not None:
            model.resize_vocab(vocab_size)
        return model

    def add_mmfs(self, cfg):
        """Insert initialised MMFS blocks per `cfg.mmfs_every` into a plain LLaMA (e.g. one just loaded)."""
        ref = self.lm_head.weight
        for i, layer in enumerate(self.model.layers):
            if cfg.has_mmfs(i):
                block = CrossAttention(cfg)
                block.reset_parameters()
                layer.llama_cross_attn = block.to(device=ref.device, dtype=ref.dtype)
        self.cfg = cfg
        return self


# ----------------------------------------------------------------------------------------------------------------
# around the LLM: which images a token sees, visual tokens in the sequence


def image_visibility(tokens, bos_id, boi_id, n_images, images_per_row=None):
    """Reference §3.4: token t sees image k iff bos(t) < soi_k + 1 <= t -> (B, T, n_images) bool.

    Image k of a row is the one opened by the row's k-th `<BoI>`; its placeholders start at soi_k + 1, so the `<BoI>`
    token itself does not see its image and the placeholders do. bos(t) is the last `<s>` at or before t (-1 if
    none), so packed documents never see each other's images. Only the first `images_per_row[b]` (default n_images)
    `<BoI>`s of row b open a slot, as the authors map num_image_per_seq: padded slots and images not produced (or
    cut off) stay invisible. For cached decoding pass the whole sequence so far and keep the rows of the new tokens.
    """
    B, T = tokens.shape
    pos = torch.arange(T, device=tokens.device)                                           # (T,)
    is_boi = tokens == boi_id                                                             # (B, T)
    rank = is_boi.long().cumsum(1) - 1                                                    # (B, T): k of the k-th <BoI>
    limit = n_images if images_per_row is None else torch.as_tensor(images_per_row, device=tokens.device)[:, None]
    rows, cols = (is_boi & (rank < limit) & (rank < n_images)).nonzero(as_tuple=True)
    first = torch.full((B, n_images), -1, dtype=torch.long, device=tokens.device)         # (B, n): soi_k + 1, or -1
    first[rows, rank[rows, cols]] = cols + 1
    bos = torch.where(tokens == bos_id, pos, -1).cummax(1).values                         # (B, T)
    first = first[:, None, :]                                                             # (B, 1, n)
    return (first >= 0) & (first > bos[:, :, None]) & (first <= pos[None, :, None])       # (B, T, n)


def insert_visual_tokens(embeds, tokens, visual, image_id, boi_id=None, boi_vector=None):
    """Reference §3.2: scatter visual tokens (ΣI, K, dim) into the `<image>` slots of embeds (B, T, dim), row-major,
    and add the learnable `<BoI>` vector (dim,) at every `<BoI>` position."""
    slots = tokens == image_id                                                            # (B, T)
    n_slots = int(slots.sum())
    if visual.dim() != 3 or visual.shape[0] * visual.shape[1] != n_slots or visual.shape[2] != embeds.shape[-1]:
        raise ValueError(f"insert_visual_tokens: {n_slots} <image> slots in the tokens but visual tokens of shape "
                         f"{tuple(visual.shape)} (want (n_images, K, {embeds.shape[-1]}) with n_images·K = {n_slots})")
    out = embeds.masked_scatter(slots[..., None], visual.to(embeds.dtype))               # (B, T, dim)
    if boi_vector is not None:
        out = out + (tokens == boi_id)[..., None].to(out.dtype) * boi_vector.reshape(-1)  # (B, T, dim)
    return out


class TextHead(nn.Module):
    """Reference §3.3: the frozen LLM head plus a trainable head for the added tokens, whose logits start at -5."""

    def __init__(self, dim, vocab_size, n_new=2):
        super().__init__()
        self.n_new = n_new
        self.head = nn.Linear(dim, vocab_size, bias=True)  # frozen copy of lm_head, new rows 0, their bias -100
        self.head_new = nn.Linear(dim, n_new, bias=True)  # trainable: weight 0, bias 95 -> new logits -100 + 95

    @torch.no_grad()
    def init_from(self, lm_head):
        """Copy the LLM's lm_head (its rows for the added tokens are zeroed) and freeze it."""
        self.head.weight.copy_(lm_head.weight)
        self.head.weight[-self.n_new:] = 0
        self.head.bias.zero_()
        self.head.bias[-self.n_new:] = -100.0
        nn.init.zeros_(self.head_new.weight)
        nn.init.constant_(self.head_new.bias, 95.0)
        self.head.requires_grad_(False)
        return self

    def forward(self, h):
        logits = self.head(h)                                                             # (B, T, V)
        return torch.cat([logits[..., :-self.n_new], logits[..., -self.n_new:] + self.head_new(h)], dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# tokenizer


class Tokenizer:
    """A sentencepiece model plus the added specials `<BoI>` (= sp size) and `<image>` (= sp size + 1).

    `pad_id` defaults to the model's own `<pad>` piece (our trained tokenizers reserve one) or, for models without
    one such as Vicuna's, to the last ordinary id (the authors reuse 31999). Text round-trips through encode/decode
    when the model uses identity normalisation (LLaMA's and ours do), except for the character '▁' (U+2581), which
    sentencepiece reserves for the space.
    """

    SPECIALS = ("<BoI>", "<image>")

    def __init__(self, model_path, pad_id=None):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise ValueError(f"{self.path}: sentencepiece model not found")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.path}: not a sentencepiece model ({e})") from None
        n = self.sp.get_piece_size()
        self.boi_id, self.image_id, self.n_vocab = n, n + 1, n + 2
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = pad_id if pad_id is not None else (self.sp.pad_id() if self.sp.pad_id() >= 0 else n - 1)
        self.special_ids = {"<BoI>": self.boi_id, "<image>": self.image_id}
        self._split = re.compile("(" + "|".join(map(re.escape, self.SPECIALS)) + ")")

    def encode(self, text, bos=True, eos=False):
        """Text -> ids; `<BoI>` and `<image>` written in the text become their ids, the rest goes to sentencepiece."""
        ids = [self.bos_id] if bos else []
        for part in self._split.split(text):
            if part in self.special_ids:
                ids.append(self.special_ids[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        """Ids -> text; sentencepiece drops `<s>`, `</s>`, `<pad>`; the specials come back as their strings."""
        names = {v: k for k, v in self.special_ids.items()}
        out, run = [], []
        for i in list(ids):
            i = int(i)
            if i in names:
                out += [self.sp.decode(run), names[i]]
                run = []
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    def unseen(self, text):
        """The characters of `text` the tokenizer never saw in training, sorted (whitespace aside).

        A character without a piece of its own reaches the model only as raw bytes (byte fallback). Our tokenizers
        are trained with character_coverage=1, which gives every character of the training text a piece, so for
        them such a character never occurred in training and its bytes are pieces the model never learned."""
        unk = self.sp.unk_id()
        return sorted(c for c in set(text) if not c.isspace() and self.sp.piece_to_id(c) == unk)

    def fold_case(self, text):
        """-> (text, folded, unseen): each letter never seen in training whose lower case was, lower-cased (a
        tokenizer trained on ShapeStories, all lower case, reads "There" as bytes but "there" as a word); the
        letters folded and the unseen characters left, each sorted. A tokenizer that knows capitals is unchanged."""
        unseen = self.unseen(text)
        folded = [c for c in unseen if c.lower() != c and not self.unseen(c.lower())]
        table = {ord(c): c.lower() for c in folded}
        return text.translate(table), folded, [c for c in unseen if c not in folded]

    def image_tokens(self, k):
        """One image in the sequence: `<BoI>` then K `<image>` placeholders (no end-of-image token, reference §0)."""
        return [self.boi_id] + [self.image_id] * k

    @staticmethod
    def image_string(k):
        return "<BoI>" + "<image>" * k

    @staticmethod
    def train(texts, out_prefix, vocab_size, model_type="bpe"):
        """Train a sentencepiece model on a text file or a list of strings -> Tokenizer (`out_prefix`.model).

        LLaMA's conventions (unk 0, `<s>` 1, `</s>` 2) plus a real `<pad>` 3; identity normalisation and byte
        fallback so any text round-trips; single-threaded on the whole corpus, so the result is deterministic.
        """
        if isinstance(texts, (str, Path)):
            texts = Path(texts).read_text(encoding="utf-8").splitlines()
        special = re.compile("|".join(map(re.escape, Tokenizer.SPECIALS)))
        lines = [special.sub(" ", t) for t in texts if t.strip()]  # the specials are ours, not pieces to learn
        if not lines:
            raise ValueError("Tokenizer.train: the corpus is empty")
        Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_prefix=str(out_prefix), vocab_size=vocab_size,
                model_type=model_type, character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                pad_id=3, normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
                num_threads=1, minloglevel=2)
        except RuntimeError as e:
            raise ValueError(f"Tokenizer.train ({out_prefix}): {e}") from None
        return Tokenizer(f"{out_prefix}.model")


# ----------------------------------------------------------------------------------------------------------------
# generation (reference §3.6: text stops at </s> or at <BoI>, where the caller generates an image)


def sample_next(logits, temperature=0.0, top_p=1.0, generator=None):
    """Next ids (B,) from logits (B, V): greedy for temperature 0, else temperature + nucleus (top-p) sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)                                    # (B, V)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    p, idx = probs.sort(-1, descending=True)                                              # (B, V) each
    p = p * (p.cumsum(-1) - p < top_p)  # keep the smallest prefix with mass >= top_p (the top token always)
    return idx.gather(-1, torch.multinomial(p, 1, generator=generator)).squeeze(-1)


@torch.no_grad()
def generate(model, prompt, max_new_tokens, stop_ids=(), inputs_embeds=None, images=None, bos_id=None, boi_id=None,
             temperature=0.0, top_p=1.0, generator=None, use_cache=True, head=None):
    """Continue prompt ids (B, T0) -> per row the list of new ids, ending with its first stop id if one came.

    `inputs_embeds` (B, T0, dim) replaces the prompt's embeddings (visual tokens inserted); `images` (B, n, S, C)
    are read by MMFS with the §3.4 visibility of `bos_id` / `boi_id`. Rows of one batch share the prompt length.
    `head` maps hidden states to logits (default the model's lm_head; e.g. a TextHead).
    """
    head = head if head is not None else model.lm_head
    B, T0 = prompt.shape
    if images is not None and (bos_id is None or boi_id is None):
        raise ValueError("generate: images need bos_id and boi_id for the visibility mask")
    if T0 + max_new_tokens > model.cfg.max_seq_len:  # fail before the work, not part-way through it
        raise ValueError(f"generate: {T0} prompt + {max_new_tokens} new tokens exceed max_seq_len = "
                         f"{model.cfg.max_seq_len}")
    buf = torch.empty(B, T0 + max_new_tokens, dtype=torch.long, device=prompt.device)
    buf[:, :T0] = prompt
    cache = model.new_cache(B, T0 + max_new_tokens) if use_cache else None
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=prompt.device)
    end = T0
    for _ in range(max_new_tokens):
        start = end - 1 if use_cache and end > T0 else 0  # with the cache only the newest token goes in
        tokens, embeds = buf[:, start:end], None
        if inputs_embeds is not None and start < T0:  # the prompt part comes as given embeddings
            embeds = torch.cat([inputs_embeds, model.model.embed_tokens(buf[:, T0:end])], dim=1)  # (B, end, dim)
            tokens = None
        mask = None
        if images is not None:
            mask = image_visibility(buf[:, :end], bos_id, boi_id, images.shape[1])[:, start:end]  # (B, T, n)
        h = model.hidden(tokens, embeds, images, mask, cache, start_pos=start)
        nxt = sample_next(head(h[:, -1]), temperature, top_p, generator)                 # (B,)
        buf[:, end] = nxt
        end += 1
        done |= torch.isin(nxt, stops)
        if bool(done.all()):
            break
    out, stop_set = [], set(stop_ids)
    for row in buf[:, T0:end].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_set), len(row))
        out.append(row[:cut])
    return out
