"""The resampler: a BLIP-2 Q-Former used as a Perceiver resampler (paper §3.1; reference §4.4 and §5.1).

A fixed set of learned queries runs through post-LN BERT blocks: self-attention among the queries, cross-attention
to the inputs every `cross_attention_frequency` layers, a GELU MLP. It is used twice: 64 visual tokens per image from
the ViT tokens (then projected to the LLM width), and 77 condition tokens for the UNet from the LLM states.

Read bottom-up: config, attention (optional q/k LayerNorm), the residual "add & norm" output, the layer, `Resampler`
and its loader. Module names equal Hugging Face's `Blip2QFormerModel` keys; `query_tokens`, `proj` and the
`q_norm`/`k_norm` inside attention are ours, so a Q-Former checkpoint loads strictly.
"""
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import weights


@dataclass
class ResamplerConfig:
    num_queries: int = 64  # learned queries = output tokens per input
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2  # layer i cross-attends when i % frequency == 0
    encoder_hidden_size: int = 1024  # width of the inputs (keys/values of the cross-attention)
    qk_normalization: bool = True  # LayerNorm(head_dim) on q and k of every attention (the authors' monkey patch)
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    output_size: int | None = 5120  # `proj` Linear(hidden, output_size); None: no projection
    proj_init_std: float = 1e-3  # tiny, so the new visual tokens start near zero in the LLM's input space
    initializer_range: float = 0.02


PRESETS = {
    # visual tokenizer: 64 tokens per image from the 257 ViT-L tokens, projected to Vicuna-13B's 5120
    "paper": ResamplerConfig(),
    # image decoder: 77 UNet condition tokens of width 1024 from the 5120-wide LLM states
    "paper_decoder": ResamplerConfig(num_queries=77, hidden_size=1024, num_hidden_layers=1, num_attention_heads=16,
                                     cross_attention_frequency=1, encoder_hidden_size=5120, qk_normalization=False,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, output_size=None),
    "tiny": ResamplerConfig(num_queries=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, encoder_hidden_size=32, output_size=48),
    "tiny_decoder": ResamplerConfig(num_queries=6, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                    intermediate_size=64, cross_attention_frequency=1, encoder_hidden_size=48,
                                    qk_normalization=False, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                    output_size=None),
    # train.py --small: 16 tokens per 8×8-token frame from the small ViT (width 128); output_size / the decoder's
    # widths are the LLM's and the UNet context's, which model.py sets from their configs
    "small": ResamplerConfig(num_queries=16, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=512, encoder_hidden_size=128, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0, output_size=256),
    "small_decoder": ResamplerConfig(num_queries=16, hidden_size=128, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=512, cross_attention_frequency=1, encoder_hidden_size=256,
                                     qk_normalization=False, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, output_size=None),
}


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention of the hidden states to themselves or (cross) to the encoder states."""

    def __init__(self, cfg, cross):
        super().__init__()
        D, kv = cfg.hidden_size, cfg.encoder_hidden_size if cross else cfg.hidden_size
        if D % cfg.num_attention_heads:
            raise ValueError(f"ResamplerConfig: hidden_size {D} not divisible by {cfg.num_attention_heads} heads")
        self.n_heads, self.dropout = cfg.num_attention_heads, cfg.attention_probs_dropout_prob
        self.query, self.key, self.value = nn.Linear(D, D), nn.Linear(kv, D), nn.Linear(kv, D)
        if cfg.qk_normalization:  # normalise each head's q and k before the dot product (stabler logits)
            hd = D // self.n_heads
            self.q_norm = nn.LayerNorm(hd, eps=cfg.layer_norm_eps)
            self.k_norm = nn.LayerNorm(hd, eps=cfg.layer_norm_eps)
        self.qk_norm = cfg.qk_normalization

    def heads(self, t):
        return t.view(t.shape[0], t.shape[1], self.n_heads, -1).transpose(1, 2)      # (B, H, T, D/H)

    def forward(self, h, ctx, bias):
        B, T, D = h.shape
        q, k, v = self.heads(self.query(h)), self.heads(self.key(ctx)), self.heads(self.value(ctx))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)     # (B, H, T, D/H)
        return y.transpose(1, 2).reshape(B, T, D)                                     # (B, T, D)


class AddNorm(nn.Module):
    """BERT's post-LN residual: LayerNorm(x + Dropout(Dense(y)))."""

    def __init__(self, cfg, d_in):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, y, x):
        return self.LayerNorm(x + self.dropout(self.dense(y)))


