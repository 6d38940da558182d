"""Train MM-Interleaved end to end: tokenizer, model, then text cross-entropy + 10 x diffusion MSE (reference §6-7).

    python train.py --small                     # the CPU / one-GPU recipe on ShapeStories (out/small)
    python train.py --tiny --out /tmp/t         # seconds: a smoke test
    python train.py --small --no-mmfs --out out/small-no-mmfs   # the ablation eval.py --compare reads
    python train.py --small --resume            # continue an interrupted run exactly
    python train.py --small --procs 1           # one process (on a CPU --small otherwise starts up to one per core)
    torchrun --nproc_per_node 2 train.py --small                # DDP (nccl on GPUs, gloo on CPUs)
    torchrun --nproc_per_node 8 train.py --paper --clip CLIP --llm VICUNA --sd SD21 --data docs.jsonl  # real sizes

Reads top to bottom: settings, (distributed) setup, tokenizer, model, optimiser, resume, the loop. Every batch
and every random draw of a step is a function of (seed, step, rank), so `--resume` repeats an uninterrupted run
exactly. The output directory holds model.safetensors (the EMA weights when EMA is on: what sample.py and
eval.py load), tokenizer.model, metrics.jsonl and train/ (raw weights, optimiser, step) for resuming.
"""
import argparse
import dataclasses
import json
import math
import os
import pickle
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.optim import ZeroRedundancyOptimizer

import data
import llm
import model as M
import unet
import weights

# ----------------------------------------------------------------------------------------------------------------
# settings: a preset table (gpt-fast style); flags override

PRESETS = {
    # seconds on a CPU: CI's end-to-end run
    "tiny": dict(model="tiny", steps=6, batch_size=2, seq_len=256, lr=1e-3, warmup=2, vocab=300, corpus=200,
                 ema=0.0, unet_lr_scale=1.0, prefixes=True, log_every=1, save_every=3, out="out/tiny"),
    # train.py --small: everything from scratch on ShapeStories, <= 60 min on a 2-core CPU (README)
    # 2 x 2100: batch 2 rather than 4 gave better images on two seeds; 2100 steps rather than 2400 pay for the UNet's
    # attention at 16x16 (~1.4 s a step on the 2-core CPU) within the budget (EXPERIMENTS.md)
    # the mix: 60 % of the documents a story's first frame alone (a caption or text-to-image, what eval asks of a
    # scene), the rest a prefix of 2 to all frames with every event told before it is drawn (a continuation): seeds
    # 0 / 1 / 2 name 90 / 66 / 86 % of the objects right (uniform prefixes, seed 0: 58 %), and seeds 0 and 1 keep more
    # unmoved objects than the same mix with the story's coin (EXPERIMENTS.md)
    # noise_draws 2 (session 22): each image noised twice a step with its one condition; seed 0 drew 58.6 % of the
    # named objects against 45.8 %, kept 92.4 against 85.2 % of the unmoved ones, for ~1.3x a step (README)
    # stratified_timesteps (session 24): an image's two draws from the two halves of [0, T), at no cost; paired on
    # seeds 0 / 1: objects exact in text-to-image +15.2 / +0.2 points, moved objects found +12.4 / +5.0, captions
    # +0.7 / +5.9, nothing worse (README)
    # ema 0.99 (session 26; 0.995 before): averages of one seed-0 run scored side by side, 0.999 / 0.998 / 0.995 /
    # 0.99 / none named 40.7 / 84.1 / 92.4 / 94.6 / 90.4 % of the objects right in captions and found 35.5 / 56.4 /
    # 58.3 / 61.8 / 61.0 % in text-to-image (EXPERIMENTS.md: "A shorter average")
    # balance_window 8 (session 37): each 8 steps' rows in pairs of alike work, so the two CPU ranks wait less; with
    # the bf16 convolutions and the sharded update 0.896 of a step side by side (bench_ddp_step.py); its runs on the
    # Intel Xeon (seeds 0, 1, 2): 60.4, 57.7, 51.4 min; text-to-image as before them, captions 91.9 / 87.0 / 90.7 %
    # (EXPERIMENTS.md: "The recipe with the savings on seeds 1 and 2")
    "small": dict(model="small", steps=2100, batch_size=2, seq_len=512, lr=1e-3, warmup=50, vocab=400, corpus=2000,
                  ema=0.99, unet_lr_scale=1.0, prefixes=True, first_frame_prob=0.6, events_text_first=True,
                  noise_draws=2, stratified_timesteps=True, balance_window=8, log_every=10, save_every=100,
                  out="out/small"),
    # the released sizes from CLIP ViT-L/14, Vicuna-13B and SD 2.1-base (--clip/--llm/--sd) on a --data corpus: the
    # authors' optimisation (reference §7.2); needs large GPUs, never run on this project's CPU machines
    "paper": dict(model="paper", steps=15000, batch_size=4, seq_len=2048, lr=1e-4, warmup=1000, ema=0.0,
                  unet_lr_scale=0.1, betas=(0.9, 0.995), eps=1e-6, prefixes=False, log_every=10, save_every=1000,
                  out="out/paper"),
}

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
g = ap.add_argument_group("recipe")
size = g.add_mutually_exclusive_group()
size.add_argument("--small", action="store_true", help="the small recipe (default)")
size.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
size.add_argument("--paper", action="store_true", help="the paper model from --clip, --llm, --sd on --data")
g.add_argument("--no-mmfs", action="store_true", help="ablation: no MMFS in the LLM or the UNet")
g.add_argument("--mmfs-hide-prob", type=float, metavar="P", help="share of continuation frames whose UNet MMFS sees "
               "no previous frame in training, so they train the text path too (MMConfig.mmfs_hide_prob, default 0)")
