"""Seconds per training step of `train.py --small`, for recipe variants side by side, with peak memory.

    python bench/bench_step.py                                   # every variant, 8 steps each
    python bench/bench_step.py --variants preset bf16 --steps 10
    python bench/bench_step.py --alternate bf16-conv --steps 12  # one process, step by step against the preset

Each variant runs in its own subprocess (so its peak memory is its own) on the same batches: the ones
`train.py --small --seed 0` trains on first, with the same model, AdamW groups, gradient clipping and EMA. A step is
timed in three parts: forward, backward, and the update (clipping, AdamW, EMA). The first `--warmup` steps are not
timed (allocator and oneDNN warm-up). The variants:

  preset        train.py --small as it is;
  bf16          the same under torch.autocast(bfloat16), as train.py runs on CUDA (on the 2-core EPYC with
                AVX512-BF16 it was 6 % slower than float32, so train.py keeps float32 on a CPU);
  bf16-attn32   that, with attention (scaled_dot_product_attention) kept in float32: on a CPU the bfloat16
                attention is the slowest part of the bf16 step;
  bf16-conv     float32, except every convolution wider than 1x1 (the UNet's and the ViT-Adapter's), which runs
                under autocast(bfloat16) and hands float32 back;
  mmfs32        --mmfs-max-side 0: the UNet's MMFS residuals on the two 32x32 maps too;
  c1s2+mmfs32   that, with the ViT-Adapter's finest map c1 at 32x32 (ViTConfig.c1_stride 2): the 32x32 residuals
                then read a 32x32 map of the previous frame (the pyramid becomes 32/8/4/2).
  attn8         --unet-attn-side 8: attention only in the 8x8 blocks (the preset before session 15);
  attn16up      attention at 16x16 in the up path only, where the MMFS residuals of the previous frame meet the text
                (--unet-attn-side 8,16);
  llm-every1    an MMFS block in every LLM layer (LLaMAConfig.mmfs_every 1) instead of every 2nd (layers 0 and 2);
  llm-p8        the LLM's MMFS with 8 points per head and level instead of 4 (the paper's 8);
  llm-p16       16 points (train.py --mmfs-points 16);
  unet-wide     the UNet's channels doubled, (64, 128, 128) instead of (32, 64, 64);
  unet-l2       two ResNet (and attention) layers per UNet block instead of one (SD has two);
  draws1        one (timestep, noise) draw per image (train.py --noise-draws 1, the recipe until session 22) instead
                of the preset's two that share each image's condition: half the UNet's work, the same ViT and LLM;
  t2i3          three draws for a text-to-image frame, one for a continuation (--noise-draws 1 --noise-draws-t2i 3);
  ahead0        without the four multi-token prediction heads on the LLM's states (train.py --ahead-tokens 0; the
                preset has them from session 32).

The ratio column is each variant's step time over the first variant's, measured in this one run. The variants run
one after another, so a host whose pace drifts moves the ratios (the Intel Xeon of session 35 ran 1.59 to 1.91 s a
step within two hours); `--alternate V` times a number-format variant (bf16, bf16-attn32, bf16-conv) against the
preset on one model in one process, the two in turns on each batch, and prints the mean ratio ± its standard error.
Do not run it beside a training run: two 2-thread processes on 2 cores slow each other several-fold.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import model as M  # noqa: E402
import unet  # noqa: E402
from bench.recipe import small_batches, small_config, small_tokenizer, train_preset  # noqa: E402

SMALL = train_preset("small")  # train.py's recipe, read from its source once

VARIANTS = ("preset", "bf16", "bf16-attn32", "bf16-conv", "mmfs32", "c1s2+mmfs32", "attn8", "attn16up", "llm-every1",
            "llm-p8", "llm-p16", "unet-wide", "unet-l2", "draws1", "t2i3", "ahead0")
PRECISIONS = ("bf16", "bf16-attn32", "bf16-conv")  # the same model, run in other number formats

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="what to time")
ap.add_argument("--steps", type=int, default=8, help="timed steps per variant")
ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
ap.add_argument("--batch-size", type=int, default=2, help="packed sequences per step (train.py --small: 2)")
ap.add_argument("--alternate", choices=PRECISIONS, help="instead: time this variant against the preset in one "
                "process, step by step on the same batches and model (the host's drift cancels), and print the ratio")
ap.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: time one variant, print JSON
args = ap.parse_args()


def build(variant, tok):
    """The --small model of `variant`, initialised as train.py does (seed 0)."""
    cfg = small_config(tok)
    if variant == "attn8":  # train.py --unet-attn-side 8
        cfg.unet = unet.with_attention(cfg.unet, 8)
    if variant == "attn16up":  # train.py --unet-attn-side 8,16
        cfg.unet = unet.with_attention(cfg.unet, 8, 16)
    if variant == "llm-every1":
        cfg.llm = dataclasses.replace(cfg.llm, mmfs_every=1)
    if variant in ("llm-p8", "llm-p16"):
        cfg.llm = dataclasses.replace(cfg.llm, mmfs_points=int(variant[5:]))
    if variant == "unet-wide":
        cfg.unet = dataclasses.replace(cfg.unet, block_out_channels=tuple(2 * c for c in cfg.unet.block_out_channels))
    if variant == "unet-l2":
        cfg.unet = dataclasses.replace(cfg.unet, layers_per_block=2)
    if variant in ("draws1", "t2i3"):
        cfg.noise_draws = 1
    cfg.noise_draws_t2i = 3 if variant == "t2i3" else 0
    if variant == "ahead0":
        cfg = dataclasses.replace(cfg, ahead_tokens=0)
    if "mmfs32" in variant:
        cfg.unet = dataclasses.replace(cfg.unet, mmfs_max_side=0)
    if "c1s2" in variant:  # c1 is 32x32; MMFS reads it in place of the 16x16 level there no longer is
        cfg.vit = dataclasses.replace(cfg.vit, c1_stride=2)
        cfg.llm = dataclasses.replace(cfg.llm, mmfs_levels=(32, *cfg.llm.mmfs_levels[1:]))
        cfg.unet = dataclasses.replace(cfg.unet, mmfs_levels=(32, *cfg.unet.mmfs_levels[1:]))
    torch.manual_seed(0)
    return M.MMInterleaved(cfg)


@contextlib.contextmanager
def precision(variant):
    """Run the forward pass inside in `variant`'s number formats (the backward follows the dtypes it recorded)."""
    sdpa, conv = nn.functional.scaled_dot_product_attention, nn.Conv2d.forward

    def attention_in_float32(q, k, v, *a, attn_mask=None, **kw):
        with torch.autocast("cpu", enabled=False):
            if attn_mask is not None and attn_mask.is_floating_point():
                attn_mask = attn_mask.float()
            return sdpa(q.float(), k.float(), v.float(), *a, attn_mask=attn_mask, **kw)

    def conv_in_bf16(self, x):
        if self.kernel_size == (1, 1):
            return conv(self, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return conv(self, x).float()

    # the model's modules look up F.scaled_dot_product_attention and Conv2d.forward at call time: they get these
    if variant == "bf16-attn32":
        nn.functional.scaled_dot_product_attention = attention_in_float32
    if variant == "bf16-conv":
        nn.Conv2d.forward = conv_in_bf16
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant in ("bf16", "bf16-attn32")):
            yield
    finally:
        nn.functional.scaled_dot_product_attention, nn.Conv2d.forward = sdpa, conv