class Attention(nn.Module):
    """Attention block: multi-head attention, then the add & norm with the block's input."""

    def __init__(self, cfg, cross=False):
        super().__init__()
        self.attention = MultiHeadAttention(cfg, cross)
        self.output = AddNorm(cfg, cfg.hidden_size)

    def forward(self, h, ctx=None, bias=None):
        return self.output(self.attention(h, h if ctx is None else ctx, bias), h)


class Intermediate(nn.Module):
    """The MLP's expansion: Dense -> GELU."""

    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h):
        return F.gelu(self.dense(h))  # exact GELU, HF's "gelu"


class Layer(nn.Module):
    """Self-attention, cross-attention to the inputs (every `cross_attention_frequency` layers), MLP; post-LN."""

    def __init__(self, cfg, i):
        super().__init__()
        self.attention = Attention(cfg)
        if i % cfg.cross_attention_frequency == 0:
            self.crossattention = Attention(cfg, cross=True)
        self.has_cross_attention = i % cfg.cross_attention_frequency == 0
        self.intermediate_query = Intermediate(cfg)
        self.output_query = AddNorm(cfg, cfg.intermediate_size)

    def forward(self, h, enc, bias):
        h = self.attention(h)
        if self.has_cross_attention:
            h = self.crossattention(h, enc, bias)
        return self.output_query(self.intermediate_query(h), h)


