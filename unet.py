"""The Stable Diffusion UNet (diffusers `UNet2DConditionModel` layout) with MMFS residuals (paper §3.3, Fig. 2).

Read bottom-up: the config, the building blocks (also used by vae.py: time embedding, ResnetBlock, Attention,
Transformer2D, Down/Upsample and the three kinds of block), the UNet itself, then `MMFSNet`, the MMFS residuals
that let the UNet read the previous image's feature pyramid.

Module names equal the diffusers checkpoint keys, so an SD `unet/` folder loads with one strict call. `MMFSNet`
is a separate submodule, `UNet.mmfs`: a diffusers checkpoint has no MMFS keys, so `from_pretrained` loads the plain
UNet strictly and then attaches a freshly initialised `MMFSNet` (zero convs: the output is unchanged) when the
config asks for one. Our own checkpoints hold both and load strictly as one module.
"""
import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import weights
from mmfs import MMFS, pos_embed_2d

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers config fields we do not implement, with the only value we accept (their SD default)
UNSUPPORTED = {
    "num_attention_heads": None, "transformer_layers_per_block": 1, "only_cross_attention": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "mid_block_only_cross_attention": None, "act_fn": "silu",
    "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0,
    "dual_cross_attention": False, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "projection_class_embeddings_input_dim": None, "attention_type": "default",
    "class_embeddings_concat": False, "cross_attention_norm": None, "reverse_transformer_layers_per_block": None,
}


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64  # the latent side the model is trained at; MMFS offsets are in units of its pixels
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    # diffusers' name, but it is the number of HEADS (int: every level; list: per down level), head dim = C / heads
    attention_head_dim: int | tuple = (5, 10, 20, 20)
    cross_attention_dim: int = 1024  # width of the context tokens
    use_linear_projection: bool = True  # Linear (SD 2.x) or 1x1 Conv (SD 1.x) around each transformer
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True  # time embedding as [cos, sin] rather than [sin, cos]
    freq_shift: int = 0
    upcast_attention: bool = False  # run attention in float32 when the model is in half precision
    # MMFS residuals (reference §5.3 and §7.1); the defaults are the paper's
    mmfs: bool = False  # build UNet.mmfs
    mmfs_dim: int = 1024  # MMFS d_model ("attn_dim"): width of the projected values
    mmfs_value_dim: int = 1024  # channels of the image pyramid it reads
    mmfs_levels: tuple = (64, 32, 16, 8)  # sides of the (square) pyramid levels
    mmfs_heads: int = 16
    mmfs_points: int = 8
    mmfs_offset_init: float = 1.0  # initial offsets ~ U(±1) UNet pixels
    mmfs_max_images: int = 10
    mmfs_pos_grid: int = 64  # the query position table is a grid×grid sin-cos table resized to each map
    mmfs_max_side: int = 0  # residuals only on maps of side <= this at sample_size (0: on all, as the paper)

    def __post_init__(self):
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types", "block_out_channels", "mmfs_levels"):
            setattr(self, name, tuple(getattr(self, name)))
        if isinstance(self.attention_head_dim, (list, tuple)):
            self.attention_head_dim = tuple(self.attention_head_dim)
        problems = []
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            problems.append(f"down_block_types / up_block_types need {n} entries, one per block_out_channels")
        problems += [f"down block type {t!r} is not one of {DOWN_TYPES}" for t in self.down_block_types
                     if t not in DOWN_TYPES]
        problems += [f"up block type {t!r} is not one of {UP_TYPES}" for t in self.up_block_types if t not in UP_TYPES]
        for name in ("layers_per_block", "cross_attention_dim", "sample_size"):
            if not isinstance(getattr(self, name), int):
                problems.append(f"{name} must be an int, got {getattr(self, name)!r}")
        if not problems:
            problems += [f"{c} channels are not divisible by {h} heads" for c, h in zip(self.block_out_channels,
                                                                                  self.heads()) if c % h]
            problems += [f"{c} channels are not divisible by norm_num_groups {self.norm_num_groups}"
                         for c in self.block_out_channels if c % self.norm_num_groups]
            if self.mmfs and any(c % 4 for c in self.block_out_channels):
                problems.append("MMFS needs channels divisible by 4 (for the 2-D sin-cos query position)")
        if problems:
            raise ValueError("UNetConfig: " + "; ".join(problems))

    def heads(self):
        """Heads per down level: diffusers reads `attention_head_dim` as the head count (its naming issue #2011)."""
        h = self.attention_head_dim
        return tuple(h) if isinstance(h, tuple) else (h,) * len(self.block_out_channels)

    @classmethod
    def from_json(cls, path, **overrides):
        """Read a diffusers `unet/config.json`; unsupported settings fail with the field and the file named."""
        return config_from_json(cls, path, "UNet2DConditionModel", UNSUPPORTED, overrides)