g.add_argument("--mmfs-max-side", type=int, metavar="N", help="the UNet's MMFS residuals only on maps of side <= N "
               "(the small recipe: 16, leaving out the two 32x32 maps; 0: on every map, as the paper)")
g.add_argument("--unet-attn-side", metavar="N[,M]", help="attention (self and cross) in every UNet block on a map of "
               "side <= N, none on larger ones; N,M: N for the down path, M for the up path, where the previous "
               "frame's MMFS residuals arrive (the small recipe: 16; 8 leaves only the 8x8 blocks)")
g.add_argument("--unet-layers", type=int, metavar="N", help="ResNet (and attention) layers in each UNet block (the "
               "small recipe: 1; SD: 2)")
g.add_argument("--noise-draws", type=int, metavar="R", help="(timestep, noise) draws per image and step, sharing the "
               "image's condition: the UNet trains R times as often, the ViT and the LLM once (MMConfig.noise_draws; "
               "the small recipe: 2)")
g.add_argument("--noise-draws-t2i", type=int, metavar="R", help="draws of a text-to-image frame (none before it in its "
               "segment); --noise-draws then counts a continuation frame's (MMConfig.noise_draws_t2i; the small "
               "recipe: 0, the same for every frame)")
g.add_argument("--stratified-timesteps", action=argparse.BooleanOptionalAction, help="with R noise draws, draw r of an "
               "image takes its timestep from the r-th of its R equal parts of [0, T) "
               "(MMConfig.stratified_timesteps; the small recipe: on; --no-stratified-timesteps: R independent uniform "
               "draws)")
g.add_argument("--repa-weight", type=float, metavar="W", help="REPA: pull the UNet's 16x16 down-path state (through "
               "a small MLP) toward the clean frame's ViT-Adapter pyramid map, weight W beside the other losses "
               "(MMConfig.repa_weight; the small recipe: 0, off)")
g.add_argument("--timestep-logit-normal", metavar="M,S", help="with --stratified-timesteps, t/T drawn logit-normal "
               "(mean M, std S of its logit; SD3's timestep sampling) instead of uniform, so the UNet trains more "
               "often where the density is high; e.g. --timestep-logit-normal=-0.2,1 (the = for a negative M) "
               "centres on t = 450 of 1000 (MMConfig.timestep_logit_*; the small recipe: uniform)")
g.add_argument("--mmfs-first-layer", type=int, metavar="N", help="the LLM's first layer with an MMFS block, the "
               "next ones at the preset's spacing (the small recipe: 0 as the paper, so layers 0 and 2; 1 gives 1, 3)")
g.add_argument("--mmfs-points", type=int, metavar="P", help="sampling points per head and level of the LLM's MMFS "
               "(the small recipe: 4; the paper: 8)")
g.add_argument("--spm-width", type=int, metavar="C", help="stem width of the ViT-Adapter's spatial prior module, "
               "the conv net that gives the pyramid its shapes (the small recipe: 16; the paper: 64, then 128 and 256 "
               "deeper)")
g.add_argument("--llm-levels", metavar="S[,S...]", help="the pyramid levels the LLM's MMFS reads, by map side, "
               "largest first (the small recipe: 16,8,4; 16,8 keeps it off the 4x4 map)")
g.add_argument("--ahead-tokens", type=int, metavar="N", help="each LLM state also names the N tokens after its next "
               "one (multi-token prediction heads, a training-only loss; the small recipe: 4; 0: off)")
g.add_argument("--prediction-type", choices=["v_prediction", "sample", "epsilon"], help="what the UNet predicts "
               "(the small recipe: v_prediction; sample = x0). Saved in the checkpoint, so sampling follows it")
g.add_argument("--first-frame-prob", metavar="P", help="share of training documents that are a story's first frame "
               "alone, a caption or a text-to-image example (the rest: a prefix of 2 to all frames); 'uniform': a "
               "uniform prefix of 1 to all frames, P = 0.32 on average (the small recipe: 0.6)")
g.add_argument("--events-text-first", action=argparse.BooleanOptionalAction, help="every event's sentence before its "
               "image in training, so each later frame is a continuation (the small recipe: on; --no-events-text-first: "
               "the story's coin, image first for half of them)")
g.add_argument("--shared-colour-prob", type=float, metavar="P", help="replace a training story, with probability P, "
               "by one whose first event names an object whose colour another object shares, the continuations' "
               "hardest case (0 in the recipe; EXPERIMENTS.md: 'Two objects of one colour')")
g.add_argument("--balance-window", type=int, metavar="W", help="train each W steps' rows in groups of alike work, "
               "so that DDP ranks wait less for each other; the same rows, in another order (the small recipe: 8; "
               "0: in order; bench/bench_ddp_step.py --savings order times it)")
