"""Captions checked by drawing, swept: which weight of the UNet's reading against the LLM's picks the caption.

    python bench/probe_caption_check.py --checkpoint out/small                   # split 1, 256 stories, N = 16
    python bench/probe_caption_check.py --checkpoint out/small --draws 4 --weights 0,1,inf

The candidates are eval.py --caption-rerank's: per first frame of `--n` held-out stories (eval split `--split-seed`,
1 by default so that nothing is picked on eval.py's headline stories) the greedy caption and the distinct first
sentences of `--samples` N captions sampled at temperature 1. Each is scored once by both readings (eval.py's
check_captions: log p(c | x) from the LLM, -log p(x | c) in nats from the UNet's ELBO over `--levels` timesteps
and `--draws` noise draws each), then every weight w of the grid picks by log p(c | x) - w · (-log p(x | c))
(pick_captions; 0: the LLM alone, inf: the UNet alone). Printed per weight: objects right, exact captions, shape
right at each place, and how often the greedy caption is kept; then what the greedy caption and a perfect ranker of
the same candidates (the true caption picking: a bound) reach.
"""
import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import eval as ev  # noqa: E402
from model import MMInterleaved  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--checkpoint", default="out/small", help="checkpoint directory (train.py --out)")
ap.add_argument("--n", type=int, default=256, help="stories")
ap.add_argument("--split-seed", type=int, default=1, help="eval split (eval.py's headline uses 0); seeds the draws")
ap.add_argument("--samples", type=int, default=16, help="captions sampled per frame beside the greedy one")
ap.add_argument("--levels", type=int, default=ev.CHECK_LEVELS, help="timesteps of the UNet's reading")
ap.add_argument("--draws", type=int, default=ev.CHECK_DRAWS, help="noise draws at each timestep")
ap.add_argument("--weights", default="0,0.1,0.3,1,3,10,inf", help="comma-separated weights of -log p(x | c)")
ap.add_argument("--batch-size", type=int, default=32, help="rows per model call")
args = ap.parse_args()
try:
    weights = [float(w) for w in args.weights.split(",")]
except ValueError:
    sys.exit(f"probe_caption_check.py: --weights {args.weights!r}: expected comma-separated numbers")
if min(args.n, args.samples, args.levels, args.draws, args.batch_size) < 1 or any(not w >= 0 for w in weights):
    sys.exit("probe_caption_check.py: --n, --samples, --levels, --draws, --batch-size must be >= 1, weights >= 0")

torch.set_num_threads(min(2, os.cpu_count() or 1))
ev.log = lambda msg: None  # eval.py's progress lines would bury the table
ev.CHECK_LEVELS, ev.CHECK_DRAWS = args.levels, args.draws
model, tok = MMInterleaved.from_checkpoint(args.checkpoint, device="cpu")
size = model.cfg.image_size
stories = [data.ShapeStories("eval", seed=args.split_seed, size=size)[i] for i in range(args.n)]
run = argparse.Namespace(seed=args.split_seed, batch_size=args.batch_size, caption_rerank=args.samples)
t0 = time.time()
greedy = ev.caption_task(model, tok, stories, run)
cands = ev.caption_candidates(model, tok, stories, run, greedy)
t1 = time.time()
read, drawn = ev.check_captions(model, tok, stories, cands, run)
t2 = time.time()
print(f"captions checked by drawing, {args.n} stories of eval split {args.split_seed} ({args.checkpoint}): "
      f"{sum(map(len, cands)) / args.n:.2f} candidates a frame from {args.samples} samples ({t1 - t0:.0f} s), "
      f"scored with {args.levels} x {args.draws} UNet passes each ({t2 - t1:.0f} s)")
print(f"{'weight':>8s} {'objects':>8s} {'exact':>7s} {'shape':>7s} {'greedy kept':>12s}")


def row(name, chosen):
    m = ev.score_captions(stories, [cs[j] for cs, j in zip(cands, chosen)])
    kept = sum(j == 0 for j in chosen) / len(chosen)
    print(f"{name:>8s} {m['caption_objects']:8.1%} {m['caption_exact']:7.1%} {m['caption_shape']:7.1%} "
          f"{kept:12.1%}", flush=True)


for w in weights:
    if math.isinf(w):  # the UNet alone (an empty caption still loses: its reading is -inf)
        row("inf", [min(range(len(d)), key=lambda j: (r[j] == -math.inf, d[j])) for r, d in zip(read, drawn)])
    else:
        row(f"{w:g}", ev.pick_captions(read, drawn, w))
row("greedy", [0] * args.n)
row("bound", [max(range(len(cs)), key=lambda j: data.score_caption(cs[j], s.sentences[0])["n_correct"])
              for s, cs in zip(stories, cands)])