def config_from_json(cls, path, class_name, unsupported, overrides):
    """A config dataclass from a diffusers config.json (also used by vae.py): unsupported values and invalid
    combinations fail with the file named; keys the dataclass does not know are ignored."""
    raw = weights.read_json(path)
    if raw.get("_class_name", class_name) != class_name:
        raise ValueError(f"{path}: _class_name is {raw['_class_name']!r}, expected {class_name!r}")
    for key, ok in unsupported.items():
        if key in raw and raw[key] != ok:
            raise ValueError(f"{path}: {key} = {raw[key]!r} is not supported (only {ok!r})")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in names}
    try:
        return cls(**{**kwargs, **overrides})
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None


def with_attention(c, max_side, up_side=None):
    """A copy of config `c` in which every down block on a map of side <= max_side (at sample_size), and every up
    block on a map of side <= up_side (default max_side), has attention (self- and cross-attention, as SD's blocks);
    the blocks on larger maps have none. Block i of the down path works at side sample_size / 2^i, and the up path
    mirrors it."""
    up_side = max_side if up_side is None else up_side
    n = len(c.block_out_channels)
    sides = [max(c.sample_size >> i, 1) for i in range(n)]                   # down path; the up path is reversed
    down = tuple("CrossAttnDownBlock2D" if s <= max_side else "DownBlock2D" for s in sides)
    up = tuple("CrossAttnUpBlock2D" if s <= up_side else "UpBlock2D" for s in sides[::-1])
    return dataclasses.replace(c, down_block_types=down, up_block_types=up)


PRESETS = {  # the MMFS pyramids are vit.PRESETS' (16/8/4/2 levels of 32 channels for tiny, of 128 for small)
    "tiny": UNetConfig(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
                       cross_attention_dim=32, norm_num_groups=8, mmfs=True, mmfs_dim=32, mmfs_value_dim=32,
                       mmfs_levels=(16, 8, 4, 2), mmfs_heads=2, mmfs_points=2, mmfs_pos_grid=16),
    # train.py --small: pixel-space 32x32 RGB frames; attention at 16x16 and 8x8, none at 32x32. At 16x16 the text
    # meets the previous frame's MMFS residuals, so an event finds the object it names (EXPERIMENTS.md, two seeds)
    "small": UNetConfig(in_channels=3, out_channels=3, sample_size=32, block_out_channels=(32, 64, 64),
                        layers_per_block=1,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4,
                        cross_attention_dim=128, mmfs=True, mmfs_dim=64, mmfs_value_dim=128,
                        mmfs_levels=(16, 8, 4, 2), mmfs_heads=4, mmfs_points=4, mmfs_pos_grid=32,
                        mmfs_max_side=16),  # the two 32x32 residuals: +0.3-0.6 s on a 2.0 s training step
    "paper": UNetConfig(mmfs=True),  # SD 2.1-base
}

# ----------------------------------------------------------------------------------------------------------------
# building blocks (shared with vae.py)