g.add_argument("--data", metavar="JSONL", help="train on an interleaved JSONL corpus instead of ShapeStories")
g.add_argument("--clip", metavar="DIR", help="--paper: a CLIP checkpoint directory (ViT-L/14)")
g.add_argument("--llm", metavar="DIR", help="--paper: a LLaMA/Vicuna directory with its tokenizer.model")
g.add_argument("--sd", metavar="DIR", help="--paper: a Stable Diffusion 2.x directory (unet/, vae/, scheduler/)")
g = ap.add_argument_group("optimisation")
g.add_argument("--steps", type=int, help="optimiser steps")
g.add_argument("--batch-size", type=int, help="sequences per step (global, over all ranks)")
g.add_argument("--lr", type=float, help="peak learning rate (warm-up, then cosine to 10%%)")
g.add_argument("--seed", type=int, default=0, help="seeds the init, the data and every random draw")
g.add_argument("--ema", type=float, metavar="D", help="decay of the weights' moving average that model.safetensors "
               "holds and sampling uses (0: the raw weights; 0.99 in --small)")
g.add_argument("--conv-bf16", action=argparse.BooleanOptionalAction, help="CPU only: every convolution wider than "
               "1x1 (the UNet's, the ViT-Adapter's) in bfloat16, its output back in float32; the rest stays float32. "
               "Default: on for --small on a CPU with native bfloat16 (AVX512-BF16 or AMX), where it takes ~0.94 of a "
               "step (bench_step.py --alternate bf16-conv); off otherwise. Saved with the run, so --resume keeps it")
g.add_argument("--ema-also", type=float, nargs="+", metavar="D", help="more decays whose averages are kept beside "
               "--ema's, each written as a checkpoint to DIR/ema-D/, so that one run compares them (eval.py --compare)")
g = ap.add_argument_group("output")
g.add_argument("--out", metavar="DIR", help="checkpoint directory (default out/<preset>)")
g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
g.add_argument("--save-every", type=int, help="checkpoint every N steps (and at the end)")
g.add_argument("--stop-at", type=int, help="stop with a checkpoint after this step, as an interruption would")
g.add_argument("--device", help="cuda or cpu (default: cuda if available)")
g.add_argument("--procs", type=int, metavar="N", help="CPU only: train as N processes that share torch's threads, "
               "each on 1/N of the batch (DDP over gloo, as torchrun would start them). Default: --small on a CPU "
               "takes the largest divisor of its batch not above torch's thread count (2 processes of one thread on "
               "a 2-core machine); anything else 1")
args = ap.parse_args()


def fail(msg):
    sys.exit(f"train.py: error: {msg}")


def launch(n, threads):
    """Run this same command as n DDP processes of `threads` threads each, as `torchrun --standalone` would, and exit
    with their status. Rank 0 prints as usual; another rank's output is shown only if that rank fails first."""
    import signal
    import socket
    import subprocess
    import tempfile
    with socket.socket() as s:  # a free local port for gloo's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs = {r: tempfile.TemporaryFile() for r in range(1, n)}  # rank r > 0's stderr, read back only if it fails
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # killed: stop the workers too (below)
    procs = []
    for r in range(n):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
        if sys.platform == "linux":  # gloo on the loopback, whatever the host name resolves to (or fails to)
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        procs.append(subprocess.Popen([sys.executable, *sys.argv], env=env, stdout=None if r == 0 else
                                      subprocess.DEVNULL, stderr=logs.get(r)))  # rank 0: the terminal
    try:
        while True:  # until all succeed or one fails: then the others would wait in a collective forever
            codes = [p.poll() for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed or all(c == 0 for c in codes):
                break
            time.sleep(0.5)
    except KeyboardInterrupt:  # Ctrl-C reaches the workers too (one process group); a SIGTERM does not
        failed, codes = [0], [130] * n
    if failed and failed[0] > 0:  # another rank may only have lost rank 0, which is failing with the reason
        try:
            codes[0] = procs[0].wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
    for p in procs:
        if p.poll() is None:
            p.terminate()
        p.wait()
    if not failed:
        sys.exit(0)
    # a rank killed by a signal (the OOM killer, kill -9) wrote no error of its own, and the others fail only
    # because they lost it: name it, whichever rank noticed first
    killed = [r for r in failed if codes[r] < 0]
    first = killed[0] if killed else failed[0]
    if first > 0 and not killed:  # rank 0 printed nothing about it: show the rank's own error
        logs[first].seek(0)
        sys.stderr.write(logs[first].read().decode(errors="replace"))
    if killed:
        sig = next((s.name for s in signal.Signals if s == -codes[first]), f"signal {-codes[first]}")
        print(f"train.py: rank {first} of {n} was killed by {sig}", file=sys.stderr)
    sys.exit(codes[first] if codes[first] > 0 else 128 - codes[first])  # the shell's code for a signal: 128 + N


# ----------------------------------------------------------------------------------------------------------------
# setup: distributed, device, output directory

ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
if ddp:
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
else:
    rank, world = 0, 1
master = rank == 0
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu",
                                                                                                        enabled=False)
preset_name = "tiny" if args.tiny else "paper" if args.paper else "small"
if args.paper and not (args.resume or (args.clip and args.llm and args.sd and args.data)):
    fail("--paper needs --clip DIR, --llm DIR, --sd DIR (the pretrained parts) and --data JSONL")
if args.no_mmfs and args.mmfs_hide_prob is not None:
    fail("--mmfs-hide-prob needs MMFS; --no-mmfs has none to hide")
