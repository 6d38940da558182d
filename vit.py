"""The image encoder: CLIP's vision transformer (Hugging Face CLIP layout) and the ViT-Adapter feature pyramid.

Read top-down: the config, the CLIP ViT (embeddings, pre-LN encoder layers, `ViT`, its loader), then the adapter
parts bottom-up (channels-first LayerNorm, spatial prior module, deformable attention, injector, extractor with its
ConvFFN, interaction block) and `ViTAdapter`, which runs the ViT with injections and returns the tokens for the
resampler and the pyramid that MMFS reads (paper §3.1-3.2; reference §4.1-4.3).

Pixels: `ViT()(pixels)` takes CLIP-normalised pixels exactly as Hugging Face's `CLIPVisionModel` does, so parity is
direct. `ViTAdapter()(images)` takes images in [0, 1] and applies `normalize` (CLIP mean/std) itself: the one place
where the normalisation happens.
"""
import math
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import mmfs
import weights

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(images):
    """[0, 1] RGB images (B, 3, H, W) -> CLIP-normalised pixels (reference §4.1)."""
    mean = images.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # CLIP's x·sigmoid(1.702x); "gelu" (exact) is also accepted
    # --- ViT-Adapter (reference §4.2); its pyramid has the ViT width as channels
    spm_ratio: int = 16  # the SPM sees the image resized to (token grid · spm_ratio) px; paper 16·16 = 256 px
    conv_inplane: int = 64  # SPM stem width
    # stride of the finest map c1 in SPM-input pixels: 4 as ViT-Adapter (the stem's max-pool); 2 skips that pool, so
    # c1 keeps the stem's full resolution, for small frames whose objects are a few pixels wide. c1 alone changes:
    # it never enters the interaction blocks, so the ViT costs the same, but MMFS then reads a 4x larger map
    # (EXPERIMENTS.md: "Two cheaper ways": no clear gain on the small preset, so off there)
    c1_stride: int = 4
    interaction_indexes: tuple | None = None  # 4 runs of ViT layers; None: 4 equal runs (paper [0-5] ... [18-23])
    adapter_heads: int | None = None  # deformable-attention heads; None: num_attention_heads
    n_points: int = 4
    deform_ratio: float = 0.5  # value width of the deformable attention = hidden_size · deform_ratio
    cffn_ratio: float = 0.25  # ConvFFN hidden width = hidden_size · cffn_ratio
    init_values: float = 0.0  # injector gain γ at init: 0, so the adapter starts as the plain ViT
    extra_extractors: int = 2  # extra extractors after the last interaction block
    adapter_ln_eps: float = 1e-5  # the released code passes nn.LayerNorm (eps 1e-5) to the injectors/extractors

    @property
    def grid(self):
        """Tokens per side of the ViT (paper 224 / 14 = 16)."""
        return self.image_size // self.patch_size

    @property
    def spm_size(self):
        """Side of the SPM input in pixels (paper 256, not 224: reference §4.2)."""
        return self.grid * self.spm_ratio

    @property
    def pyramid_sizes(self):
        """Sides of the 4 pyramid levels, strides c1_stride, 8, 16, 32 of the SPM input (paper 64, 32, 16, 8)."""
        return [self.spm_size // s for s in (self.c1_stride, 8, 16, 32)]

    @property
    def runs(self):
        """The 4 (first, last) ViT layer runs of the interaction blocks."""
        if self.interaction_indexes is not None:
            return [tuple(r) for r in self.interaction_indexes]
        n = self.num_hidden_layers // 4
        return [(i * n, i * n + n - 1) for i in range(4)]


PRESETS = {
    # tests: 4 layers, 16 tokens, pyramid 16/8/4/2 of 32 channels
    "tiny": ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, conv_inplane=8, n_points=2),
    # train.py --small on 32×32 ShapeStories frames: 8×8 tokens, pyramid 16/8/4/2 of 128 channels
    "small": ViTConfig(image_size=32, patch_size=4, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4, spm_ratio=8, conv_inplane=16),
    # CLIP ViT-L/14 at 224 with the released adapter: pyramid 64/32/16/8 of 1024 channels
    "paper": ViTConfig(),
}


# ----------------------------------------------------------------------------------------------------------------
# CLIP ViT