class Resampler(nn.Module):
    """Learned queries cross-attend to a variable number of inputs and come out as a fixed number of tokens."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.query_tokens = nn.Parameter(torch.empty(1, cfg.num_queries, cfg.hidden_size))
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_hidden_layers))})
        self.proj = nn.Linear(cfg.hidden_size, cfg.output_size) if cfg.output_size else None
        if not self.query_tokens.is_meta:
            self.reset_parameters()

    def reset_parameters(self):
        """HF's init (Linear N(0, 0.02), zero bias; LayerNorm 1, 0), queries N(0, 0.02), proj N(0, proj_init_std)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=self.cfg.initializer_range)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        nn.init.normal_(self.query_tokens, std=self.cfg.initializer_range)
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=self.cfg.proj_init_std)

    def forward(self, encoder_hidden_states, encoder_mask=None):
        """encoder_hidden_states (B, N, E), encoder_mask (B, N) with 1 = valid -> (B, Q, output_size or hidden)."""
        enc = encoder_hidden_states
        if enc.dim() != 3 or enc.shape[-1] != self.cfg.encoder_hidden_size:
            raise ValueError(f"Resampler: encoder_hidden_states must be (B, N, {self.cfg.encoder_hidden_size}), "
                             f"got {tuple(enc.shape)}")
        B, N, _ = enc.shape
        bias = None
        if encoder_mask is not None:
            if tuple(encoder_mask.shape) != (B, N):
                raise ValueError(f"Resampler: encoder_mask must be (B, N) = ({B}, {N}), "
                                 f"got {tuple(encoder_mask.shape)}")
            # masked keys get the dtype's most negative logit, as HF does (a fully masked row stays finite: uniform)
            bias = (1 - encoder_mask.to(enc.dtype))[:, None, None, :] * torch.finfo(enc.dtype).min  # (B, 1, 1, N)
        h = self.dropout(self.layernorm(self.query_tokens.to(enc.dtype).expand(B, -1, -1)))  # (B, Q, D)
        for layer in self.encoder["layer"]:
            h = layer(h, enc, bias)
        return h if self.proj is None else self.proj(h)

    @classmethod
    def from_pretrained(cls, path, dtype=None, **overrides):
        """Load a Q-Former: a `Blip2QFormerModel` checkpoint (bare keys) or a BLIP-2 one (`qformer.*` plus
        `query_tokens`; other keys ignored). Sizes come from the shapes, heads/eps/dropout from config.json when
        present; `overrides` set the rest (e.g. num_queries, output_size). Our extras that the checkpoint lacks
        (queries, proj, q/k norms) are freshly initialised; every Q-Former key must match exactly."""
        state, _ = weights.load_state(path)
        if any(k.startswith("qformer.") for k in state):
            queries = state.get("query_tokens")
            state = {k[len("qformer."):]: v for k, v in state.items() if k.startswith("qformer.")}
            if queries is not None:
                state["query_tokens"] = queries
        if "layernorm.weight" not in state or "encoder.layer.0.attention.attention.query.weight" not in state:
            raise weights.WeightsError(f"{path}: no Q-Former keys (layernorm.*, encoder.layer.0.attention.*, "
                                       "optionally under qformer.)")
        # the Q-Former's text path (embeddings, per-layer intermediate/output) is never run by a resampler
        state = {k: v for k, v in state.items()
                 if not (k.startswith("embeddings.") or re.match(r"encoder\.layer\.\d+\.(intermediate|output)\.", k))}
        cfg = replace(_config(path, state), **overrides)
        with torch.device("meta"):
            model = cls(cfg)
        fresh = None  # our extras the checkpoint lacks take the module's own init (one place defines it)
        for k in model.state_dict():
            if k not in state and (k in ("query_tokens", "proj.weight", "proj.bias") or ".q_norm." in k
                                   or ".k_norm." in k):
                fresh = fresh if fresh is not None else cls(cfg).state_dict()
                state[k] = fresh[k]
        return weights.load_into(model, state, str(path), dtype)


def _config(path, state):
    """ResamplerConfig from the tensor shapes (and config.json for what shapes cannot tell)."""
    D = state["layernorm.weight"].shape[0]
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    cross = [i for i in range(layers) if f"encoder.layer.{i}.crossattention.attention.key.weight" in state]
    if not cross or cross[0] != 0:
        raise weights.WeightsError(f"{path}: layer 0 of the Q-Former has no cross-attention")
    freq = cross[1] - cross[0] if len(cross) > 1 else layers
    cfg = dict(hidden_size=D, num_hidden_layers=layers, cross_attention_frequency=freq,
               num_attention_heads=max(1, D // 64),  # BERT's convention: 64 channels per head
               encoder_hidden_size=state["encoder.layer.0.crossattention.attention.key.weight"].shape[1],
               intermediate_size=state["encoder.layer.0.intermediate_query.dense.weight"].shape[0],
               qk_normalization="encoder.layer.0.attention.attention.q_norm.weight" in state,
               output_size=state["proj.weight"].shape[0] if "proj.weight" in state else None)
    if "query_tokens" in state:
        cfg["num_queries"] = state["query_tokens"].shape[1]
    path = Path(path)
    cfg_file = (path if path.is_dir() else path.parent) / "config.json"
    if cfg_file.is_file():
        js = weights.read_json(cfg_file)
        if "num_query_tokens" in js and "query_tokens" not in state:
            cfg["num_queries"] = js["num_query_tokens"]
        js = js.get("qformer_config", js)
        if js.get("hidden_act", "gelu") != "gelu":
            raise weights.WeightsError(f"{cfg_file}: hidden_act {js['hidden_act']!r} is not supported (only 'gelu')")
        for k in ("num_attention_heads", "layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob"):
            if k in js:
                cfg[k] = js[k]
    return ResamplerConfig(**cfg)