if args.mmfs_hide_prob is not None and not 0 <= args.mmfs_hide_prob <= 1:
    fail(f"--mmfs-hide-prob {args.mmfs_hide_prob} is not a probability in [0, 1]")
if args.unet_attn_side is not None:
    sides = args.unet_attn_side.split(",")
    if args.paper or len(sides) > 2 or not all(s.isdigit() and int(s) >= 1 for s in sides):
        fail(f"--unet-attn-side {args.unet_attn_side}: " + ("the paper model keeps SD's blocks" if args.paper else
                                                             "one or two map sides >= 1 (N or N,M)"))
    args.unet_attn_side = [int(s) for s in sides]
if args.unet_layers is not None and (args.paper or args.unet_layers < 1):
    fail(f"--unet-layers {args.unet_layers}: " + ("the paper model keeps SD's blocks" if args.paper else
                                                  "at least 1 layer per block"))
if args.noise_draws is not None and args.noise_draws < 1:
    fail(f"--noise-draws {args.noise_draws}: at least 1 draw per image")
if args.noise_draws_t2i is not None and args.noise_draws_t2i < 0:
    fail(f"--noise-draws-t2i {args.noise_draws_t2i}: a number of draws >= 0 (0: --noise-draws for every frame)")
if args.timestep_logit_normal is not None:
    try:
        args.timestep_logit_mean, args.timestep_logit_std = map(float, args.timestep_logit_normal.split(","))
    except ValueError:
        fail(f"--timestep-logit-normal {args.timestep_logit_normal}: two numbers M,S")
    if not (math.isfinite(args.timestep_logit_mean) and 0 < args.timestep_logit_std < math.inf):
        fail(f"--timestep-logit-normal {args.timestep_logit_normal}: a finite mean and a std > 0")
    if not (args.stratified_timesteps if args.stratified_timesteps is not None else
            PRESETS[preset_name].get("stratified_timesteps", False)):
        fail(f"--timestep-logit-normal {args.timestep_logit_normal}: needs stratified_timesteps (its strata are "
             "drawn from it; add --stratified-timesteps)")
else:
    args.timestep_logit_mean = args.timestep_logit_std = None
if args.repa_weight is not None and not 0 <= args.repa_weight < math.inf:
    fail(f"--repa-weight {args.repa_weight}: a finite weight >= 0 (0: off)")
if args.mmfs_max_side is not None and (args.paper or args.no_mmfs or args.mmfs_max_side < 0):
    fail(f"--mmfs-max-side {args.mmfs_max_side}: " + ("the paper model keeps MMFS on every map" if args.paper else
         "--no-mmfs has no MMFS residuals" if args.no_mmfs else "a map side is >= 0 (0: every map)"))
if args.mmfs_first_layer is not None and (args.paper or args.no_mmfs or args.mmfs_first_layer < 0):
    fail(f"--mmfs-first-layer {args.mmfs_first_layer}: " + ("the paper model keeps the authors' layers" if args.paper
         else "--no-mmfs has no MMFS blocks" if args.no_mmfs else "a layer index is >= 0"))
if args.mmfs_first_layer is not None and args.mmfs_first_layer >= (n := M.preset(preset_name).llm.n_layers):
    fail(f"--mmfs-first-layer {args.mmfs_first_layer}: the {preset_name} LLM has layers 0 to {n - 1}")
if args.mmfs_points is not None and (args.paper or args.no_mmfs or args.mmfs_points < 1):
    fail(f"--mmfs-points {args.mmfs_points}: " + ("the paper model keeps the authors' 8" if args.paper else
         "--no-mmfs has no MMFS blocks" if args.no_mmfs else "at least 1 point"))
if args.spm_width is not None and (args.paper or args.spm_width < 1):
    fail(f"--spm-width {args.spm_width}: " + ("the paper model keeps the authors' 64" if args.paper else
                                              "at least 1 channel"))
if args.ahead_tokens is not None and (args.paper or args.ahead_tokens < 0):
    fail(f"--ahead-tokens {args.ahead_tokens}: " + ("the paper model has the authors' text loss only" if args.paper
                                                    else "a number of tokens >= 0 (0: off)"))
llm_levels = None
if args.llm_levels is not None:
    sides = M.preset(preset_name).vit.pyramid_sizes
    try:
        llm_levels = [int(x) for x in args.llm_levels.split(",")]
    except ValueError:
        llm_levels = []
    if args.paper or args.no_mmfs or not llm_levels or any(x not in sides for x in llm_levels) \
            or llm_levels != sorted(set(llm_levels), reverse=True):
        fail(f"--llm-levels {args.llm_levels}: " + ("the paper model keeps the authors' levels" if args.paper else
             "--no-mmfs has no MMFS blocks" if args.no_mmfs else
             f"distinct sides of the {preset_name} pyramid {sides}, largest first"))
if args.first_frame_prob is not None:
    if args.paper or args.data:
        fail(f"--first-frame-prob {args.first_frame_prob}: a ShapeStories recipe's mix; --paper and --data read "
             "whole documents")
    try:
        p_first = None if args.first_frame_prob == "uniform" else float(args.first_frame_prob)
    except ValueError:
        p_first = math.nan
    if p_first is not None and not 0 <= p_first <= 1:  # NaN fails too
        fail(f"--first-frame-prob {args.first_frame_prob}: a probability in [0, 1], or 'uniform'")
    settings_mix = dict(first_frame_prob=p_first)