def setup(variant):
    """The model, optimiser, EMA and batches of a `variant` run, as train.py --small builds them."""
    small = dict(SMALL, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        tok = small_tokenizer(tmp)
    net = build(variant, tok)
    net.train()
    # one AdamW group instead of train.py's four: the groups change learning rates and decay, not the cost
    opt = torch.optim.AdamW(net.parameters(), lr=small["lr"], betas=(0.9, 0.99), weight_decay=0.05)
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    batches = small_batches(tok, net.cfg, small["batch_size"])
    return net, opt, ema, trainable, batches, small


def step_parts(run, variant, step):
    """One training step of `run` (setup's tuple) on batch `step` -> (forward, backward, update) seconds, loss."""
    net, opt, ema, trainable, batches, small = run
    batch = batches.batch(step, 0, 1)
    gens = [torch.Generator().manual_seed(step * small["batch_size"] + j) for j in range(small["batch_size"])]
    t0 = time.perf_counter()
    with precision(variant):
        res = net(batch["tokens"], batch["images"], batch["images_per_row"], generator=gens)
    t1 = time.perf_counter()
    res["loss"].backward()
    t2 = time.perf_counter()
    nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for k, v in net.state_dict().items():
            if k in trainable:
                ema[k].lerp_(v, 1 - small["ema"])
    t3 = time.perf_counter()
    if not torch.isfinite(res["loss"]):
        sys.exit(f"bench_step.py: {variant}: loss is {res['loss'].item()} at step {step}")
    return (t1 - t0, t2 - t1, t3 - t2), float(res["loss"])


def run_one(variant):
    """-> mean seconds per part over the timed steps, this process's peak RSS (MiB) and the last loss."""
    run = setup(variant)
    parts = {"forward": 0.0, "backward": 0.0, "update": 0.0}
    for step in range(args.warmup + args.steps):
        times, loss = step_parts(run, variant, step)
        if step >= args.warmup:
            for name, t in zip(parts, times):
                parts[name] += t / args.steps
    parts["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    parts["loss_last"] = loss
    return parts


def alternate(variant):
    """Batch s runs twice, as the preset and as `variant`, in turns (who goes first alternates); -> ratios."""
    run = setup("preset")  # one model: the precisions change how it runs, not what it is
    for step in range(args.warmup):
        step_parts(run, "preset", step)
        step_parts(run, variant, step)
    ratios = []
    for step in range(args.warmup, args.warmup + args.steps):
        order = ("preset", variant) if step % 2 else (variant, "preset")
        took = {v: sum(step_parts(run, v, step)[0]) for v in order}
        ratios.append(took[variant] / took["preset"])
        print(f"step {step}: preset {took['preset']:.3f} s, {variant} {took[variant]:.3f} s", flush=True)
    return ratios


if args.alternate:
    r = torch.tensor(alternate(args.alternate), dtype=torch.float64)
    print(f"{args.alternate} / preset, alternating in one process: {r.mean():.3f} ± {r.std() / len(r) ** 0.5:.3f} "
          f"(mean ± standard error over {len(r)} steps)")
    sys.exit(0)
if args.one:
    print(json.dumps(run_one(args.one)))
    sys.exit(0)

print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch_size}; {args.steps} timed steps "
      f"after {args.warmup}")
print(f"{'variant':<14} {'forward':>8} {'backward':>9} {'update':>7} {'step s':>7} {'ratio':>6} {'peak MiB':>9}")
first = None
for v in args.variants:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", v, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"bench_step.py: variant {v} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    p = json.loads(r.stdout.strip().splitlines()[-1])
    total = p["forward"] + p["backward"] + p["update"]
    first = first or total
    print(f"{v:<14} {p['forward']:>8.3f} {p['backward']:>9.3f} {p['update']:>7.3f} {total:>7.3f} "
          f"{total / first:>6.2f} {p['peak_mib']:>9.0f}", flush=True)