def timestep_embedding(t, dim, flip_sin_to_cos, shift):
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) (DDPM, Ho et al. 2020), in diffusers' order of operations."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift)
    angles = t[:, None].float() * torch.exp(exponent)[None, :]                          # (B, half)
    emb = torch.cat([angles.cos(), angles.sin()] if flip_sin_to_cos else [angles.sin(), angles.cos()], dim=-1)
    return F.pad(emb, (0, dim % 2))                                                     # (B, dim)


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear on the sinusoidal embedding."""

    def __init__(self, dim_in, dim):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(dim_in, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice with a time-embedding shift in between (diffusers ResnetBlock2D)."""

    def __init__(self, c_in, c_out, temb_dim, groups, eps):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, c_out) if temb_dim else None  # the VAE has no time
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x, temb=None):
        """temb is already SiLU-activated (every block would otherwise recompute the same SiLU)."""
        h = self.conv1(F.silu(self.norm1(x)))
        if temb is not None:
            h = h + self.time_emb_proj(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017) on (B, T, C) tokens, diffusers key names."""

    def __init__(self, dim, heads, context_dim=None, qkv_bias=False, upcast=False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # diffusers' to_out.1 is a parameter-free dropout

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = (rearrange(p(z), "b t (h d) -> b h t d", h=self.heads)                 # (B, heads, T, d)
                   for p, z in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        dtype = q.dtype
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v).to(dtype)                           # (B, heads, T, d)
        return self.to_out[0](rearrange(out, "b h t d -> b t (h d)"))                     # (B, T, C)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): one projection to 2·inner, value · gelu(gate)."""

    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class TransformerBlock(nn.Module):
    """Pre-LN self-attention, cross-attention to the context, GEGLU feed-forward (diffusers BasicTransformerBlock)."""

    def __init__(self, dim, heads, context_dim, upcast):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, upcast=upcast)
        self.attn2 = Attention(dim, heads, context_dim, upcast=upcast)
        # net.1 is dropout in diffusers: an Identity keeps the key of the output layer at net.2
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff.net[2](self.ff.net[0](self.norm3(x)))


class Transformer2D(nn.Module):
    """A transformer over the pixels of a feature map, residual around it (diffusers Transformer2DModel)."""

    def __init__(self, dim, heads, context_dim, groups, linear, upcast):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim) if linear else nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(dim, heads, context_dim, upcast)])
        self.proj_out = nn.Linear(dim, dim) if linear else nn.Conv2d(dim, dim, 1)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x) if self.linear else self.proj_in(self.norm(x))
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)                                    # (B, H·W, C)
        h = self.proj_in(h) if self.linear else h
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self.proj_out(h) if self.linear else h
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)                                     # (B, C, H, W)
        return x + (h if self.linear else self.proj_out(h))


class Downsample(nn.Module):
    """Stride-2 3x3 conv; padding 0 means diffusers' VAE variant, which pads one pixel right and bottom."""

    def __init__(self, dim, padding=1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(dim, dim, 3, stride=2, padding=padding)

    def forward(self, x):
        return self.conv(x if self.padding else F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour upsampling (×2, or to the skip tensor's size) then a 3x3 conv."""

    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x, size=None):
        return self.conv(F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest"))


class DownBlock(nn.Module):
    """(ResnetBlock [-> Transformer2D]) × n [-> Downsample]; returns the output and every state for the skips."""

    def __init__(self, c_in, c_out, n, temb_dim, groups, eps, downsample, attention=None, padding=1):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c_in if i == 0 else c_out, c_out, temb_dim, groups, eps)
                                      for i in range(n)])
        self.attentions = nn.ModuleList([attention() for _ in range(n)]) if attention else None
        self.downsamplers = nn.ModuleList([Downsample(c_out, padding)]) if downsample else None

    def forward(self, x, temb=None, context=None):
        states = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            x = self.attentions[i](x, context) if self.attentions is not None else x
            states.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            states.append(x)
        return x, states


