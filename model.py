"""MMInterleaved: the whole model (paper §3, Fig. 2; reference §6.1) wired from the component files.

Read top-down: the config and its presets, then `MMInterleaved` in the order data flows through it:
  1. images -> ViT(+adapter) -> tokens and a feature pyramid -> neck + resampler -> K visual tokens per image;
  2. token ids -> embeddings with the visual tokens scattered into the `<image>` slots -> LLaMA with MMFS reading
     the pyramids of the images each token may see (§3.4) -> final-normed hidden states h;
  3. text: h -> text head -> next-token cross-entropy with the §3.5 label mask;
  4. images: per image, h from its segment's `<s>` to its `<BoI>`, reversed, projected, + 1-D sin-cos (§5.1) ->
     decoder resampler -> the UNet's condition tokens; the UNet's MMFS residuals read the previous image of the same
     segment (§5.3); diffusion MSE, none for an image that opens its segment (§5.4); CFG dropout to a learned
     negative condition;
  5. generation helpers for sample.py / eval.py: `generate_text` (KV cache, stops at `</s>` or `<BoI>`) and
     `generate_images` (one LLM pass, then the diffusion sampler with classifier-free guidance).

A batch (data.collate) is: `tokens` (B, L) right-padded with the pad id, `images` (ΣI, 3, S, S) in [0, 1] in
row-major order of their `<BoI>`s, `images_per_row` (B,). Every other index (segment starts, the previous image,
visibility) is derived from the token ids, so a hand-built sequence needs no extra bookkeeping.
"""
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import diffusion
import llm as llm_lib
import resampler as resampler_lib
import unet as unet_lib
import vae as vae_lib
import vit as vit_lib
import weights
from mmfs import sincos_1d, sincos_2d

# ----------------------------------------------------------------------------------------------------------------
# config


@dataclass
class MMConfig:
    vit: vit_lib.ViTConfig = field(default_factory=vit_lib.ViTConfig)
    resampler: resampler_lib.ResamplerConfig = field(default_factory=resampler_lib.ResamplerConfig)
    llm: llm_lib.LLaMAConfig = field(default_factory=llm_lib.LLaMAConfig)
    decoder: resampler_lib.ResamplerConfig = field(default_factory=lambda: resampler_lib.PRESETS["paper_decoder"])
    unet: unet_lib.UNetConfig = field(default_factory=lambda: unet_lib.PRESETS["paper"])
    vae: vae_lib.VAEConfig | None = field(default_factory=vae_lib.VAEConfig)  # None: diffuse in pixel space
    schedule: diffusion.Schedule = field(default_factory=diffusion.Schedule)
    image_size: int = 512  # the decoder's image side in pixels (the ViT resizes to its own vit.image_size)
    loss_txt_weight: float = 1.0
    loss_img_weight: float = 10.0
    uncond_prob: float = 0.1  # CFG training dropout: the condition becomes the learned negative (§5.1 step 4)
    min_snr_gamma: float = 0.0  # > 0: min-SNR-γ loss weights (Hang et al. 2023); the authors use none (0)
    # diffusion-loss weight of a text-to-image frame (no earlier image in its segment to copy through MMFS) against
    # a continuation's 1; the authors weight all images alike (1)
    t2i_loss_weight: float = 1.0
    # (timestep, noise) draws per image in a training step, each with the image's one condition: the UNet runs
    # noise_draws times as often while the ViT, the LLM and the decoder run once (MAR's "diffusion batch
    # multiplier", Li et al. 2024). The image loss is the mean over all draws. 1: one draw, as the authors
    noise_draws: int = 1
    # with noise_draws R > 1: draw r of an image takes its timestep from the r-th of R equal parts of [0, T)
    # (stratified), so every condition is trained at high and low noise in every step; False: R independent uniform
    # draws. The small recipe turns it on (train.py's preset table, README), the authors draw once (False)
    stratified_timesteps: bool = False
    # > 0 (with stratified_timesteps): t / T drawn logit-normal with this std around sigmoid(timestep_logit_mean)
    # instead of uniform (SD3's timestep sampling), so the UNet trains more often on the middle noise levels. The
    # small recipe's text-to-image misses are shapes, decided between t = 600 and 300 of 1000; (-0.2, 1) did not
    # draw them better and lost colour at the noisy end (EXPERIMENTS.md: "Logit-normal timesteps"). 0: uniform, as
    # the authors and the small recipe
    timestep_logit_std: float = 0.0
    timestep_logit_mean: float = 0.0
    # draws of a text-to-image frame (no earlier image in its segment: its drawing comes from the text alone), where
    # noise_draws then counts those of a continuation frame; each image's loss is still the mean over its own draws,
    # so only where the UNet's work goes changes, not the objective. 0: noise_draws for every frame (every preset)
    noise_draws_t2i: int = 0
    # small recipe: one more condition token, the mean of the projected context states, which also joins the UNet's
    # time embedding: a direct path past the decoder Q-Former, whose from-scratch outputs barely vary with the prompt
    pooled_condition: bool = False
    # an experiment, off in every preset: each of the K visual tokens also gets a linear view of one cell of the
    # neck's token grid pooled to √K × √K, a direct image path past the visual Q-Former, which from scratch is the
    # slowest image path to learn to read (bench/probe_visual.py; EXPERIMENTS.md: it fixes colour but not shape)
    pooled_visual: bool = False
    # small recipe: an auxiliary text loss. Each LLM state also names the `back_tokens` tokens before it (one linear
    # head per offset; the mean of their cross-entropies, weighted as the text loss). With the diffusion loss alone a
    # from-scratch LLM learns only slowly to bind "a small red square at the top left" into one object; naming the
    # tokens behind it makes a word's state hold its phrase ("red" is 5 tokens before "left"), which the condition
    # then carries (EXPERIMENTS.md: "What binds"). 0: off, as the authors
    back_tokens: int = 0
    # small recipe (4, session 32): each LLM state also names the `ahead_tokens` tokens after the next one (one
    # linear head per offset: multi-token prediction, Gloeckle et al. 2024; the mean of their cross-entropies over the
    # text loss's targets, within a document, weighted as the text loss; training only, sampling never reads them).
    # A caption names an object's shape before its place ("a big red circle at the top left."): a state that must
    # also name the place ahead has to find the object before the shape word, which is where the LLM's last MMFS
    # block should read. Seeds 0 / 1 / 2 name 96.1 / 96.3 / 94.6 % of the objects right against 94.6 / 69.9 / 89.5
    # without (EXPERIMENTS.md: "Naming the place ahead"). 0: off, as the authors
    ahead_tokens: int = 0
    # small recipe: the UNet's cross-attention also reads the `direct_context` context states nearest <BoI> (as the
    # decoder reads them: projected, + their 1-D positions; then direct_proj; zero past the segment start), next to
    # the decoder Q-Former's tokens. Alone it gains little; with back_tokens it carries the bound phrases the
    # from-scratch Q-Former does not pass on (EXPERIMENTS.md: "What binds"). 0: off, as the authors
    direct_context: int = 0
    # an experiment, off in every preset: in training, the UNet's MMFS is told a continuation frame has no previous
    # image with this probability, so that such a frame must be drawn from the condition. With MMFS a continuation
    # can copy its previous frame, and the text path learns mostly from first frames (EXPERIMENTS.md:
    # "Text-to-image is better without MMFS")
    mmfs_hide_prob: float = 0.0
    # an experiment, off in every preset: REPA (representation alignment, Yu et al. 2024). The UNet's last down-path
    # state on the repa_side map, through a small MLP (repa_proj), is pulled toward the ViT-Adapter's pyramid map of
    # that side for the clean frame it is drawing (1 - cosine per pixel; the pyramid detached, so the ViT is not
    # pulled back). That map is what the UNet's MMFS redraws an unmoved object from, so it holds each object's shape,
    # and the small recipe's text-to-image misses are shapes, decided at mid noise (EXPERIMENTS.md: "Where the
    # shapes are lost"). At 0.5 (one seed-0 run) it drew them worse, −8.1 ± 2.5 points found, and kept 3 more of
    # the unmoved objects (EXPERIMENTS.md: "Representation alignment"). repa_weight: the term's weight beside the text
    # and image losses; 0: off, as the authors and the small recipe
    repa_weight: float = 0.0
    repa_side: int = 16
    freeze_pretrained: bool = True  # paper: freeze CLIP, the LLM (not its MMFS blocks) and the VAE, as the authors
    # special ids of the tokenizer (the paper's are Vicuna's); <BoI> and <image> are the last two ids, llm.vocab_size-2/-1
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 31999

    @property
    def num_image_tokens(self):
        return self.resampler.num_queries

    @property
    def ids(self):
        v = self.llm.vocab_size
        return dict(bos=self.bos_id, eos=self.eos_id, pad=self.pad_id, boi=v - 2, image=v - 1)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        parts = {"vit": vit_lib.ViTConfig, "resampler": resampler_lib.ResamplerConfig, "llm": llm_lib.LLaMAConfig,
                 "decoder": resampler_lib.ResamplerConfig, "unet": unet_lib.UNetConfig, "vae": vae_lib.VAEConfig,
                 "schedule": diffusion.Schedule}
        kw = dict(d)
        for name, kind in parts.items():
            if kw.get(name) is not None:
                kw[name] = kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw[name].items()})
        return cls(**kw)

    @classmethod
    def from_metadata(cls, meta, file):
        """The config save_pretrained writes into a safetensors file's metadata (`file` names it in errors)."""
        if not meta or "config" not in meta:
            raise weights.WeightsError(f"{file}: no model config in the safetensors metadata (not an MMInterleaved "
                                       "checkpoint written by train.py)")
        try:
            return cls.from_dict(json.loads(meta["config"]))
        except (TypeError, ValueError) as e:
            raise weights.WeightsError(f"{file}: bad model config in the metadata ({e})") from None