else:
    settings_mix = {}  # the preset's
if args.events_text_first is not None:
    if args.paper or args.data:
        fail("--events-text-first: a ShapeStories recipe's mix; --paper and --data read documents as they are")
    settings_mix["events_text_first"] = args.events_text_first
if args.shared_colour_prob is not None:
    if args.paper or args.data or not 0 <= args.shared_colour_prob <= 1:  # NaN fails too
        fail(f"--shared-colour-prob {args.shared_colour_prob}: " + ("a ShapeStories recipe's mix; --paper and --data "
             "read documents as they are" if args.paper or args.data else "a probability in [0, 1]"))
    settings_mix["shared_colour_prob"] = args.shared_colour_prob
if args.balance_window is not None:
    if args.paper or args.data or args.balance_window < 0:
        fail(f"--balance-window {args.balance_window}: " + ("a ShapeStories recipe's order; --paper and --data read "
             "documents in their own order" if args.paper or args.data else "a number of steps >= 0 (0: in order)"))
    settings_mix["balance_window"] = args.balance_window
if args.ema is not None and not 0 <= args.ema < 1:
    fail(f"--ema {args.ema}: a decay in [0, 1) (0: no average, the raw weights)")
for d in args.ema_also or []:
    if not 0 < d < 1:
        fail(f"--ema-also {d}: a decay in (0, 1)")
if args.paper and args.prediction_type:
    fail("--prediction-type is for the recipes trained from scratch; the paper UNet keeps its scheduler's")
if args.conv_bf16 and not device.startswith("cpu"):
    fail("--conv-bf16 is for CPUs; on CUDA the whole step already runs under bfloat16 autocast")
if args.paper and args.no_mmfs:
    fail("--no-mmfs is an ablation of the small recipe; the paper preset always has MMFS")
out = Path(args.out or PRESETS[preset_name]["out"])
state_file = out / "train" / "state.json"
try:
    if args.resume:
        saved = weights.read_json(state_file)  # the run's settings come from its first invocation
        settings = saved["settings"]
    else:
        if state_file.exists():
            fail(f"{out} already holds a run (step {weights.read_json(state_file)['step']}); pass --resume to "
                 "continue it or choose another --out")
        settings = dict(PRESETS[preset_name], no_mmfs=args.no_mmfs, mmfs_hide_prob=args.mmfs_hide_prob,
                        prediction_type=args.prediction_type,
                        mmfs_max_side=args.mmfs_max_side, unet_attn_side=args.unet_attn_side,
                        unet_layers=args.unet_layers,
                        mmfs_first_layer=args.mmfs_first_layer, mmfs_points=args.mmfs_points,
                        spm_width=args.spm_width, llm_levels=llm_levels, ahead_tokens=args.ahead_tokens,
                        data=args.data, seed=args.seed, ema_also=sorted(set(args.ema_also or [])),
                        **settings_mix,
                        parts=dict(clip=args.clip, llm=args.llm, sd=args.sd) if args.paper else None)
        for k in ("steps", "batch_size", "lr", "ema", "save_every", "noise_draws", "noise_draws_t2i",
                  "stratified_timesteps", "timestep_logit_mean", "timestep_logit_std", "repa_weight"):
            if getattr(args, k) is not None:
                settings[k] = getattr(args, k)
        # --small's CPU fast path, decided once for the run (the parent and its ranks decide alike) and saved
        native_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()  # AVX512-BF16 (with AMX too)
        settings["conv_bf16"] = args.conv_bf16 if args.conv_bf16 is not None else (
            preset_name == "small" and device == "cpu" and native_bf16)
except (weights.WeightsError, KeyError) as e:
    fail(f"{state_file}: not a readable training state ({e})")
S = argparse.Namespace(**settings)