class UpBlock(nn.Module):
    """(concat a skip -> ResnetBlock [-> Transformer2D]) × n [-> Upsample]; `c_ins` counts the skip channels."""

    def __init__(self, c_ins, c_out, temb_dim, groups, eps, upsample, attention=None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c_out, temb_dim, groups, eps) for c in c_ins])
        self.attentions = nn.ModuleList([attention() for _ in c_ins]) if attention else None
        self.upsamplers = nn.ModuleList([Upsample(c_out)]) if upsample else None

    def forward(self, x, skips=(), temb=None, context=None, size=None):
        skips = list(skips)
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1) if skips else x                     # (B, C + C_skip, H, W)
            x = resnet(x, temb)
            x = self.attentions[i](x, context) if self.attentions is not None else x
        return self.upsamplers[0](x, size) if self.upsamplers is not None else x


class MidBlock(nn.Module):
    """ResnetBlock -> attention -> ResnetBlock at the lowest resolution (diffusers UNetMidBlock2D[CrossAttn])."""

    def __init__(self, dim, temb_dim, groups, eps, attention):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(dim, dim, temb_dim, groups, eps) for _ in range(2)])
        self.attentions = nn.ModuleList([attention()])

    def forward(self, x, temb=None, context=None):
        x = self.attentions[0](self.resnets[0](x, temb), context)
        return self.resnets[1](x, temb)


# ----------------------------------------------------------------------------------------------------------------
# the UNet