class Embeddings(nn.Module):
    """Patch conv (no bias), CLS token prepended, learned absolute positions."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(D))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, D, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.grid ** 2 + 1, D)

    def forward(self, pixels):
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)                   # (B, N, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)              # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight            # (B, 1+N, D)


class Attention(nn.Module):
    """Multi-head softmax self-attention with explicit q/k/v projections (CLIP names)."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, H, T, D/H)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)                                   # (B, H, T, D/H)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))                     # (B, T, D)


class MLP(nn.Module):
    """fc1 -> quick-GELU (or GELU) -> fc2."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"ViTConfig.hidden_act must be 'quick_gelu' or 'gelu', got {cfg.hidden_act!r}")
        self.quick = cfg.hidden_act == "quick_gelu"
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.quick else F.gelu(h)  # rebinding h frees fc1's output before fc2
        return self.fc2(h)


class EncoderLayer(nn.Module):
    """Pre-LN transformer block: x += attn(LN(x)); x += mlp(LN(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ViT(nn.Module):
    """CLIP's vision transformer; `forward` returns Hugging Face's `last_hidden_state` (no final LayerNorm)."""

    normalize = staticmethod(normalize)

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # [sic], CLIP's name
        layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.encoder = nn.ModuleDict({"layers": layers})  # keys encoder.layers.{i}.*
        # HF applies post_layernorm to the pooled CLS only; MM-Interleaved never uses it. Kept so checkpoints load.
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_vit_parameters()

    def reset_vit_parameters(self):
        """A CLIP-like init for training from scratch (pretrained weights replace it)."""
        for m in [*self.embeddings.modules(), *self.encoder.modules()]:
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.embeddings.class_embedding, std=self.cfg.hidden_size ** -0.5)

    def check_pixels(self, pixels, name="pixels"):
        """Reject pixels of the wrong rank, channel count or size with one clear message."""
        c, s = self.cfg.num_channels, self.cfg.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (c, s, s):
            raise ValueError(f"ViT: {name} must be (B, {c}, {s}, {s}), got {tuple(pixels.shape)}")

    def embed(self, pixels):
        """Normalised pixels (B, C, S, S) -> the encoder input (B, 1+N, D): embeddings then pre_layrnorm."""
        self.check_pixels(pixels)
        return self.pre_layrnorm(self.embeddings(pixels.to(self.embeddings.patch_embedding.weight.dtype)))

    def forward(self, pixels, output_hidden_states=False):
        """(B, C, S, S) CLIP-normalised pixels -> (B, 1+N, D); with output_hidden_states also the L+1 states
        [encoder input, after layer 1, ..., after layer L], as HF's `hidden_states`."""
        h = self.embed(pixels)
        states = [h]
        for layer in self.encoder["layers"]:
            h = layer(h)
            if output_hidden_states:  # otherwise let each state be freed as soon as the next one exists
                states.append(h)
        return (h, states) if output_hidden_states else h

    @classmethod
    def from_pretrained(cls, path, dtype=None, **overrides):
        """Load a CLIP checkpoint (full `CLIPModel`: `vision_model.*` used, text keys ignored; or vision-only);
        config from config.json when present, otherwise inferred from the tensor shapes."""
        state, source = _vision_state(path)
        cfg = replace(_vision_config(path, state), **overrides)
        with torch.device("meta"):
            model = cls(cfg)
        model._fill_missing(state)
        return weights.load_into(model, state, source, dtype)

    def _fill_missing(self, state):
        """Hook for subclasses whose extra parameters a CLIP checkpoint lacks; the plain ViT needs all keys."""


def _vision_state(path):
    """The CLIP vision tensors of a checkpoint, keyed as in `ViT`, and the name of the source for errors."""
    state, _ = weights.load_state(path)
    if any(k.startswith("vision_model.") for k in state):  # CLIPModel, or CLIPVisionModel of transformers < 5
        state = {k[len("vision_model."):]: v for k, v in state.items() if k.startswith("vision_model.")}
    elif "embeddings.patch_embedding.weight" not in state:
        raise weights.WeightsError(f"{path}: no CLIP vision keys (neither vision_model.* nor "
                                   f"embeddings.patch_embedding.weight)")
    state.pop("embeddings.position_ids", None)  # a buffer older transformers saved; we index positions directly
    return state, str(path)


def _vision_config(path, state):
    """ViTConfig from the tensor shapes; heads, eps and activation from config.json when there is one."""
    D, C, p, _ = state["embeddings.patch_embedding.weight"].shape
    n_pos = state["embeddings.position_embedding.weight"].shape[0]
    grid = math.isqrt(n_pos - 1)
    layers = 1 + max([int(m.group(1)) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k))], default=-1)
    if grid * grid != n_pos - 1 or "encoder.layers.0.mlp.fc1.weight" not in state:
        raise weights.WeightsError(f"{path}: CLIP vision keys incomplete or position table of {n_pos} rows "
                                   "is not 1 + a square")
    inferred = dict(hidden_size=D, num_channels=C, patch_size=p, image_size=grid * p, num_hidden_layers=layers,
                    intermediate_size=state["encoder.layers.0.mlp.fc1.weight"].shape[0],
                    num_attention_heads=max(1, D // 64))  # CLIP's convention: 64 channels per head
    path = Path(path)
    cfg_file = (path if path.is_dir() else path.parent) / "config.json"
    if cfg_file.is_file():
        js = weights.read_json(cfg_file)
        js = js.get("vision_config", js)
        for k in ("num_attention_heads", "layer_norm_eps", "hidden_act"):
            if k in js:
                inferred[k] = js[k]
        for k in ("hidden_size", "patch_size", "image_size", "num_hidden_layers", "intermediate_size"):
            if k in js and js[k] != inferred[k]:
                raise weights.WeightsError(f"{cfg_file}: {k} = {js[k]} but the weights have {inferred[k]}")
    return ViTConfig(**inferred)


# ----------------------------------------------------------------------------------------------------------------
# ViT-Adapter parts (Chen et al. 2023, "Vision Transformer Adapter for Dense Predictions")


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map, computed in float32 (the authors' channels-first LN)."""

    def forward(self, x):
        y = F.layer_norm(x.permute(0, 2, 3, 1).float(), self.normalized_shape, self.weight.float(),
                         self.bias.float(), self.eps)                                 # (B, H, W, C)
        return y.permute(0, 3, 1, 2).to(x.dtype)                                     # (B, C, H, W)


def conv_block(c_in, c_out, stride):
    """conv3×3 (no bias) -> channels-first LN (eps 1e-6) -> ReLU."""
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), LayerNorm2d(c_out, eps=1e-6), nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """A small conv net on the image: c1 at stride 4 (a map; stride 2 without the stem's max-pool) and c2, c3, c4 at
    strides 8, 16, 32, all of width D."""

    def __init__(self, inplanes, dim, c1_stride=4):
        super().__init__()
        if c1_stride not in (2, 4):
            raise ValueError(f"ViTConfig.c1_stride must be 2 or 4, got {c1_stride}")
        self.c1_stride = c1_stride
        self.stem = nn.Sequential(*conv_block(3, inplanes, 2), *conv_block(inplanes, inplanes, 1),
                                  *conv_block(inplanes, inplanes, 1), nn.MaxPool2d(3, 2, 1))
        self.conv2 = nn.Sequential(*conv_block(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*conv_block(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*conv_block(4 * inplanes, 4 * inplanes, 2))
        self.fc1, self.fc2 = nn.Conv2d(inplanes, dim, 1), nn.Conv2d(2 * inplanes, dim, 1)
        self.fc3, self.fc4 = nn.Conv2d(4 * inplanes, dim, 1), nn.Conv2d(4 * inplanes, dim, 1)

    def forward(self, x):
        full = self.stem[:-1](x)                                                      # (B, C, S/2, S/2)
        pooled = self.stem[-1](full)                                                  # (B, C, S/4, S/4)
        c1 = full if self.c1_stride == 2 else pooled
        c2 = self.conv2(pooled)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        tokens = [fc(c).flatten(2).transpose(1, 2) for fc, c in ((self.fc2, c2), (self.fc3, c3), (self.fc4, c4))]
        return self.fc1(c1), tokens                                                   # (B, D, s1, s1), [(B, s², D)]


def centres(shapes, device, dtype):
    """Pixel-centre reference points of each (H, W) grid, row-major, concatenated -> (Σ H·W, 2) as (x, y) in [0,1]."""
    refs = []
    for h, w in shapes:
        y, x = torch.meshgrid((torch.arange(h, device=device, dtype=dtype) + 0.5) / h,
                              (torch.arange(w, device=device, dtype=dtype) + 0.5) / w, indexing="ij")  # (h, w) each
        refs.append(torch.stack([x.flatten(), y.flatten()], dim=-1))                  # (h·w, 2)
    return torch.cat(refs)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR, eq. 3): per head, level and point an offset and a weight
    predicted from the query; one softmax over levels × points; the sampling runs through `mmfs.msda`."""

    def __init__(self, d_model, n_levels, n_heads, n_points, ratio):
        super().__init__()
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.dv = int(d_model * ratio)
        if self.dv % n_heads:
            raise ValueError(f"MSDeformAttn: value width {self.dv} is not divisible by {n_heads} heads")
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, self.dv)
        self.output_proj = nn.Linear(self.dv, d_model)

    def reset_parameters(self):
        """Deformable DETR's init: offsets start on a per-head direction ring, radius point index + 1 (in pixels)."""
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.n_heads, dtype=torch.float32) * (2 * math.pi / self.n_heads)
        ring = torch.stack([theta.cos(), theta.sin()], -1)                            # (M, 2)
        ring = ring / ring.abs().max(-1, keepdim=True).values                         # onto the unit square
        radius = torch.arange(1, self.n_points + 1, dtype=torch.float32)              # (P,)
        bias = ring[:, None, None, :] * radius[None, None, :, None]                   # (M, 1, P, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.expand(-1, self.n_levels, -1, -1).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query, ref, value, shapes):
        """query (B, Lq, D), ref (Lq, 2) in [0,1] as (x, y), value (B, Σ H·W, D) of the levels `shapes` [(H, W)]."""
        B, Lq, _ = query.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        dtype = torch.promote_types(query.dtype, torch.float32)  # sample in at least float32: bf16 locations are coarse
        v = self.value_proj(value).view(B, value.shape[1], M, self.dv // M)           # (B, S, M, Dh)
        offsets = self.sampling_offsets(query).view(B, Lq, M, L, P, 2).to(dtype)
        w = self.attention_weights(query).view(B, Lq, M, L * P).softmax(-1).view(B, Lq, M, L, P)
        # offsets are in pixels of each level: divide by its (W, H) to get normalised (x, y)
        size = torch.tensor([(w_, h_) for h_, w_ in shapes], dtype=dtype, device=query.device)  # (L, 2)
        loc = ref.to(dtype)[None, :, None, None, None, :] + offsets / size[:, None, :]  # (B, Lq, M, L, P, 2)
        shapes_t = torch.tensor(shapes, dtype=torch.long, device=query.device)       # (L, 2) as (H, W)
        starts = torch.cat([shapes_t.new_zeros(1), (shapes_t[:, 0] * shapes_t[:, 1]).cumsum(0)[:-1]])  # (L,)
        out = mmfs.msda(v.to(dtype).contiguous(), shapes_t, starts, loc.contiguous(),
                        w.to(dtype).contiguous())                                     # (B, Lq, dv)
        return self.output_proj(out.to(v.dtype))


class Injector(nn.Module):
    """ViT tokens read the SPM features: x = x + γ ⊙ MSDeformAttn(LN(x), LN(c)), γ = 0 at init."""

    def __init__(self, cfg, heads):
        super().__init__()
        D, eps = cfg.hidden_size, cfg.adapter_ln_eps
        self.init_values = cfg.init_values
        self.query_norm, self.feat_norm = nn.LayerNorm(D, eps=eps), nn.LayerNorm(D, eps=eps)
        self.attn = MSDeformAttn(D, 3, heads, cfg.n_points, cfg.deform_ratio)
        self.gamma = nn.Parameter(torch.empty(D))

    def reset_parameters(self):
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x, c, ref, c_shapes):
        return x + self.gamma * self.attn(self.query_norm(x), ref, self.feat_norm(c), c_shapes)


class ConvFFN(nn.Module):
    """fc1 -> depthwise 3×3 conv on each level's map -> GELU -> fc2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.ModuleDict({"dwconv": nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)})  # authors' nesting
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, c, c_shapes):
        h = self.fc1(c)                                                               # (B, Σ s², Ch)
        B, _, Ch = h.shape
        maps = []
        for t, (a, b) in zip(h.split([a * b for a, b in c_shapes], dim=1), c_shapes):  # one level at a time
            m = self.dwconv["dwconv"](t.transpose(1, 2).reshape(B, Ch, a, b))         # (B, Ch, a, b)
            maps.append(m.flatten(2).transpose(1, 2))                                 # (B, a·b, Ch)
        return self.fc2(F.gelu(torch.cat(maps, dim=1)))


class Extractor(nn.Module):
    """SPM features read the ViT tokens: c = c + MSDeformAttn(LN(c), LN(x)); c = c + ConvFFN(LN(c))."""

    def __init__(self, cfg, heads):
        super().__init__()
        D, eps = cfg.hidden_size, cfg.adapter_ln_eps
        self.query_norm, self.feat_norm = nn.LayerNorm(D, eps=eps), nn.LayerNorm(D, eps=eps)
        self.attn = MSDeformAttn(D, 1, heads, cfg.n_points, cfg.deform_ratio)
        self.ffn = ConvFFN(D, int(D * cfg.cffn_ratio))
        self.ffn_norm = nn.LayerNorm(D, eps=eps)

    def forward(self, c, x, ref, x_shape, c_shapes):
        c = c + self.attn(self.query_norm(c), ref, self.feat_norm(x), [x_shape])
        return c + self.ffn(self.ffn_norm(c), c_shapes)


class InteractionBlock(nn.Module):
    """Inject into the patch tokens, run a run of CLIP layers (with CLS), extract back into the SPM features."""

    def __init__(self, cfg, heads, n_extra):
        super().__init__()
        self.injector = Injector(cfg, heads)
        self.extractor = Extractor(cfg, heads)
        self.extra_extractors = nn.ModuleList(Extractor(cfg, heads) for _ in range(n_extra))  # empty: no keys

    def forward(self, x, c, cls, layers, geo):
        x = self.injector(x, c, geo["x_ref"], geo["c_shapes"])
        h = torch.cat([cls, x], dim=1)                                                # (B, 1+N, D)
        for layer in layers:
            h = layer(h)
        cls, x = h[:, :1], h[:, 1:]
        for ex in [self.extractor, *self.extra_extractors]:
            c = ex(c, x, geo["c_ref"], geo["x_shape"], geo["c_shapes"])
        return x, c, cls


@lru_cache(maxsize=16)
def _pyramid_pos(dim, grid, size, device, dtype):
    """(dim, size, size): the grid×grid sincos table bicubic-resized to the level (reference §4.3), cached per device
    and dtype so a GPU forward does not copy it from the host every time."""
    with torch.inference_mode(False):  # a cached tensor must stay usable outside inference mode
        table = mmfs.pos_embed_2d(dim, grid, size, size).T.reshape(dim, size, size)      # (dim, size, size)
        return table.to(device, dtype).contiguous()


class ViTAdapter(ViT):
    """CLIP ViT plus ViT-Adapter. The CLIP parameters keep their exact names; the adapter's live under `adapter_*`
    (as in the released code), so `ViTAdapter.from_pretrained(clip_path)` loads CLIP strictly and inits the rest.
    The authors train only the adapter: `p.requires_grad_(name.startswith("adapter_"))` over named_parameters()."""

    def __init__(self, cfg):
        runs = cfg.runs
        if len(runs) != 4 or [a for a, _ in runs] != [0] + [b + 1 for _, b in runs[:-1]] \
                or runs[-1][1] != cfg.num_hidden_layers - 1:
            raise ValueError(f"ViTConfig.interaction_indexes must be 4 consecutive runs covering layers 0.."
                             f"{cfg.num_hidden_layers - 1}, got {runs}")
        if cfg.spm_size % 32:
            raise ValueError(f"ViTConfig: SPM input grid·spm_ratio = {cfg.spm_size} px must be a multiple of 32")
        super().__init__(cfg)
        D, heads = cfg.hidden_size, cfg.adapter_heads or cfg.num_attention_heads
        self.adapter_level_embed = nn.Parameter(torch.empty(3, D))
        self.adapter_spm = SpatialPriorModule(cfg.conv_inplane, D, cfg.c1_stride)
        self.adapter_interactions = nn.Sequential(
            *(InteractionBlock(cfg, heads, cfg.extra_extractors if i == 3 else 0) for i in range(4)))
        self.adapter_up = nn.ConvTranspose2d(D, D, 2, 2)
        self.post_layernorm.requires_grad_(False)  # unused by the adapter (the authors replace it by Identity)
        if not self.adapter_level_embed.is_meta:
            self.reset_adapter_parameters()

    def reset_adapter_parameters(self):
        """PyTorch defaults, then Deformable-DETR init for the attention, γ = init_values, level embeddings 0."""
        adapter = [m for name, m in self.named_modules() if name.startswith("adapter_")]
        for m in adapter[::-1]:  # children before parents, so MSDeformAttn's init overrides its Linears' defaults
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        nn.init.zeros_(self.adapter_level_embed)

    def _fill_missing(self, state):
        """A CLIP checkpoint has no adapter: materialise and init the adapter here, then load CLIP strictly."""
        if any(k.startswith("adapter_") for k in state):
            return
        for name, child in self.named_children():
            if name.startswith("adapter_"):
                child.to_empty(device="cpu")
        self.adapter_level_embed = nn.Parameter(torch.empty_like(self.adapter_level_embed, device="cpu"))
        self.reset_adapter_parameters()
        state.update({k: v for k, v in self.state_dict().items() if k.startswith("adapter_")})

    def forward(self, images):
        """[0, 1] images (B, 3, S, S) -> tokens (B, 1+N, D): the last CLIP layer's output with the injections,
        unnormalised, for the resampler; pyramid: 4 maps (B, D, s_l, s_l), s = pyramid_sizes (paper 64/32/16/8),
        with the bicubic-resized 2-D sincos position already added, for MMFS (reference §4.2-4.3)."""
        cfg = self.cfg
        self.check_pixels(images, "images")
        pixels = normalize(images.to(self.embeddings.patch_embedding.weight.dtype))
        B, D, g = pixels.shape[0], cfg.hidden_size, cfg.grid
        s1, s2, s3, s4 = cfg.pyramid_sizes
        c_shapes = [(s2, s2), (s3, s3), (s4, s4)]
        ref_dtype = torch.promote_types(pixels.dtype, torch.float32)
        geo = dict(x_ref=centres([(g, g)], pixels.device, ref_dtype), c_ref=centres(c_shapes, pixels.device, ref_dtype),
                   x_shape=(g, g), c_shapes=c_shapes)

        h = self.embed(pixels)                                                        # (B, 1+N, D)
        cls, x = h[:, :1], h[:, 1:]
        spm_in = F.interpolate(pixels, size=(cfg.spm_size, cfg.spm_size), mode="bilinear", align_corners=False)
        c1, cs = self.adapter_spm(spm_in)
        c = torch.cat([t + e for t, e in zip(cs, self.adapter_level_embed.to(x.dtype))], dim=1)  # (B, Σ s², D)

        layers, outs = self.encoder["layers"], []
        for block, (a, b) in zip(self.adapter_interactions, cfg.runs):
            x, c, cls = block(x, c, cls, layers[a:b + 1], geo)
            outs.append(x.transpose(1, 2).reshape(B, D, g, g))                       # (B, D, g, g)

        c2, c3, c4 = (t.transpose(1, 2).reshape(B, D, s, s) for t, s in zip(c.split([s2 * s2, s3 * s3, s4 * s4], 1),
                                                                              (s2, s3, s4)))  # (B, D, s, s)
        up = self.adapter_up(c2)                                                      # (B, D, 2·s2, 2·s2)
        if up.shape[-1] != s1:  # c1_stride 2: c1 is twice as fine again
            up = F.interpolate(up, size=(s1, s1), mode="bilinear", align_corners=False)
        c1 = c1 + up                                                                  # (B, D, s1, s1)
        pyramid = []
        for level, xi in zip((c1, c2, c3, c4), outs):  # add the ViT map of the matching depth, resized to the level
            s = level.shape[-1]
            xi = xi if s == g else F.interpolate(xi, size=(s, s), mode="bilinear", align_corners=False)
            pyramid.append(level + xi + _pyramid_pos(D, g, s, level.device, level.dtype))
        return torch.cat([cls, x], dim=1), pyramid