def preset(name, **overrides):
    """A fresh MMConfig for "tiny" (tests), "small" (train.py --small) or "paper" (the released sizes)."""
    r = resampler_lib.PRESETS
    if name == "paper":
        cfg = MMConfig()
    elif name in ("tiny", "small"):
        cfg = MMConfig(vit=vit_lib.PRESETS[name], resampler=r[name], llm=llm_lib.PRESETS[name],
                       decoder=r[f"{name}_decoder"], unet=unet_lib.PRESETS[name], vae=None,
                       schedule=diffusion.PRESETS[name], image_size=unet_lib.PRESETS[name].sample_size,
                       pooled_condition=True, back_tokens=6, direct_context=40, freeze_pretrained=False, pad_id=3)
        if name == "small":  # the tiny preset leaves the heads to its own test (tests/test_model.py)
            cfg.ahead_tokens = 4
        if name == "tiny":  # a 5-frame story with a byte-level tiny tokenizer needs ~200 positions
            cfg.llm = dataclasses.replace(cfg.llm, max_seq_len=384)
            cfg.unet = dataclasses.replace(cfg.unet, in_channels=3, out_channels=3, sample_size=32)
            cfg.image_size = 32  # ShapeStories' smallest frames
        # widths follow the parts they connect: the pyramid has the ViT's width
        cfg.llm = dataclasses.replace(cfg.llm, image_dim=cfg.vit.hidden_size)
        cfg.unet = dataclasses.replace(cfg.unet, mmfs_value_dim=cfg.vit.hidden_size)
        cfg.resampler = dataclasses.replace(cfg.resampler, encoder_hidden_size=cfg.vit.hidden_size,
                                            output_size=cfg.llm.dim, hidden_dropout_prob=0.0,
                                            attention_probs_dropout_prob=0.0)  # from scratch, short runs: no dropout
        cfg.decoder = dataclasses.replace(cfg.decoder, encoder_hidden_size=cfg.llm.dim,
                                          hidden_size=cfg.unet.cross_attention_dim)
    else:
        raise ValueError(f"unknown preset {name!r}: choose tiny, small or paper")
    return copy_config(dataclasses.replace(cfg, **overrides))


def copy_config(cfg):
    """A deep copy, so editing a preset's sub-config never edits the PRESETS tables."""
    return MMConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))


def without_mmfs(cfg):
    """The --no-mmfs ablation: no MMFS blocks in the LLM, no MMFS residuals in the UNet."""
    cfg = copy_config(cfg)
    cfg.llm.mmfs_every, cfg.unet.mmfs = 0, False
    return cfg


def convolutions_in_bfloat16(net, when=lambda: True):
    """Run every convolution of `net` wider than 1x1 (the UNet's, the ViT-Adapter's) under CPU autocast to bfloat16
    while `when()` is true, its output back in float32; the backward follows the recorded casts, so the weights'
    gradients stay float32 (train.py --conv-bf16). oneDNN's bfloat16 convolutions are 2.5-5x faster on CPUs with
    AVX512-BF16 or AMX; its bfloat16 matrix products and attention are not, at this model's small and ever-changing
    shapes, so everything else stays float32 (EXPERIMENTS.md: "... and bfloat16 on its AMX"). 1x1 convolutions are
    matrix products: kept. Changes `net` in place (each module's forward); nothing in its weights or checkpoint."""
    def wrap(plain):
        def forward(x):
            if not when():
                return plain(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return plain(x).float()
        return forward
    for m in net.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1):
            m.forward = wrap(m.forward)


def check_reading(scale, window, iters):
    """Reading-guidance settings (generate_images) -> ValueError naming the bad one."""
    lo, hi = window
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"reading guidance scale must be a finite number >= 0, got {scale}")
    if not 0 <= lo <= hi:
        raise ValueError(f"reading guidance window must be timesteps 0 <= low <= high, got {lo},{hi}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"reading guidance iterations must be an int >= 1, got {iters!r}")


def parse_window(text):
    """A --read-window flag "LO,HI" -> (LO, HI) ints, or a ValueError that quotes it."""
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"reading guidance window {text!r}: expected two timesteps LO,HI, e.g. 300,900") from None
    return lo, hi