class UNet(nn.Module):
    """Noise-prediction UNet ε(x_t, t, context) of latent diffusion (Rombach et al. 2022), plus MMFS residuals."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        ch, heads, n, groups, eps = c.block_out_channels, c.heads(), c.layers_per_block, c.norm_num_groups, c.norm_eps
        temb = 4 * ch[0]

        def transformer(dim, h):
            return lambda: Transformer2D(dim, h, c.cross_attention_dim, groups, c.use_linear_projection,
                                         c.upcast_attention)

        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.down_blocks = nn.ModuleList([
            DownBlock(ch[max(i - 1, 0)], ch[i], n, temb, groups, eps, downsample=i < len(ch) - 1,
                      attention=transformer(ch[i], heads[i]) if kind.startswith("CrossAttn") else None)
            for i, kind in enumerate(c.down_block_types)])
        self.mid_block = MidBlock(ch[-1], temb, groups, eps, transformer(ch[-1], heads[-1]))
        # up block i mirrors down level L-1-i: its resnets take the previous output plus n+1 skips
        # (the n states of that level, then the state that entered it)
        rch, rheads, up = ch[::-1], heads[::-1], []
        for i, kind in enumerate(c.up_block_types):
            prev, skip_last = rch[max(i - 1, 0)], rch[min(i + 1, len(ch) - 1)]
            c_ins = [(prev if j == 0 else rch[i]) + (skip_last if j == n else rch[i]) for j in range(n + 1)]
            up.append(UpBlock(c_ins, rch[i], temb, groups, eps, upsample=i < len(ch) - 1,
                              attention=transformer(rch[i], rheads[i]) if kind.startswith("CrossAttn") else None))
        self.up_blocks = nn.ModuleList(up)
        self.conv_norm_out = nn.GroupNorm(groups, ch[0], eps=eps)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)
        self.mmfs = MMFSNet(c) if c.mmfs else None

    def forward(self, x, t, context, mmfs_features=None, mmfs_mask=None, temb_extra=None, tap=None):
        """x (B, in_channels, H, W), t scalar or (B,), context (B, T, cross_attention_dim) -> (B, out_channels, H, W).

        mmfs_features: the previous image's pyramid, a list of (B, n, mmfs_value_dim, S_l, S_l) per level;
        mmfs_mask (B, n), 1 = that image exists (default: all). Without them the plain UNet runs.
        temb_extra (B, 4·C0) is added to the time embedding (a global condition, as diffusers' class embeddings).
        tap = a side s: also return the down path's last state on an s×s map, (B, C, s, s), before any MMFS residual
        (the REPA term of model.py reads it): (output, state)."""
        c = self.config
        if x.dim() != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"UNet: x must be (B, {c.in_channels}, H, W) (config.in_channels), got {tuple(x.shape)}")
        if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[2] != c.cross_attention_dim:
            raise ValueError(f"UNet: context must be (B={x.shape[0]}, T, {c.cross_attention_dim}) "
                             f"(config.cross_attention_dim), got {tuple(context.shape)}")
        if mmfs_features is not None and self.mmfs is None:
            raise ValueError("UNet: mmfs_features given but this UNet has no MMFS residuals (config.mmfs = False)")
        t = torch.as_tensor(t, device=x.device).reshape(-1)
        if t.numel() not in (1, x.shape[0]):
            raise ValueError(f"UNet: t must be a scalar or ({x.shape[0]},) timesteps, got {tuple(t.shape)}")
        t = t.expand(x.shape[0])                                                           # (B,)
        temb = self.time_embedding(timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos,
                                                      c.freq_shift).to(x.dtype))         # (B, 4·C0)
        if temb_extra is not None:
            temb = temb + temb_extra
        temb = F.silu(temb)  # every ResnetBlock reads silu(temb)

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, states = block(h, temb, context)
            skips += states
        tapped = None
        if tap is not None:  # the last skip of that side: after its block's attention, before the next downsample
            tapped = next((s for s in reversed(skips) if s.shape[-1] == tap), None)
            if tapped is None:
                raise ValueError(f"UNet: tap {tap}: the down path's maps have sides "
                                 f"{sorted({s.shape[-1] for s in skips}, reverse=True)}")
        h = self.mid_block(h, temb, context)
        if mmfs_features is not None:  # ControlNet-style: residuals on the mid output and every skip
            h, skips = self.mmfs(h, skips, mmfs_features, mmfs_mask)
        for block in self.up_blocks:
            n = len(block.resnets)
            skips, used = skips[:-n], skips[-n:]
            h = block(h, used, temb, context, size=skips[-1].shape[-2:] if skips else None)
        out = self.conv_out(F.silu(self.conv_norm_out(h)))
        return out if tap is None else (out, tapped)

    @classmethod
    def from_pretrained(cls, path, dtype=None, **overrides):
        """Load a diffusers SD directory (reads `unet/`) or the unet folder itself; config from its config.json.

        `overrides` change config fields, e.g. `mmfs=True` attaches fresh (zero-initialised) MMFS residuals."""
        path = Path(path)
        folder = path / "unet" if (path / "unet").is_dir() else path
        config = UNetConfig.from_json(folder / "config.json", **overrides)
        state, _ = weights.load_state(folder)
        # a diffusers checkpoint has no mmfs.* keys (fresh residuals are attached after the strict load); ours may
        saved_mmfs = any(k.startswith("mmfs.") for k in state)
        config = dataclasses.replace(config, mmfs=config.mmfs or saved_mmfs)
        with torch.device("meta"):
            model = cls(dataclasses.replace(config, mmfs=saved_mmfs))
        weights.load_into(model, state, str(folder), dtype)
        model.config = config
        if config.mmfs and not saved_mmfs:
            model.mmfs = MMFSNet(config).to(dtype or torch.float32)
        return model


# ----------------------------------------------------------------------------------------------------------------
# MMFS residuals (reference §5.3)


@functools.lru_cache(maxsize=64)
def _query_position(dim, grid, h, w, device, dtype):
    """The fixed 2-D sin-cos position of an h×w map's pixels -> (h·w, dim), cached per device and dtype."""
    with torch.inference_mode(False):  # a cached tensor must stay usable outside inference mode
        return pos_embed_2d(dim, grid, h, w).to(device, dtype)


@functools.lru_cache(maxsize=64)
def _pixel_centres(h, w, device):
    """Reference points ((j+0.5)/w, (i+0.5)/h) of every pixel, row-major -> (1, h·w, 2) as (x, y), per device."""
    with torch.inference_mode(False):
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        return torch.stack([xs, ys], dim=-1).reshape(1, h * w, 2).to(device)             # (1, h·w, 2)


class MMFSBlock(nn.Module):
    """One residual: zero_conv(MMFS(LN(x) + pos, LN(pyramid))), each pixel sampling around its own position."""

    def __init__(self, dim, base, c):
        super().__init__()
        self.grid = c.mmfs_pos_grid
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.value_norm = nn.LayerNorm(c.mmfs_value_dim, eps=1e-6)
        self.attn = MMFS(c.mmfs_dim, len(c.mmfs_levels), c.mmfs_heads, c.mmfs_points, list(c.mmfs_levels), base,
                         d_query=dim, d_value=c.mmfs_value_dim, d_out=dim, ratio=1.0,
                         offset_init_magnitude=c.mmfs_offset_init, max_num_image_per_seq=c.mmfs_max_images)
        self.zero_conv = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.zero_conv.weight)  # zero at init: the UNet starts as the plain UNet
        nn.init.zeros_(self.zero_conv.bias)

    def forward(self, x, value, mask):
        B, C, H, W = x.shape
        pos = _query_position(C, self.grid, H, W, x.device, x.dtype)                     # (H·W, C)
        q = self.query_norm(x.flatten(2).transpose(1, 2)) + pos                           # (B, H·W, C)
        ref = _pixel_centres(H, W, x.device)  # (1, H·W, 2), float32 even for a half-precision UNet
        out = self.attn(q, ref, self.value_norm(value), mask)                             # (B, H·W, C)
        return self.zero_conv(out.transpose(1, 2).reshape(B, C, H, W))                   # (B, C, H, W)