# on a CPU, processes instead of threads: the small model's operators are too small to keep 2 threads busy, and on
# 2 cores two one-thread DDP processes, a row each, take 0.88-0.91 of the step of one 2-thread process (bench_procs.py)
if not ddp and device == "cpu":
    cores = torch.get_num_threads()  # torch's default: the physical cores (or OMP_NUM_THREADS)
    n_procs = args.procs if args.procs is not None else 1 if S.model != "small" else \
        max(d for d in range(1, min(cores, S.batch_size) + 1) if S.batch_size % d == 0)
    if n_procs < 1 or S.batch_size % n_procs:
        fail(f"--procs {n_procs}: " + ("at least 1 process" if n_procs < 1 else
                                       f"the batch of {S.batch_size} sequences does not split into {n_procs} parts"))
    if n_procs > 1:
        launch(n_procs, max(1, cores // n_procs))  # never returns
elif not ddp and args.procs not in (None, 1):
    fail("--procs is for CPUs; on GPUs start one process per GPU with torchrun --nproc_per_node N")
if S.batch_size % world:
    fail(f"--batch-size {S.batch_size} is not divisible by the {world} ranks")

# ----------------------------------------------------------------------------------------------------------------
# tokenizer: trained first, on the corpus's text (rank 0 writes it, the others wait and read it)

tok_path = out / "tokenizer.model"
parts = getattr(S, "parts", None)  # the paper preset: the pretrained LLM's tokenizer, copied into the run
if master and not args.resume:
    if parts:
        src = Path(parts["llm"]) / "tokenizer.model"
        if not src.is_file():
            fail(f"{src}: not found (the --llm directory needs its sentencepiece tokenizer.model)")
        out.mkdir(parents=True, exist_ok=True)
        weights.atomic_write_bytes(tok_path, src.read_bytes())
    else:
        try:  # a bad --data file stops here with its one-line error, before anything is written
            texts = (data.story_corpus(S.corpus, S.seed) if not S.data else
                     [s["text"] for doc in data.read_jsonl(S.data) for s in doc if "text" in s])
        except ValueError as e:
            fail(str(e))
        out.mkdir(parents=True, exist_ok=True)
        tmp = llm.Tokenizer.train(texts, out / "tokenizer.tmp", S.vocab)
        os.replace(tmp.path, tok_path)
        (out / "tokenizer.tmp.vocab").unlink(missing_ok=True)
if ddp:
    dist.barrier()
tok = llm.Tokenizer(tok_path)

# ----------------------------------------------------------------------------------------------------------------
# model

torch.manual_seed(S.seed)
# a training-time draw, checked by the model like every MMConfig field; sampling always shows MMFS everything
hide = {} if getattr(S, "mmfs_hide_prob", None) is None else dict(mmfs_hide_prob=S.mmfs_hide_prob)
if args.resume and not parts:  # the last checkpoint's EMA weights (restored below) and the run's model config
    try:
        ema_state, meta = weights.load_state(out / "model.safetensors")
    except (weights.WeightsError, OSError) as e:
        fail(f"cannot resume from {out}: {str(e).splitlines()[0]}")
if parts:  # the released CLIP / LLaMA / SD weights, strictly loaded; the new modules from their init
    try:
        model, _ = M.MMInterleaved.from_components(parts["clip"], parts["llm"], parts["sd"], **hide)
    except (weights.WeightsError, ValueError, OSError) as e:
        fail(str(e).splitlines()[0])
    cfg = model.cfg
    model = model.to(device)
elif args.resume:  # the model the run was built with (saved with each checkpoint), whatever the preset is today
    try:
        cfg = M.MMConfig.from_metadata(meta, out / "model.safetensors")
        model = M.MMInterleaved(cfg).to(device)
    except (weights.WeightsError, ValueError, OSError) as e:
        fail(f"cannot resume from {out}: {str(e).splitlines()[0]}")
else:
    cfg = M.preset(S.model, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    cfg.llm = dataclasses.replace(cfg.llm, vocab_size=tok.n_vocab)
    if S.no_mmfs:
        cfg = M.without_mmfs(cfg)
    if getattr(S, "mmfs_max_side", None) is not None:
        cfg.unet = dataclasses.replace(cfg.unet, mmfs_max_side=S.mmfs_max_side)
    if getattr(S, "mmfs_first_layer", None) is not None:
        cfg.llm = dataclasses.replace(cfg.llm, mmfs_first=S.mmfs_first_layer)
    if getattr(S, "mmfs_points", None) is not None:
        cfg.llm = dataclasses.replace(cfg.llm, mmfs_points=S.mmfs_points)
    if getattr(S, "spm_width", None) is not None:
        cfg.vit = dataclasses.replace(cfg.vit, conv_inplane=S.spm_width)
    if getattr(S, "llm_levels", None) is not None:
        cfg.llm = dataclasses.replace(cfg.llm, mmfs_levels=tuple(S.llm_levels))
    if getattr(S, "ahead_tokens", None) is not None:
        cfg = dataclasses.replace(cfg, ahead_tokens=S.ahead_tokens)
    if getattr(S, "unet_layers", None) is not None:
        cfg.unet = dataclasses.replace(cfg.unet, layers_per_block=S.unet_layers)
    if getattr(S, "unet_attn_side", None) is not None:  # [N] or [N, M]
        cfg.unet = unet.with_attention(cfg.unet, *S.unet_attn_side)
    if getattr(S, "prediction_type", None):
        cfg.schedule = dataclasses.replace(cfg.schedule, prediction_type=S.prediction_type)
    for k in ("noise_draws", "noise_draws_t2i", "stratified_timesteps", "timestep_logit_mean",
              "timestep_logit_std", "repa_weight"):  # MMConfig fields of the same name
        if getattr(S, k, None) is not None:  # absent from the settings of runs older than the field
            cfg = dataclasses.replace(cfg, **{k: getattr(S, k)})
    cfg = dataclasses.replace(cfg, **hide)
    try:
        model = M.MMInterleaved(cfg).to(device)
    except ValueError as e:
        fail(str(e))
raw = model

if getattr(S, "conv_bf16", False) and device == "cpu":  # on CUDA the whole step already runs under bf16 autocast
    M.convolutions_in_bfloat16(raw)
if ddp:
    # oneDNN hands back some 1x1 / depthwise convolution weight gradients in another memory layout than DDP's
    # bucket; DDP copies them in (a few small tensors a step) and warns once per process: not worth the noise
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    # a pyramid map no MMFS reads (--no-mmfs, or --mmfs-max-side with the LLM off the finest level) leaves the
    # parameters that only build it (adapter_up, the last interaction's extractors) without a gradient, and so does
    # a --data batch that gives a rank no image: DDP must be told, and then searches the graph for them every step
    unused = bool(raw.unread_pyramid_levels()) or S.data is not None
    model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None,
                                                find_unused_parameters=unused)
n_params = sum(p.numel() for p in raw.parameters())
n_train = sum(p.numel() for p in raw.parameters() if p.requires_grad)

# ----------------------------------------------------------------------------------------------------------------
# optimiser: AdamW with the authors' parameter groups (reference §7.2)


def param_groups(net, lr, wd=0.05, unet_lr_scale=1.0):
    """First match wins: MMFS gates (no decay), sampling offsets (lr/10, no decay), the pretrained UNet (its
    own lr scale), everything else; biases and LayerNorm weights never decay."""
    no_decay = {f"{n}.{p}" if n else p for n, m in net.named_modules() if isinstance(m, nn.LayerNorm)
                for p, _ in m.named_parameters(recurse=False)}
    groups = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        if "llama_cross_attn.gate" in name:
            key = ("gate", lr, 0.0)
        elif "sampling_offsets" in name:
            key = ("offsets", lr * 0.1, 0.0)
        elif name.startswith("unet.") and not name.startswith("unet.mmfs."):
            key = ("unet", lr * unet_lr_scale, 0.0 if name.endswith("bias") or name in no_decay else wd)
        else:
            key = ("rest", lr, 0.0 if name.endswith("bias") or name in no_decay else wd)
        groups.setdefault(key, []).append(p)
    return [dict(params=ps, lr=l, base_lr=l, weight_decay=w, name=f"{n}/wd{w}") for (n, l, w), ps in groups.items()]


adamw = dict(betas=tuple(getattr(S, "betas", (0.9, 0.99))), eps=getattr(S, "eps", 1e-8))
if ddp:
    # each rank keeps the moments of, and updates, about 1/world of the parameters (ZeRO stage 1), then broadcasts
    # them from flat buckets: the same AdamW arithmetic on every element, so the same weights as one optimiser; on
    # the 2-core Intel Xeon an update took 51 ms instead of 66 (bench/bench_zero.py), and half the memory
    opt = ZeroRedundancyOptimizer(param_groups(raw, S.lr, unet_lr_scale=S.unet_lr_scale),
                                  optimizer_class=torch.optim.AdamW, parameters_as_bucket_view=True, **adamw)
else:
    opt = torch.optim.AdamW(param_groups(raw, S.lr, unet_lr_scale=S.unet_lr_scale), **adamw)


def lr_factor(step):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < S.warmup:
        return (step + 1) / S.warmup
    progress = (step - S.warmup) / max(1, S.steps - S.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# EMA of the trainable weights (what sampling uses); frozen tensors and buffers are copied as they are
def weights_copy():
    return {k: v.detach().clone() for k, v in raw.state_dict().items()}


ema = weights_copy() if S.ema > 0 else None
trainable = {n for n, p in raw.named_parameters() if p.requires_grad}
# --ema-also: more averages of the same weights, each saved as its own checkpoint directory (DIR/ema-D)
extra = {d: weights_copy() for d in getattr(S, "ema_also", [])}

# ----------------------------------------------------------------------------------------------------------------
# checkpoints: every file written atomically; state.json last, so a crash mid-save leaves the previous step


def save(step):
    if ddp:  # every rank sends rank 0 its shard of the optimiser state, which rank 0 writes whole
        opt.consolidate_state_dict(to=0)
    if not master:
        return
    meta = {"step": str(step)}
    weights.save_state(raw.state_dict(), out / "train" / "raw.safetensors", metadata=meta)
    tmp = out / "train" / "optimizer.pt.tmp"
    torch.save({"step": step, "optimizer": opt.state_dict()}, tmp)
    os.replace(tmp, out / "train" / "optimizer.pt")
    raw.save_pretrained(out, tok_path, state=ema)
    for d, avg in extra.items():
        raw.save_pretrained(out / f"ema-{d}", tok_path, state=avg)
    weights.atomic_write_text(state_file, json.dumps({"step": step, "settings": settings}, indent=1))


start = 0
if args.resume:
    try:
        start = int(saved["step"])
        state, meta = weights.load_state(out / "train" / "raw.safetensors")
        if int(meta.get("step", -1)) != start:
            raise ValueError(f"{out / 'train' / 'raw.safetensors'} is from step {meta.get('step')}, "
                             f"state.json says {start}")
        raw.load_state_dict(state, strict=True)
        ostate = torch.load(out / "train" / "optimizer.pt", weights_only=True, map_location=device)
        if ostate["step"] != start:
            raise ValueError(f"{out / 'train' / 'optimizer.pt'} is from step {ostate['step']}, state.json says {start}")
        opt.load_state_dict(ostate["optimizer"])
        if ema is not None:
            ema = {k: ema_state[k].to(device) for k in ema}  # read before the model was built
            del ema_state
        for d in extra:
            avg, _ = weights.load_state(out / f"ema-{d}" / "model.safetensors")
            extra[d] = {k: avg[k].to(device) for k in extra[d]}
    except (ValueError, KeyError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        fail(f"cannot resume from {out}: {str(e).splitlines()[0]}")
    if start >= S.steps:
        fail(f"{out} already finished its {S.steps} steps")
    if master:  # metrics logged after the checkpoint belong to the lost part of the run
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        weights.atomic_write_text(out / "metrics.jsonl",
                                  "".join(ln + "\n" for ln in lines if json.loads(ln)["step"] < start))

# ----------------------------------------------------------------------------------------------------------------
# data: every batch is a pure function of (seed, step, rank)

K, max_images = cfg.num_image_tokens, cfg.llm.max_images - 1  # a token sees at most max_images - 1 images
try:
    if S.data:
        batches = data.DocumentBatches(S.data, tok, K, S.seq_len, S.batch_size, max_images, S.seed, cfg.image_size)
    else:
        batches = data.StoryBatches(tok, K, S.seq_len, S.batch_size, max_images, S.seed, cfg.image_size,
                                    prefixes=getattr(S, "prefixes", False),  # runs saved before the flag: off
                                    first_frame_prob=getattr(S, "first_frame_prob", None),
                                    events_text_first=getattr(S, "events_text_first", False),
                                    balance_window=getattr(S, "balance_window", 0), unet_passes=cfg.noise_draws,
                                    shared_colour_prob=getattr(S, "shared_colour_prob", 0.0))
except ValueError as e:
    fail(str(e))

# ----------------------------------------------------------------------------------------------------------------
# the loop

if master:
    print(f"{preset_name}{' --no-mmfs' if S.no_mmfs else ''}: {n_params / 1e6:.2f}M parameters "
          f"({n_train / 1e6:.2f}M trained) on {device}{f' x {world} ranks' if ddp else ''}, steps {start}..{S.steps}, "
          f"batch {S.batch_size} x {S.seq_len} tokens -> {out}", file=sys.stderr)
metrics = open(out / "metrics.jsonl", "a") if master else None
averages = ([(ema, S.ema)] if ema is not None else []) + [(avg, d) for d, avg in extra.items()]  # (weights, decay)
t0, last = time.time(), start
stop = min(S.steps, args.stop_at) if args.stop_at is not None else S.steps
for step in range(start, stop):
    for group in opt.param_groups:
        group["lr"] = group["base_lr"] * lr_factor(step)
    batch = batches.batch(step, rank, world)
    tokens, images = batch["tokens"].to(device), batch["images"].to(device)
    torch.manual_seed(S.seed * 1_000_003 + step * world + rank)  # dropout, if a preset uses it (per rank)
    rows = range(rank, S.batch_size, world)  # this rank's rows of the global batch; each draws from its own seed
    gens = [torch.Generator(device).manual_seed(S.seed * 1_000_003 + step * S.batch_size + j) for j in rows]
    # losses are sums over this rank divided by the global counts, so DDP's gradient mean (x world) is the mean
    # over the global batch: the same loss as one process on the same batch
    counts = None  # one process: the model's own counts are the global ones
    if ddp:
        counts = torch.tensor([int((raw.text_labels(tokens) != -100).sum()), len(images)], device=device)
        dist.all_reduce(counts)
        counts = counts.tolist()
    with autocast:
        res = model(tokens, images, batch["images_per_row"], generator=gens, counts=counts)
    (res["loss"] * world).backward()
    logged = torch.stack([res["loss"].detach(), res["loss_txt"], res["loss_back"], res["loss_ahead"],
                          res["loss_img"], res["loss_repa"]]).float()
    if ddp:
        dist.all_reduce(logged)
    if not torch.isfinite(logged).all():  # stop before the update: the last checkpoint stays the last good one
        fail(f"loss is {logged[0].item()} at step {step}; stopped without saving, the checkpoint in {out} "
             f"(step {last if last > start or args.resume else 'none'}) is intact")
    grad_norm = float(nn.utils.clip_grad_norm_(raw.parameters(), 1.0))
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        state = raw.state_dict() if averages else {}  # no average (--tiny, --ema 0): nothing to read
        for avg, decay in averages:
            for k, v in state.items():
                if k in trainable:
                    avg[k].lerp_(v, 1 - decay)
                else:
                    avg[k].copy_(v)
    done = step + 1
    if master and (done % S.log_every == 0 or done == stop):
        elapsed = time.time() - t0
        rate = (done - start) / elapsed
        loss, lt, lb, la, li, lrepa = logged.tolist()
        optional = dict(loss_ahead=la) if cfg.ahead_tokens else {}
        optional |= dict(loss_repa=lrepa) if cfg.repa_weight else {}
        metrics.write(json.dumps(dict(step=step, loss=loss, loss_txt=lt, loss_back=lb, **optional, loss_img=li,
                                      lr=opt.param_groups[0]["lr"], grad_norm=grad_norm,
                                      elapsed_s=round(elapsed, 2))) + "\n")
        metrics.flush()
        eta = (stop - done) / rate
        terms = f"txt {lt:.3f}, back {lb:.3f}, " + (f"ahead {la:.3f}, " if cfg.ahead_tokens else "")
        terms_img = f"img {li:.4f}" + (f", repa {lrepa:.3f}" if cfg.repa_weight else "")
        print(f"\rstep {done}/{S.steps} | loss {loss:.4f} ({terms}{terms_img}) | "
              f"{rate:.2f} steps/s | ETA {int(eta // 60)}m{int(eta % 60):02d}s", end="" if sys.stderr.isatty() else "\n",
              file=sys.stderr, flush=True)
    if done % S.save_every == 0 or done == stop:
        save(done)
        last = done
if master:
    print(f"\ndone: step {stop}/{S.steps}, {(time.time() - t0) / 60:.1f} min; checkpoint in {out}", file=sys.stderr)
if ddp:  # every rank past its last collective (rank 0 writes the checkpoint last) before any tears gloo down
    dist.barrier()
    dist.destroy_process_group()
