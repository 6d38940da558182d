"""The Stable Diffusion autoencoder (diffusers `AutoencoderKL` layout): images <-> latents (Rombach et al. 2022).

Read top-down: the config, the `VAE` (encode, decode, loading), then its `Encoder` / `Decoder` and the one
layer of its own, the mid-block self-attention. The ResNet blocks, attention and up/down blocks are unet.py's.

Presets: `tiny` (tests) and `paper` (the SD 2.1-base VAE, 8x downsampling to 4 channels). There is no `small`
preset: the `train.py --small` recipe diffuses in pixel space (unet.PRESETS["small"] has 3 input channels).
"""
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import weights
from unet import Attention, DownBlock, MidBlock, UpBlock, config_from_json

# diffusers config fields we do not implement, with the only value we accept (their SD default)
UNSUPPORTED = {
    "act_fn": "silu", "mid_block_add_attention": True, "shift_factor": None, "latents_mean": None,
    "latents_std": None,
}


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)  # encoder order; every block but the last halves the side
    layers_per_block: int = 2  # resnets per encoder block (the decoder has one more)
    down_block_types: tuple = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple = ("UpDecoderBlock2D",) * 4
    norm_num_groups: int = 32
    sample_size: int = 512  # informational: the image side it was trained at
    scaling_factor: float = 0.18215  # latents are scaled by this before diffusion (unit variance)
    use_quant_conv: bool = True  # 1x1 convs around the latent
    use_post_quant_conv: bool = True

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        self.down_block_types, self.up_block_types = tuple(self.down_block_types), tuple(self.up_block_types)
        n = len(self.block_out_channels)
        problems = []
        if self.down_block_types != ("DownEncoderBlock2D",) * n:
            problems.append(f"down_block_types must be {n} x 'DownEncoderBlock2D', got {self.down_block_types}")
        if self.up_block_types != ("UpDecoderBlock2D",) * n:
            problems.append(f"up_block_types must be {n} x 'UpDecoderBlock2D', got {self.up_block_types}")
        problems += [f"{c} channels are not divisible by norm_num_groups {self.norm_num_groups}"
                     for c in self.block_out_channels if c % self.norm_num_groups]
        if problems:
            raise ValueError("VAEConfig: " + "; ".join(problems))

    @classmethod
    def from_json(cls, path, **overrides):
        """Read a diffusers `vae/config.json`; unsupported settings fail with the field and the file named."""
        return config_from_json(cls, path, "AutoencoderKL", UNSUPPORTED, overrides)


PRESETS = {
    "tiny": VAEConfig(block_out_channels=(8, 16), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=32),
    "paper": VAEConfig(),  # SD 2.1-base
}


class VAE(nn.Module):
    """Encoder to a diagonal Gaussian over latents, decoder back to pixels; pixels in [-1, 1]."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c)
        self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1) if c.use_post_quant_conv else None
        self.decoder = Decoder(c)

    def encode(self, x):
        """(B, in_channels, H, W) in [-1, 1] -> mean, logvar, each (B, latent_channels, H/f, W/f)."""
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"VAE.encode: x must be (B, {self.config.in_channels}, H, W) (config.in_channels), "
                             f"got {tuple(x.shape)}")
        moments = self.encoder(x)
        moments = self.quant_conv(moments) if self.quant_conv is not None else moments   # (B, 2·latent, h, w)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # diffusers clamps too, so exp() stays finite

    def decode(self, z):
        """(B, latent_channels, h, w) unscaled latents -> (B, out_channels, h·f, w·f), about [-1, 1]."""
        if z.dim() != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"VAE.decode: z must be (B, {self.config.latent_channels}, h, w) "
                             f"(config.latent_channels), got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z) if self.post_quant_conv is not None else z)

    def encode_latents(self, x, generator=None, sample=True):
        """Pixels in [-1, 1] -> a posterior sample times scaling_factor: what the diffusion model sees (ref. §5.2);
        with sample=False the posterior mean times scaling_factor (deterministic)."""
        mean, logvar = self.encode(x)
        if not sample:
            return mean * self.config.scaling_factor
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + (0.5 * logvar).exp() * noise) * self.config.scaling_factor

    def decode_latents(self, z):
        """Scaled latents -> pixels in [0, 1] (reference §5.5)."""
        return (self.decode(z / self.config.scaling_factor) / 2 + 0.5).clamp(0, 1)

    @classmethod
    def from_pretrained(cls, path, dtype=None):
        """Load a diffusers SD directory (reads `vae/`) or the vae folder itself; config from its config.json."""
        path = Path(path)
        folder = path / "vae" if (path / "vae").is_dir() else path
        config = VAEConfig.from_json(folder / "config.json")
        state, _ = weights.load_state(folder)
        with torch.device("meta"):
            model = cls(config)
        return weights.load_into(model, state, str(folder), dtype)


class Encoder(nn.Module):
    """conv_in -> blocks of ResnetBlocks with stride-2 downsampling -> mid block -> GroupNorm-SiLU-conv_out."""

    def __init__(self, c):
        super().__init__()
        ch, n, groups = c.block_out_channels, c.layers_per_block, c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([DownBlock(ch[max(i - 1, 0)], ch[i], n, None, groups, 1e-6,
                                                    downsample=i < len(ch) - 1, padding=0) for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], None, groups, 1e-6, lambda: SpatialSelfAttention(ch[-1], groups))
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.down_blocks:
            h, _ = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(h))))


class Decoder(nn.Module):
    """conv_in -> mid block -> blocks of ResnetBlocks with nearest ×2 upsampling -> GroupNorm-SiLU-conv_out."""

    def __init__(self, c):
        super().__init__()
        rch, n, groups = c.block_out_channels[::-1], c.layers_per_block, c.norm_num_groups
        self.conv_in = nn.Conv2d(c.latent_channels, rch[0], 3, padding=1)
        self.mid_block = MidBlock(rch[0], None, groups, 1e-6, lambda: SpatialSelfAttention(rch[0], groups))
        self.up_blocks = nn.ModuleList([UpBlock([rch[max(i - 1, 0)]] + [rch[i]] * n, rch[i], None, groups, 1e-6,
                                                upsample=i < len(rch) - 1) for i in range(len(rch))])
        self.conv_norm_out = nn.GroupNorm(groups, rch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(rch[-1], c.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class SpatialSelfAttention(Attention):
    """Single-head self-attention over the pixels, GroupNorm first, residual around it (diffusers Attention)."""

    def __init__(self, dim, groups):
        super().__init__(dim, heads=1, qkv_bias=True)
        self.group_norm = nn.GroupNorm(groups, dim, eps=1e-6)

    def forward(self, x, context=None):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)                                 # (B, H·W, C)
        h = super().forward(h)                                                            # (B, H·W, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)                                  # (B, C, H, W)