class MMFSNet(nn.Module):
    """An MMFSBlock per skip tensor and one for the mid output; all read the same pyramid (ControlNet-style)."""

    def __init__(self, c):
        super().__init__()
        # (channels, number of downsamplings) of every skip tensor, in the UNet's order, then of the mid output
        layout = [(c.block_out_channels[0], 0)]
        for i, dim in enumerate(c.block_out_channels):
            layout += [(dim, i)] * c.layers_per_block + ([(dim, i + 1)] if i < len(c.block_out_channels) - 1 else [])
        layout.append((c.block_out_channels[-1], len(c.block_out_channels) - 1))
        # base = the map's side at the trained resolution, so a raw offset of 1 is one pixel of that map;
        # maps larger than mmfs_max_side get an Identity placeholder (no residual), so block indices stay put
        sides = [max(c.sample_size >> k, 1) for _, k in layout]
        self.blocks = nn.ModuleList([MMFSBlock(dim, s, c) if not c.mmfs_max_side or s <= c.mmfs_max_side
                                     else nn.Identity() for (dim, _), s in zip(layout, sides)])
        self.levels, self.value_dim = c.mmfs_levels, c.mmfs_value_dim

    def forward(self, mid, skips, features, mask=None):
        """Add the residuals to the mid output and each skip; features: per level (B, n, C_img, S_l, S_l)."""
        B = mid.shape[0]
        n = features[0].shape[1] if len(features) else 0
        shapes = [(B, n, self.value_dim, s, s) for s in self.levels]
        if len(features) != len(self.levels) or any(tuple(f.shape) != s for f, s in zip(features, shapes)):
            raise ValueError(f"UNet: mmfs_features must be {len(self.levels)} tensors of shapes {shapes}, "
                             f"got {[tuple(f.shape) for f in features]}")
        mask = torch.ones(B, n, device=mid.device) if mask is None else mask
        if tuple(mask.shape) != (B, n):
            raise ValueError(f"UNet: mmfs_mask must be (B, n) = ({B}, {n}), got {tuple(mask.shape)}")
        value = torch.cat([rearrange(f, "b n c h w -> b n (h w) c") for f in features], dim=2)  # (B, n, ΣHW, C_img)

        def residual(h, block):  # a map larger than mmfs_max_side (the mid's too) has an Identity placeholder: none
            return h if isinstance(block, nn.Identity) else h + block(h, value, mask)

        skips = [residual(s, block) for s, block in zip(skips, self.blocks[:-1], strict=True)]
        return residual(mid, self.blocks[-1]), skips