def ce_sum(logits, targets):
    """Summed cross-entropy of logits (..., V) against targets (...) in float32; -100 targets are skipped. The text
    losses are sums, divided by the global count of text targets, so that DDP ranks add up to the global mean."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=-100, reduction="sum")


# ----------------------------------------------------------------------------------------------------------------
# the model


class Neck(nn.Module):
    """Reference §4.3: post_ln(pos_ln(pos_proj(ViT tokens)) + fixed 2-D sin-cos with a zero CLS row)."""

    def __init__(self, dim, grid):
        super().__init__()
        self.pos_proj = nn.Linear(dim, dim)
        self.pos_ln = nn.LayerNorm(dim, eps=1e-6)
        self.post_ln = nn.LayerNorm(dim, eps=1e-6)
        self.dim, self.grid = dim, grid
        self.register_buffer("pos_embed", self.table(), persistent=False)

    def table(self):
        return torch.cat([torch.zeros(1, self.dim), sincos_2d(self.dim, self.grid, self.grid)])  # (1+g², dim)

    def forward(self, tokens):
        return self.post_ln(self.pos_ln(self.pos_proj(tokens)) + self.pos_embed.to(tokens.dtype))  # (n, 1+g², D)


class MMInterleaved(nn.Module):
    """Paper Fig. 2: ViT(+adapter) -> resampler -> LLaMA with MMFS -> text head; per image, its context -> decoder
    resampler -> UNet with MMFS residuals on the previous image. `forward` returns the training losses."""

    def __init__(self, cfg, parts=None):
        """`parts` (from_components) holds already-built "vit" / "llm" / "unet" / "vae" modules to use as they are."""
        super().__init__()
        self.cfg = cfg
        c = cfg
        parts = parts or {}
        if c.resampler.output_size != c.llm.dim or c.decoder.encoder_hidden_size != c.llm.dim:
            raise ValueError(f"MMConfig: resampler.output_size ({c.resampler.output_size}) and decoder."
                             f"encoder_hidden_size ({c.decoder.encoder_hidden_size}) must equal llm.dim ({c.llm.dim})")
        if c.decoder.hidden_size != c.unet.cross_attention_dim:
            raise ValueError(f"MMConfig: decoder.hidden_size ({c.decoder.hidden_size}) must equal "
                             f"unet.cross_attention_dim ({c.unet.cross_attention_dim})")
        if not 0 <= c.mmfs_hide_prob <= 1:  # `not` so that NaN fails too
            raise ValueError(f"MMConfig: mmfs_hide_prob {c.mmfs_hide_prob} is not a probability in [0, 1]")
        for name, low in (("noise_draws", 1), ("noise_draws_t2i", 0)):
            r = getattr(c, name)
            if isinstance(r, bool) or not isinstance(r, int) or r < low:
                raise ValueError(f"MMConfig: {name} {r!r} is not a whole number >= {low}")
        if not (0 <= c.timestep_logit_std < math.inf and math.isfinite(c.timestep_logit_mean)):  # NaN fails too
            raise ValueError(f"MMConfig: timestep_logit_std {c.timestep_logit_std} must be >= 0 and "
                             f"timestep_logit_mean {c.timestep_logit_mean} finite")
        if c.timestep_logit_std > 0 and not c.stratified_timesteps:
            raise ValueError("MMConfig: timestep_logit_std > 0 needs stratified_timesteps (its strata are drawn "
                             "from it)")
        if not 0 <= c.repa_weight < math.inf:  # NaN fails too
            raise ValueError(f"MMConfig: repa_weight {c.repa_weight} must be >= 0 and finite")
        if c.mmfs_hide_prob > 0 and not c.unet.mmfs:
            raise ValueError(f"MMConfig: mmfs_hide_prob {c.mmfs_hide_prob} needs the UNet's MMFS (unet.mmfs is off)")
        self.vit = parts["vit"] if "vit" in parts else vit_lib.ViTAdapter(c.vit)
        self.neck = Neck(c.vit.hidden_size, c.vit.grid)
        self.resampler = resampler_lib.Resampler(c.resampler)
        self.pooled_visual_proj = None
        if c.pooled_visual:
            side = math.isqrt(c.num_image_tokens)
            if side * side != c.num_image_tokens or c.vit.grid % side:
                raise ValueError(f"MMConfig: pooled_visual needs a square number of visual tokens whose side divides "
                                 f"the ViT grid {c.vit.grid}, got {c.num_image_tokens}")
            self.pooled_visual_proj = nn.Linear(c.vit.hidden_size, c.llm.dim)
            # N(0, 0.02) as the Q-Former's Linears; the Q-Former's own proj starts at 1e-3, so this path leads early
            nn.init.normal_(self.pooled_visual_proj.weight, std=c.resampler.initializer_range)
            nn.init.zeros_(self.pooled_visual_proj.bias)
        self.llm = parts["llm"] if "llm" in parts else llm_lib.LLaMA(c.llm)
        self.soi_token = nn.Parameter(torch.zeros(c.llm.dim))  # added to every <BoI> embedding; 0 at init (§3.2)
        # a frozen pretrained LLM keeps its lm_head and learns only the 2 new logits (§3.3); from scratch, it learns all
        self.text_head = llm_lib.TextHead(c.llm.dim, c.llm.vocab_size) if c.freeze_pretrained else None
        self.context_feat_proj = nn.Linear(c.llm.dim, c.llm.dim)  # PyTorch default init, as the authors
        self.register_buffer("context_pos", sincos_1d(c.llm.dim, c.llm.max_seq_len), persistent=False)
        self.decoder = resampler_lib.Resampler(c.decoder)
        # the learned negative condition for CFG; the authors start from CLIP-text(""), we start from 0
        n_cond = c.decoder.num_queries + c.direct_context + int(c.pooled_condition)  # the UNet's condition tokens
        self.neg_prompt_embeds = nn.Parameter(torch.zeros(1, n_cond, c.decoder.hidden_size))
        self.unet = parts["unet"] if "unet" in parts else unet_lib.UNet(c.unet)
        # small recipe: the mean context state becomes one more condition token (pooled_ctx_proj), and that token,
        # projected, joins the time embedding (pooled_proj): a global, easy-to-use signal for colour and shape
        self.pooled_ctx_proj = nn.Linear(c.llm.dim, c.decoder.hidden_size) if c.pooled_condition else None
        temb = 4 * c.unet.block_out_channels[0]
        self.pooled_proj = nn.Linear(c.decoder.hidden_size, temb) if c.pooled_condition else None
        if self.pooled_proj is not None:
            nn.init.zeros_(self.pooled_proj.weight)  # 0 at init: the UNet starts as the plain UNet
            nn.init.zeros_(self.pooled_proj.bias)
        self.vae = parts["vae"] if "vae" in parts else vae_lib.VAE(c.vae) if c.vae is not None else None
        if self.text_head is not None and not self.llm.lm_head.weight.is_meta:
            self.text_head.init_from(self.llm.lm_head)
        # back_heads[j - 1] reads state i and names token i - j (training only; PyTorch's default init)
        self.back_heads = (nn.ModuleList(nn.Linear(c.llm.dim, c.llm.vocab_size) for _ in range(c.back_tokens))
                           if c.back_tokens else None)
        # ahead_heads[j - 1] reads state i and names token i + 1 + j (training only; PyTorch's default init)
        self.ahead_heads = (nn.ModuleList(nn.Linear(c.llm.dim, c.llm.vocab_size) for _ in range(c.ahead_tokens))
                            if c.ahead_tokens else None)
        self.direct_proj = nn.Linear(c.llm.dim, c.decoder.hidden_size) if c.direct_context else None
        self.repa_proj = self.build_repa_proj() if c.repa_weight > 0 else None
        self.apply_freezing()

    def build_repa_proj(self):
        """REPA's projector (training only): UNet channels at repa_side -> the pyramid's width, an MLP of three
        Linears with SiLU as the authors'. Built last and on a forked RNG, so every other weight draws what it draws
        without it, and a run with the term pairs with its twin without."""
        c, u = self.cfg, self.cfg.unet
        sides = [u.sample_size >> k for k in range(len(u.block_out_channels))]  # each down block's map side
        if c.repa_side not in sides:
            raise ValueError(f"MMConfig: repa_side {c.repa_side} is not a side of the UNet's down path {sides}")
        if c.repa_side not in c.vit.pyramid_sizes:
            raise ValueError(f"MMConfig: repa_side {c.repa_side} is not a side of the ViT-Adapter's pyramid "
                             f"{list(c.vit.pyramid_sizes)}")
        dim, width = u.block_out_channels[sides.index(c.repa_side)], c.vit.hidden_size
        with torch.random.fork_rng(devices=[]):
            return nn.Sequential(nn.Linear(dim, 2 * width), nn.SiLU(), nn.Linear(2 * width, 2 * width), nn.SiLU(),
                                 nn.Linear(2 * width, width))

    def init_buffers(self):
        """Recompute the derived (non-persistent) tables, e.g. after building on the meta device and loading."""
        dev = self.soi_token.device
        with torch.device(dev):
            self.neck.pos_embed = self.neck.table()
            self.context_pos = sincos_1d(self.cfg.llm.dim, self.cfg.llm.max_seq_len)
        self.llm._init_buffers()

    def apply_freezing(self):
        """Paper preset: train the adapter, resamplers, MMFS blocks, new-token head and the image decoder (§7.2)."""
        if not self.cfg.freeze_pretrained:
            return
        for name, p in self.vit.named_parameters():
            p.requires_grad_(name.startswith("adapter_"))
        for name, p in self.llm.named_parameters():
            p.requires_grad_(".llama_cross_attn." in name)
        if self.vae is not None:
            self.vae.requires_grad_(False)
        self.text_head.head.requires_grad_(False)

    # ---------------------------------------------------------------------------------------------- encoding

    def encode_images(self, images):
        """[0, 1] images (n, 3, S, S) -> visual tokens (n, K, llm.dim) and the pyramid, a list of (n, C, s, s)."""
        size = self.cfg.vit.image_size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        tokens, pyramid = self.vit(images)                                                 # (n, 1+N, D), [...]
        neck = self.neck(tokens)                                                           # (n, 1+g², D)
        visual = self.resampler(neck)                                                      # (n, K, dim)
        if self.pooled_visual_proj is not None:  # + one linear token per cell of a √K × √K grid, row-major
            n, g, side = neck.shape[0], self.cfg.vit.grid, math.isqrt(visual.shape[1])
            grid = neck[:, 1:].transpose(1, 2).reshape(n, -1, g, g)                        # (n, D, g, g)
            cells = F.adaptive_avg_pool2d(grid, side).flatten(2).transpose(1, 2)           # (n, K, D)
            visual = visual + self.pooled_visual_proj(cells)                               # (n, K, dim)
        return visual, pyramid

    def unread_pyramid_levels(self):
        """Sides of the adapter's pyramid maps that no MMFS reads (all of them with --no-mmfs). The parameters that only
        build an unread map (the finest: adapter_up, the stem's fc1; every map: the last interaction's extractors) then
        get no gradient, which train.py tells DDP."""
        read = set(self.cfg.llm.mmfs_levels) if self.cfg.llm.mmfs_every > 0 else set()
        if any(isinstance(m, unet_lib.MMFSBlock) for m in self.unet.modules()):  # each block reads every level
            read |= set(self.cfg.unet.mmfs_levels)
        return sorted(set(self.cfg.unet.mmfs_levels) - read, reverse=True)

    def _pyramid_levels(self, pyramid, sizes):
        """The pyramid maps whose side is in `sizes`, in that order (the LLM reads 3 of the 4 levels, §0)."""
        by_size = {p.shape[-1]: p for p in pyramid}
        missing = [s for s in sizes if s not in by_size]
        if missing:
            raise ValueError(f"MMInterleaved: MMFS wants pyramid levels {list(sizes)}, the ViT gives "
                             f"{sorted(by_size, reverse=True)}")
        return [by_size[s] for s in sizes]

    def llm_inputs(self, tokens, visual, pyramid, images_per_row):
        """Embeddings with visual tokens inserted, the per-row MMFS values (B, n_max, Σs², C) and visibility."""
        c = self.cfg.llm
        tok = self.cfg.ids
        embeds = self.llm.model.embed_tokens(tokens)                                       # (B, T, dim)
        if visual is None:
            visual = embeds.new_zeros(0, self.cfg.num_image_tokens, c.dim)
        embeds = llm_lib.insert_visual_tokens(embeds, tokens, visual, tok["image"], tok["boi"], self.soi_token)
        if c.mmfs_every == 0 or visual.shape[0] == 0:
            return embeds, None, None
        B, n_max = tokens.shape[0], max(int(max(images_per_row)), 1)
        levels = self._pyramid_levels(pyramid, c.mmfs_levels)
        flat = torch.cat([lv.flatten(2).transpose(1, 2) for lv in levels], dim=1)          # (ΣI, Σs², C)
        values = flat.new_zeros(B, n_max, *flat.shape[1:])                                 # (B, n_max, Σs², C)
        rows = torch.repeat_interleave(torch.arange(B), torch.as_tensor(images_per_row))    # (ΣI,)
        slot = torch.cat([torch.arange(int(k)) for k in images_per_row]).long()             # (ΣI,)
        values[rows, slot] = flat
        mask = llm_lib.image_visibility(tokens, tok["bos"], tok["boi"], n_max, images_per_row)  # (B, T, n_max)
        return embeds, values, mask

    def logits(self, h):
        return self.text_head(h) if self.text_head is not None else self.llm.lm_head(h)

    # ---------------------------------------------------------------------------------------------- bookkeeping

    def image_index(self, tokens, images_per_row):
        """Per image (row-major): row, <BoI> position, segment start (its last <s>, else 0), previous image of the
        same segment (-1 if none). Only the first images_per_row[b] <BoI>s of row b are images."""
        ids = self.cfg.ids
        B, T = tokens.shape
        pos = torch.arange(T, device=tokens.device)
        seg = torch.where(tokens == ids["bos"], pos, 0).cummax(1).values                     # (B, T): last <s> or 0
        is_boi = tokens == ids["boi"]
        rank = is_boi.long().cumsum(1) - 1
        limit = torch.as_tensor(images_per_row, device=tokens.device)[:, None]
        rows, cols = (is_boi & (rank < limit)).nonzero(as_tuple=True)                      # row-major order
        if rows.numel() != int(sum(images_per_row)):
            raise ValueError(f"MMInterleaved: images_per_row {list(map(int, images_per_row))} but the rows hold "
                             f"{is_boi.sum(1).tolist()} <BoI> tokens")
        start = seg[rows, cols]                                                            # (ΣI,)
        prev = torch.arange(rows.numel(), device=tokens.device) - 1                        # (ΣI,)
        same = (prev >= 0) & (rows[prev.clamp(min=0)] == rows) & (cols[prev.clamp(min=0)] >= start)
        return rows, cols, start, torch.where(same, prev, -1)

    def text_labels(self, tokens):
        """Reference §3.5: targets tokens[:, 1:], ignored (-100) at pad, <image>, <s> and <s> -> <BoI>."""
        ids = self.cfg.ids
        inp, tgt = tokens[:, :-1], tokens[:, 1:].clone()
        ignore = (tgt == ids["pad"]) | (tgt == ids["image"]) | (tgt == ids["bos"])
        ignore |= (inp == ids["bos"]) & (tgt == ids["boi"])
        return tgt.masked_fill(ignore, -100)                                               # (B, T-1)

    def image_condition(self, h, rows, cols, start):
        """§5.1: h[row, start..<BoI>] reversed, projected, + 1-D sin-cos -> decoder -> (ΣI, Q, ctx) and lengths;
        with direct_context N, + N tokens straight from the nearest states; with pooled_condition, + the mean
        projected context state as the last token."""
        lengths = cols - start + 1                                                         # (ΣI,)
        L = int(lengths.max())
        j = torch.arange(L, device=h.device)
        idx = (cols[:, None] - j[None, :]).clamp(min=0)                                    # (ΣI, L): reversed
        valid = j[None, :] < lengths[:, None]                                              # (ΣI, L)
        ctx = h[rows[:, None], idx] * valid[..., None]                                     # (ΣI, L, dim)
        feats = self.context_feat_proj(ctx)                                                # (ΣI, L, dim)
        mask = valid.to(feats.dtype)
        cond = self.decoder(feats + self.context_pos[:L].to(ctx.dtype), mask)             # (ΣI, Q, ctx)
        if self.direct_proj is not None:  # the N states nearest <BoI>, past the decoder (zero-padded to N)
            N = self.cfg.direct_context
            near = feats[:, :N] + self.context_pos[:min(L, N)].to(ctx.dtype)              # (ΣI, ≤N, dim)
            near = self.direct_proj(near) * mask[:, :N, None]                              # (ΣI, ≤N, ctx)
            cond = torch.cat([cond, F.pad(near, (0, 0, 0, N - near.shape[1]))], 1)         # (ΣI, Q + N, ctx)
        if self.pooled_ctx_proj is not None:
            mean = (feats * mask[..., None]).sum(1) / lengths[:, None].to(feats.dtype)      # (ΣI, dim)
            cond = torch.cat([cond, self.pooled_ctx_proj(mean)[:, None]], 1)              # (ΣI, Q (+N) + 1, ctx)
        return cond, lengths

    def unet_forward(self, x, t, cond, mmfs_features=None, mmfs_mask=None, tap=None):
        extra = None
        if self.pooled_proj is not None:  # the last condition token is the pooled context (or its learned negative)
            extra = self.pooled_proj(cond[:, -1])                                          # (B, 4·C0)
        return self.unet(x, t, cond, mmfs_features, mmfs_mask, temb_extra=extra, tap=tap)

    def repa_loss(self, state, target):
        """REPA: 1 - cosine between repa_proj(the UNet's state) (n, C, s, s) and the clean frame's pyramid map
        (n, C_img, s, s), per pixel -> (n,) the mean over each frame's pixels. The map's fixed 2-D sin-cos position
        (the same for every frame) is taken out first: the term is to teach what is drawn where, not where."""
        s = target.shape[-1]
        pos = vit_lib._pyramid_pos(target.shape[1], self.cfg.vit.grid, s, target.device, target.dtype)  # (C, s, s)
        z = self.repa_proj(state.flatten(2).transpose(1, 2))                               # (n, s², C_img)
        y = (target.detach() - pos).flatten(2).transpose(1, 2)                             # (n, s², C_img)
        return 1 - F.cosine_similarity(z.float(), y.float(), dim=-1).mean(1)               # (n,)

    def previous_features(self, pyramid, prev):
        """The UNet MMFS input of each image: the previous image's pyramid levels (n, 1, C, s, s) and mask (n, 1);
        prev[i] indexes the pyramid, -1 = no previous image (zero features, masked)."""
        u = self.cfg.unet
        if not u.mmfs:
            return None, None
        has = prev >= 0
        if not pyramid:  # no image at all (text-to-image from text alone)
            z = self.soi_token.new_zeros(prev.shape[0], 1, u.mmfs_value_dim)
            return [z[..., None, None].expand(-1, -1, -1, s, s) for s in u.mmfs_levels], has[:, None].to(z.dtype)
        levels = self._pyramid_levels(pyramid, u.mmfs_levels)
        feats = [(lv[prev.clamp(min=0)] * has[:, None, None, None].to(lv.dtype))[:, None] for lv in levels]
        return feats, has[:, None].to(levels[0].dtype)

    def to_diffusion_space(self, images, sample=True):
        """[0, 1] images -> what the UNet denoises: [-1, 1] pixels, or VAE latents (posterior sample · 0.18215, or
        with sample=False the posterior mean · 0.18215: the same latents on every call)."""
        size = self.cfg.image_size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        x = images * 2 - 1
        if self.vae is None:
            return x
        with torch.no_grad():
            return self.vae.encode_latents(x.to(next(self.vae.parameters()).dtype), sample=sample).to(images.dtype)

    @property
    def diffusion_shape(self):
        """(C, s, s) of one image where the UNet works: the pixels, or the VAE's latents (every encoder block but the
        last halves the side: 1/8 of it in SD)."""
        down = 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)
        side = self.cfg.image_size // down
        return (self.cfg.unet.in_channels, side, side)

    def from_diffusion_space(self, x):
        if self.vae is None:
            return ((x + 1) / 2).clamp(0, 1)
        return self.vae.decode_latents(x.to(next(self.vae.parameters()).dtype)).float()

    # ---------------------------------------------------------------------------------------------- training

    def hidden_states(self, tokens, images, images_per_row):
        """Steps 1-2: the LLM's final-normed states (B, T, dim) over the interleaved sequence, and the pyramid."""
        visual, pyramid = self.encode_images(images) if len(images) else (None, [])        # (ΣI, K, dim), [...]
        embeds, values, mask = self.llm_inputs(tokens, visual, pyramid, images_per_row)
        return self.llm.hidden(inputs_embeds=embeds, images=values, image_mask=mask), pyramid

    @property
    def max_draws(self):
        """R, the draws made for every image in a step: noise_draws, or noise_draws_t2i when that is larger."""
        return max(self.cfg.noise_draws, self.cfg.noise_draws_t2i)

    def image_draws(self, prev):
        """(ΣI,) the draws each image uses, from prev (ΣI,) (its previous image, -1 for none): noise_draws_t2i for
        a text-to-image frame when that is set, else noise_draws."""
        c = self.cfg
        return torch.full_like(prev, c.noise_draws).masked_fill((prev < 0) & (c.noise_draws_t2i > 0),
                                                                 c.noise_draws_t2i)

    def draws(self, x0, images_per_row, generator=None, n_draws=None):
        """The random draws of a training step, max_draws (R) per image: CFG dropout (R·ΣI,) bool, timesteps
        (R·ΣI,; with stratified_timesteps draw r of an image that uses n of them in the r-th of n parts of [0, T)),
        noise (R·ΣI, C, s, s), and which draws MMFS makes without their previous image (R·ΣI,) bool (drawn last, and
        only when mmfs_hide_prob > 0, so the other draws do not depend on it). Draw r of image i is at
        r·ΣI + i; with R = 1 that is simply image i.

        `generator` is one torch.Generator or one per row; per-row generators make a row's draws independent of
        which other rows share its batch, so DDP ranks draw exactly what one process would. `n_draws` (ΣI,): the
        draws each image uses (image_draws; default R each), which sets its strata."""
        n_draws = torch.full((x0.shape[0],), self.max_draws) if n_draws is None else n_draws
        gens = generator if isinstance(generator, (list, tuple)) else [generator]
        counts = list(map(int, images_per_row)) if len(gens) > 1 else [x0.shape[0]]
        drop, t, noise, hide = [], [], [], []
        p_hide, R = self.cfg.mmfs_hide_prob, self.max_draws
        ln = (self.cfg.timestep_logit_mean, self.cfg.timestep_logit_std) if self.cfg.timestep_logit_std > 0 else None
        for gen, k, n in zip(gens, counts, n_draws.split(counts), strict=True):
            dev = gen.device if gen is not None else x0.device
            drop.append(torch.rand(R, k, generator=gen, device=dev) < self.cfg.uncond_prob)
            t.append(diffusion.stratified_timesteps(R, k, self.cfg.schedule, gen, dev, parts=n, logit_normal=ln)
                     if self.cfg.stratified_timesteps else
                     diffusion.sample_timesteps(R * k, self.cfg.schedule, gen, dev).view(R, k))
            noise.append(torch.randn((R, k, *x0.shape[1:]), generator=gen, device=dev))
            hide.append(torch.rand(R, k, generator=gen, device=dev) < p_hide if p_hide > 0 else
                        torch.zeros(R, k, dtype=torch.bool))
        # rows side by side, then draw-major: (R, ΣI, ...) -> (R·ΣI, ...)
        drop, t, noise, hide = (torch.cat(d, 1).flatten(0, 1) for d in (drop, t, noise, hide))
        return drop.to(x0.device), t.to(x0.device), noise.to(x0.device, x0.dtype), hide.to(x0.device)

    def forward(self, tokens, images, images_per_row, generator=None, counts=None):
        """Training losses (§6.1) -> dict(loss, loss_txt, loss_img, n_txt, n_img).

        `generator` (one, or a list with one per row) draws the timesteps, noise and CFG dropout. `counts` =
        (text targets, images) over the whole global batch (DDP): the losses are then sums divided by those, so
        the ranks' average is the global mean."""
        c = self.cfg
        h, pyramid = self.hidden_states(tokens, images, images_per_row)                   # (B, T, dim), [...]
        labels = self.text_labels(tokens)                                                  # (B, T-1)
        logits = self.logits(h[:, :-1])                                                    # (B, T-1, V)
        ce = ce_sum(logits, labels)
        n_txt = int((labels != -100).sum())
        back = self.back_loss(tokens, h) if self.back_heads is not None else h.sum() * 0
        ahead = self.ahead_loss(tokens, labels, h) if self.ahead_heads is not None else h.sum() * 0

        rows, cols, start, prev = self.image_index(tokens, images_per_row)
        n_img = int(rows.numel())
        if n_img:
            cond, lengths = self.image_condition(h, rows, cols, start)                     # (ΣI, Q, ctx)
            x0 = self.to_diffusion_space(images)                                           # (ΣI, C, s, s)
            n_draws = self.image_draws(prev)                                               # (ΣI,)
            drop, t, noise, hide = self.draws(x0, images_per_row, generator, n_draws)      # (R·ΣI, ...)
            R = self.max_draws  # each image R times over, with its one condition
            x0, cond, prev = x0.repeat(R, 1, 1, 1), cond.repeat(R, 1, 1), prev.repeat(R)
            cond = torch.where(drop[:, None, None], self.neg_prompt_embeds.to(cond.dtype), cond)  # learned negative
            # §5.4: no loss for a segment-opening image (context <s><BoI> only), so the UNet skips those, and none
            # for draws past an image's own count; the draws above were made for every image and all R, so which
            # draws are kept never shifts another one's noise
            draw = torch.arange(R, device=x0.device).repeat_interleave(n_img)             # (R·ΣI,) r of each draw
            n_draws = n_draws.repeat(R)                                                    # (R·ΣI,)
            counted = (lengths > 2).repeat(R) & (draw < n_draws)                           # (R·ΣI,)
            keep = counted.nonzero(as_tuple=True)[0] if counted.any() else counted.new_zeros(1).long()  # (n,)
            x0, t, noise, cond, prev, n_draws = x0[keep], t[keep], noise[keep], cond[keep], prev[keep], n_draws[keep]
            feats, fmask = self.previous_features(pyramid, prev.masked_fill(hide[keep], -1))  # mmfs_hide_prob
            x_t = diffusion.q_sample(x0, t, noise, c.schedule)
            if self.repa_proj is None:
                pred = self.unet_forward(x_t, t, cond, feats, fmask)
            else:  # draw k of the kept ones is image keep[k] % ΣI, whose own pyramid map is the target
                pred, state = self.unet_forward(x_t, t, cond, feats, fmask, tap=c.repa_side)
                aligned = self.repa_loss(state, self._pyramid_levels(pyramid, [c.repa_side])[0][keep % n_img])
            target = diffusion.training_target(x0, noise, t, c.schedule)
            per_image = (pred.float() - target.float()).pow(2).flatten(1).mean(1)           # (n,)
            if c.min_snr_gamma > 0:
                per_image = per_image * diffusion.min_snr_weight(t, c.schedule, c.min_snr_gamma).to(per_image.device)
            # none counted: the UNet still ran on one image, weighted 0, so every parameter has a gradient (DDP);
            # a text-to-image frame (no earlier image in its segment) weighs t2i_loss_weight; each draw 1 / its
            # image's draws, so that an image's loss is the mean over its draws
            weight = counted[keep] * torch.where(prev < 0, c.t2i_loss_weight, 1.0) / n_draws  # (n,)
            mse = (per_image * weight.to(per_image.dtype)).sum()
            repa = (aligned * weight.to(aligned.dtype)).sum() if self.repa_proj is not None else h.sum() * 0
        else:
            mse = repa = h.sum() * 0
        tot_txt, tot_img = counts if counts is not None else (n_txt, n_img)
        loss_txt = ce / max(tot_txt, 1)
        loss_back = back / max(tot_txt, 1)  # per text target, as loss_txt, so DDP ranks add up to the global mean
        loss_ahead = ahead / max(tot_txt, 1)
        loss_img = mse / max(tot_img, 1)  # mean over the images of each one's mean over its draws, masked ones included
        loss_repa = repa / max(tot_img, 1)  # weighted as loss_img
        loss = c.loss_txt_weight * (loss_txt + loss_back + loss_ahead) + c.loss_img_weight * loss_img
        if self.repa_proj is not None:
            loss = loss + c.repa_weight * loss_repa
        return dict(loss=loss, loss_txt=loss_txt.detach(), loss_back=loss_back.detach(),
                    loss_ahead=loss_ahead.detach(), loss_img=loss_img.detach(), loss_repa=loss_repa.detach(),
                    n_txt=n_txt, n_img=n_img)

    def back_loss(self, tokens, h):
        """MMConfig.back_tokens: state i names token i - j for j = 1..N -> the summed cross-entropy over every
        (state, offset) whose target is text (not <image> or pad) and whose state is not a pad, / N."""
        ids, total = self.cfg.ids, 0
        for j, head in enumerate(self.back_heads, 1):
            tgt = tokens[:, :-j]                                                           # (B, T-j)
            bad = (tgt == ids["pad"]) | (tgt == ids["image"]) | (tokens[:, j:] == ids["pad"])
            logits = head(h[:, j:])                                                        # (B, T-j, V)
            total = total + ce_sum(logits, tgt.masked_fill(bad, -100))
        return total / len(self.back_heads)

    def ahead_loss(self, tokens, labels, h):
        """MMConfig.ahead_tokens: state i names token i + 1 + j for j = 1..N -> the summed cross-entropy over every
        (state, offset) whose target the text loss counts (labels (B, T-1), -100 = ignored) and lies in the state's
        own document (no <s> between them), / N."""
        doc = (tokens == self.cfg.ids["bos"]).cumsum(1)                                   # (B, T) document index
        total = 0
        for j, head in enumerate(self.ahead_heads, 1):
            tgt = labels[:, j:]                                                            # (B, T-1-j): token i+1+j
            tgt = tgt.masked_fill(doc[:, :-1 - j] != doc[:, 1 + j:], -100)                 # not across documents
            logits = head(h[:, :-1 - j])                                                   # (B, T-1-j, V)
            total = total + ce_sum(logits, tgt)
        return total / len(self.ahead_heads)

    # ---------------------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate_text(self, tokens, images, max_new_tokens=30, temperature=0.0, top_p=1.0, generator=None):
        """Continue rows of equal length (B, T) whose <BoI>s all have their images (row-major in `images`) ->
        per row the new ids, each ending at its first `</s>` or `<BoI>` (§3.6) if one came."""
        ids = self.cfg.ids
        per_row = (tokens == ids["boi"]).sum(1).tolist()
        visual, pyramid = self.encode_images(images) if images is not None and len(images) else (None, [])
        embeds, values, _ = self.llm_inputs(tokens, visual, pyramid, per_row)
        banned = torch.tensor([ids["image"], ids["pad"], ids["bos"]], device=tokens.device)

        def head(h):  # never sample a placeholder (its image would be missing), a pad or a new <s>
            return self.logits(h).index_fill(-1, banned, float("-inf"))
        return llm_lib.generate(self.llm, tokens, max_new_tokens, stop_ids=(ids["eos"], ids["boi"]),
                                inputs_embeds=embeds, images=values, bos_id=ids["bos"], boi_id=ids["boi"],
                                temperature=temperature, top_p=top_p, generator=generator, head=head)

    def right_padded(self, rows):
        """Id lists -> (B, T) long on the model's device, each row padded on the right to the longest."""
        tokens = torch.full((len(rows), max(map(len, rows))), self.cfg.ids["pad"], dtype=torch.long,
                            device=self.soi_token.device)
        for b, r in enumerate(rows):
            tokens[b, :len(r)] = torch.tensor(r, device=tokens.device)
        return tokens

    @torch.no_grad()
    def prompt_conditions(self, prompts, images):
        """One LLM pass over prompts that each end with <BoI> (id lists; images[b] the given images of prompt b,
        (n_b, 3, S, S) in [0, 1]) -> the UNet condition of each final <BoI> (B, Q, ctx) and the UNet's MMFS inputs
        (the previous image of its segment) as keyword arguments of unet_forward."""
        ids = self.cfg.ids
        if any(not p or p[-1] != ids["boi"] for p in prompts):
            raise ValueError("every prompt must end with <BoI> (the image to draw)")
        tokens = self.right_padded(prompts)                                                # (B, T)
        dev = tokens.device
        per_row = [len(im) for im in images]
        flat = torch.cat([im.to(dev) for im in images]) if sum(per_row) else None
        h, pyramid = self.hidden_states(tokens, flat if flat is not None else [], per_row)  # (B, T, dim), [...]
        # the target images: each prompt's last <BoI>, which has no image yet (one more than the given ones)
        ends = torch.tensor([len(p) - 1 for p in prompts], device=dev)
        rows, cols, start, prev = self.image_index(tokens, [k + 1 for k in per_row])
        target = (cols == ends[rows]).nonzero().squeeze(1)                                  # (B,) image indices
        cond, _ = self.image_condition(h, rows[target], cols[target], start[target])     # (B, Q, ctx)
        prev_t = prev[target]
        # image_index counted the targets too: each earlier row added one, so subtract the row to index `flat`
        feats, fmask = self.previous_features(pyramid, torch.where(prev_t >= 0, prev_t - rows[target], -1))
        return cond, (dict(mmfs_features=feats, mmfs_mask=fmask) if feats is not None else {})

    @torch.no_grad()
    def generate_images(self, prompts, images, steps=20, guidance=3.0, sampler="ddim", generator=None,
                        callback=None, start=None, read_texts=None, read_scale=0.3, read_window=(300, 900),
                        read_iters=4):
        """Draw the image each prompt ends in (prompts and images as prompt_conditions takes them): one LLM pass
        gives the condition, then DDPM/DDIM with CFG, MMFS reading the previous image of the segment
        -> (B, 3, image_size, image_size) in [0, 1]. `start` = (frames (B, 3, S, S) in [0, 1], t): begin from those
        frames noised to timestep t instead of from pure noise (SDEdit; bench/probe_drawing.py --from-truth).

        Reading guidance (`read_texts`, one id list per prompt: what each drawing should read as, e.g. the scene
        sentence): at every sampling step whose timestep lies in `read_window` (inclusive, in training timesteps),
        `read_iters` reading_steps of size `read_scale` move the step's x0 estimate toward a frame the model itself
        captions as that text. Off with read_texts None or read_scale 0."""
        c = self.cfg
        x0_fn = None
        if read_texts is not None and read_scale != 0:
            check_reading(read_scale, read_window, read_iters)
            if len(read_texts) != len(prompts):
                raise ValueError(f"read_texts has {len(read_texts)} texts for {len(prompts)} prompts")
            lo, hi = read_window

            def x0_fn(x0, t):  # the sampler's hook: only in the window, where shapes are decided (EXPERIMENTS.md)
                if lo <= t <= hi:
                    for _ in range(read_iters):
                        x0 = self.reading_step(x0, read_texts, read_scale)
                return x0
        cond, unet_kw = self.prompt_conditions(prompts, images)
        shape = (len(prompts), *self.diffusion_shape)
        if guidance == 1:
            model_fn = lambda x, t: self.unet_forward(x, t, cond, **unet_kw)  # noqa: E731
        else:
            model_fn = diffusion.cfg_model(self.unet_forward, cond, self.neg_prompt_embeds.to(cond.dtype), **unet_kw)
        x_T, t_start = None, None
        if start is not None:
            frames, t_start = start
            x0 = self.to_diffusion_space(frames.to(cond.device, cond.dtype))               # (B, C, s, s)
            noise = diffusion._randn(x0.shape, generator, x0.device, x0.dtype)  # as the sampler draws its noise
            x_T = diffusion.q_sample(x0, torch.full((len(x0),), t_start, device=x0.device), noise, c.schedule)
        x = diffusion.sample(model_fn, shape, c.schedule, steps, sampler, guidance=guidance, generator=generator,
                             callback=callback, x_T=x_T, t_start=t_start, device=cond.device, dtype=cond.dtype,
                             x0_fn=x0_fn)
        return self.from_diffusion_space(x)

    def reading_step(self, x0, texts, scale):
        """One step of reading guidance: x0 (B, C, s, s), a sampler's clean-image estimate in diffusion space, moved
        by `scale` (the RMS of the move per image, in those units) up the gradient of log p(text | decoded x0), the
        model reading its own drawing as a caption (caption_logprob's pass) -> the moved x0, detached.

        The gradient stops at x0, so the UNet is not differentiated: the "backward guidance" of Universal Guidance
        (Bansal et al. 2023). It is the best-of-K ranker (eval.py --rerank) used as a direction instead of a choice:
        in the small recipe the drawings come out as the right blobs in the wrong shapes, which the reading tells
        apart (EXPERIMENTS.md, "Reading guidance")."""
        z = x0.detach().requires_grad_()
        with torch.enable_grad():
            lp = self._text_logprob(self._caption_rows(texts), self.from_diffusion_space(z), [len(t) for t in texts])
            grad, = torch.autograd.grad(lp.sum(), z)                                       # (B, C, s, s)
        rms = grad.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12)                      # (B,)
        return (z + scale * grad / rms.view(-1, *[1] * (z.dim() - 1))).detach()

    @torch.no_grad()
    def text_logprob(self, rows, images, scored):
        """log p of the last scored[b] tokens of each row given all before them, one teacher-forced LLM pass (rows:
        id lists whose <BoI>s all have their image, row-major in `images` (ΣI, 3, S, S) in [0, 1]) -> (B,) float.
        With the frame first and its sentence last (caption_logprob) the model reads its own drawings back."""
        return self._text_logprob(rows, images, scored)

    def _text_logprob(self, rows, images, scored):
        """text_logprob with autograd left as the caller has it (reading_step differentiates it in the image)."""
        ids = self.cfg.ids
        if any(not 0 < k < len(r) for r, k in zip(rows, scored, strict=True)):
            raise ValueError("text_logprob: each row scores at least one token and keeps at least one before them")
        tokens = self.right_padded(rows)                                                   # (B, T)
        targets = torch.full_like(tokens[:, 1:], -100)                                     # (B, T-1): token i+1
        for b, (r, k) in enumerate(zip(rows, scored)):
            targets[b, len(r) - 1 - k:len(r) - 1] = tokens[b, len(r) - k:len(r)]
        per_row = (tokens == ids["boi"]).sum(1).tolist()
        h, _ = self.hidden_states(tokens, images.to(tokens.device) if len(images) else [], per_row)  # (B, T, dim)
        logp = self.logits(h[:, :-1]).float().log_softmax(-1)                             # (B, T-1, V)
        picked = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)             # (B, T-1)
        return picked.masked_fill(targets < 0, 0).sum(1)

    def caption_logprob(self, images, texts):
        """log p(text | image) with the image first, as in a caption document `<s><BoI><image>*K text` (images
        (B, 3, S, S) in [0, 1], texts id lists) -> (B,): how eval.py and sample.py --rerank rank drawings."""
        return self.text_logprob(self._caption_rows(texts), images, [len(t) for t in texts])

    def _caption_rows(self, texts):
        """Text id lists -> caption documents `<s><BoI><image>*K text`, one per text."""
        ids, k = self.cfg.ids, self.cfg.num_image_tokens
        return [[ids["bos"], ids["boi"]] + [ids["image"]] * k + list(t) for t in texts]

    @torch.no_grad()
    def drawing_nll(self, images, texts, timesteps, noise):
        """How well a text explains an image to the UNet: images (B, 3, S, S) in [0, 1], texts id lists (the
        condition of `<s> text <BoI>`, as in text-to-image), timesteps (L,) long in [1, T), noise (B, L, C, s, s) in
        diffusion space -> (B,) float64, an estimate of -log p(image | text) in nats, up to a constant that is the
        same for every text: the diffusion ELBO, T · mean over the L draws of 1/2 (SNR(t-1) - SNR(t)) ·
        ||x0 - x0_hat(x_t)||^2 (diffusion.elbo_weight; the sum over the image's elements, of the VAE's latents
        where there is a VAE).

        Comparing texts by it is a "diffusion classifier" (Li et al. 2023); give the texts of one image the same
        noise, so that they differ by their words alone. Spread the timesteps over the schedule: the weight grows
        fast toward t = 0, where the error barely depends on the text."""
        ids, sched = self.cfg.ids, self.cfg.schedule
        prompts = [[ids["bos"]] + list(t) + [ids["boi"]] for t in texts]
        cond, kw = self.prompt_conditions(prompts, [images.new_zeros(0, *images.shape[1:])] * len(texts))
        # the posterior mean where there is a VAE: a frame's texts must see the same x0, not one sample each
        x0 = self.to_diffusion_space(images.to(cond.device), sample=False).to(cond.dtype)  # (B, C, s, s)
        noise, a = noise.to(x0), sched.alphas_cumprod
        terms = []
        for i, t in enumerate(timesteps.tolist()):
            tt = torch.full((len(x0),), t, device=x0.device)
            xt = diffusion.q_sample(x0, tt, noise[:, i], sched)
            out = self.unet_forward(xt, tt, cond, **kw)
            x0_hat, _ = diffusion.predict_x0_eps(out.double(), xt.double(), float(a[t]), sched.prediction_type)
            sq = (x0.double() - x0_hat).pow(2).flatten(1).sum(1)                           # (B,)
            terms.append(diffusion.elbo_weight(tt, sched).to(sq.device) * sq)
        return sched.num_train_timesteps * torch.stack(terms, 1).mean(1)

    # ---------------------------------------------------------------------------------------------- checkpoints

    def save_pretrained(self, directory, tokenizer_path, state=None):
        """Write `directory`/model.safetensors (config JSON in its metadata) and tokenizer.model, both atomically.
        `state` replaces the weights written (train.py passes its EMA weights)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.state_dict() if state is None else state
        weights.save_state({k: v.detach().contiguous() for k, v in state.items()}, directory / "model.safetensors",
                           metadata={"config": json.dumps(self.cfg.to_dict())})
        src, dst = Path(tokenizer_path), directory / "tokenizer.model"
        if src.resolve() != dst.resolve():
            weights.atomic_write_bytes(dst, src.read_bytes())

    @classmethod
    def from_components(cls, clip_dir, llm_dir, sd_dir, dtype=None, **overrides):
        """The paper model from the released parts it starts from (§7.1): a CLIP directory (ViT-L/14), a LLaMA /
        Vicuna directory (its tokenizer.model is the tokenizer) and a Stable Diffusion 2.x directory (unet/, vae/,
        scheduler/). Each part loads strictly with its own `from_pretrained`; what MM-Interleaved adds (adapter,
        neck, resamplers, MMFS blocks and residuals, <BoI>/<image> rows, text head, CFG negative) starts from its
        init. Sizes come from the checkpoints; `overrides` set other MMConfig fields. -> (model, Tokenizer)."""
        base = preset("paper", **overrides)
        adapter = ("spm_ratio", "conv_inplane", "c1_stride", "adapter_heads", "n_points", "deform_ratio", "cffn_ratio",
                   "init_values", "extra_extractors", "adapter_ln_eps")  # the ViT sizes come from the CLIP config
        vit = vit_lib.ViTAdapter.from_pretrained(clip_dir, dtype, **{k: getattr(base.vit, k) for k in adapter})
        sizes = vit.cfg.pyramid_sizes  # paper 64/32/16/8: the LLM reads the lower three, the UNet all four
        tokenizer = llm_lib.Tokenizer(Path(llm_dir) / "tokenizer.model", pad_id=overrides.get("pad_id"))
        n_embed = llm_lib.LLaMA.config_from_hf(llm_dir).vocab_size
        if n_embed != tokenizer.n_vocab - 2:  # the tokenizer adds <BoI>, <image>; the LLM grows by those 2 rows
            raise weights.WeightsError(f"{Path(llm_dir) / 'tokenizer.model'}: {tokenizer.n_vocab - 2} pieces but the "
                                       f"LLM has {n_embed} embeddings")
        b = base.llm
        lm = llm_lib.LLaMA.from_pretrained(llm_dir, dtype or torch.float32, vocab_size=tokenizer.n_vocab,
                                           mmfs_every=b.mmfs_every, image_dim=vit.cfg.hidden_size,
                                           mmfs_levels=tuple(sizes[1:]), mmfs_base=sizes[2], mmfs_heads=b.mmfs_heads,
                                           mmfs_points=b.mmfs_points, mmfs_offset_init=b.mmfs_offset_init,
                                           max_images=b.max_images)
        u = base.unet
        unet = unet_lib.UNet.from_pretrained(sd_dir, dtype, mmfs=True, mmfs_dim=u.mmfs_dim,
                                             mmfs_value_dim=vit.cfg.hidden_size, mmfs_levels=tuple(sizes),
                                             mmfs_heads=u.mmfs_heads, mmfs_points=u.mmfs_points,
                                             mmfs_offset_init=u.mmfs_offset_init, mmfs_max_images=u.mmfs_max_images,
                                             mmfs_max_side=u.mmfs_max_side)
        vae = vae_lib.VAE.from_pretrained(sd_dir, dtype)
        if vae.config.latent_channels != unet.config.in_channels:
            raise weights.WeightsError(f"{sd_dir}: the VAE has {vae.config.latent_channels} latent channels, the UNet "
                                       f"reads {unet.config.in_channels}")
        cfg = copy_config(dataclasses.replace(
            base, vit=vit.cfg, llm=lm.cfg, unet=unet.config, vae=vae.config,
            schedule=diffusion.Schedule.from_pretrained(sd_dir),
            image_size=unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1),
            bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
            resampler=dataclasses.replace(base.resampler, encoder_hidden_size=vit.cfg.hidden_size,
                                          output_size=lm.cfg.dim),
            decoder=dataclasses.replace(base.decoder, encoder_hidden_size=lm.cfg.dim,
                                        hidden_size=unet.config.cross_attention_dim)))
        model = cls(cfg, parts=dict(vit=vit, llm=lm, unet=unet, vae=vae))
        if dtype is not None:
            model = model.to(dtype)
        return model, tokenizer

    @classmethod
    def from_checkpoint(cls, directory, device="cpu", dtype=None):
        """A directory written by `save_pretrained` (train.py's --out) -> (model in eval mode, Tokenizer)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise weights.WeightsError(f"{directory}: checkpoint directory not found")
        file = directory / "model.safetensors"
        state, meta = weights.load_state(file)
        cfg = MMConfig.from_metadata(meta, file)
        with torch.device("meta"):  # no random init of weights that are overwritten next (paper: 13B of them)
            model = cls(cfg)
        weights.load_into(model, state, str(file), dtype)
        model.init_buffers()
        tok_path = directory / "tokenizer.model"
        tokenizer = llm_lib.Tokenizer(tok_path, pad_id=cfg.pad_id)
        if tokenizer.n_vocab != cfg.llm.vocab_size:
            raise weights.WeightsError(f"{tok_path}: {tokenizer.n_vocab} ids but the model has "
                                       f"{cfg.llm.vocab_size}")
        return model.to(device).eval(), tokenizer
