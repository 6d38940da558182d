"""Why text-to-image misses: the sampler, or the drawing? Two checks on a trained checkpoint, in minutes.

    python bench/probe_drawing.py --checkpoint out/small                      # both checks
    python bench/probe_drawing.py --checkpoint out/small --skip-sweep --save shapes.png

1. Sampler sweep. Text-to-image on held-out stories of another eval split (`--split-seed`, 1 by default, so the
   headline numbers of `eval.py --seed 0` are not what the settings were picked on), scored as eval.py scores it,
   for each `sampler:steps:guidance` of `--grid`. If some setting drew many more of the named objects, the
   sampler would be the bottleneck.
2. Shape words, same noise. For every size, colour and place of a fixed grid, one-object sentences that differ
   only in the shape word ("there is a big red circle / square / triangle at the top left.") are drawn from the
   same noise. The table counts what the detector reads back per shape asked: if the drawing did not depend on
   the word, each row would be the same; if the word is followed but drawn badly, the diagonal leads and the
   errors are the neighbouring shapes. `--save` writes the first noise draw of the big objects as a grid (one
   row per colour and place, the shapes side by side).
3. Where along the noise the drawing goes wrong (`--from-truth T1,T2,...`; session 39). Each story's TRUE first
   frame is noised to timestep T (q_sample) and drawn back with its scene sentence (DDIM on the 20-step grid below
   T, guidance 3: SDEdit), scored as text-to-image. At T = 999 it is text-to-image itself; where the rate climbs
   is where the UNet decides what the sampler loses. Each named object missed is also sorted by what its cell holds
   instead: its colour in another shape ("shape"), its shape in another colour, something else, or nothing.

    python bench/probe_drawing.py --checkpoint out/small --skip-sweep --skip-shapes --from-truth 999,699,499,299
"""
import argparse
import os
import sys
import time
from collections import Counter

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import eval as ev  # noqa: E402
from model import MMInterleaved  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--checkpoint", default="out/small", help="checkpoint directory (train.py --out)")
ap.add_argument("--n", type=int, default=128, help="stories of the sweep")
ap.add_argument("--split-seed", type=int, default=1, help="eval split of the sweep (eval.py's headline uses 0)")
ap.add_argument("--grid", default="ddim:20:1,ddim:20:2,ddim:20:3,ddim:20:5,ddim:20:8,ddim:50:3,ddpm:50:3",
                help="comma-separated sampler:steps:guidance settings of the sweep")
ap.add_argument("--noise-draws", type=int, default=2, help="noise draws per sentence of the shape check")
ap.add_argument("--skip-sweep", action="store_true", help="only the shape check")
ap.add_argument("--save", metavar="PNG", help="write the shape check's frames here")
ap.add_argument("--skip-shapes", action="store_true", help="skip the shape check")
ap.add_argument("--from-truth", metavar="T1,T2,...",
                help="the third check at these timesteps (e.g. 999,599,399,199, points of the 20-step grid)")
args = ap.parse_args()

torch.set_num_threads(min(2, os.cpu_count() or 1))
ev.log = lambda msg: None  # eval.py's progress lines would bury the tables
model, tok = MMInterleaved.from_checkpoint(args.checkpoint, device="cpu")
size = model.cfg.image_size

if not args.skip_sweep:
    stories = [data.ShapeStories("eval", seed=args.split_seed, size=size)[i] for i in range(args.n)]
    print(f"text-to-image, {args.n} stories of eval split {args.split_seed}")
    print(f"{'sampler:steps:guidance':24s} {'found':>7s} {'exact':>7s} {'chance':>7s} {'extra/frame':>12s} {'s':>5s}")
    for setting in args.grid.split(","):
        sampler, steps, guidance = setting.split(":")
        gen_args = argparse.Namespace(sampler=sampler, steps=int(steps), guidance=float(guidance), batch_size=64,
                                      seed=args.split_seed)
        t0 = time.time()
        m = ev.score_t2i(stories, ev.t2i_task(model, tok, stories, gen_args))
        print(f"{setting:24s} {m['t2i_objects']:7.1%} {m['t2i_exact']:7.1%} {m['t2i_objects_other']:7.1%} "
              f"{float(m['t2i_extra']):12.2f} {time.time() - t0:5.0f}", flush=True)

if args.from_truth:
    starts = [int(t) for t in args.from_truth.split(",") if t.strip().isdigit()]
    if len(starts) != len(args.from_truth.split(",")) or not all(
            t < model.cfg.schedule.num_train_timesteps for t in starts):
        sys.exit(f"probe_drawing.py: --from-truth {args.from_truth}: timesteps in [0, "
                 f"{model.cfg.schedule.num_train_timesteps})")
    stories = [data.ShapeStories("eval", seed=args.split_seed, size=size)[i] for i in range(args.n)]
    print(f"\nfrom the true frame noised to t (SDEdit), {args.n} stories of eval split {args.split_seed}, DDIM 20 "
          "grid, guidance 3; the missed objects (% of the named) by what their cell holds")
    print(f"{'t':>5s} {'alpha-bar':>9s} {'found':>7s} {'exact':>7s} {'extra':>6s} | {'shape':>6s} {'colour':>6s} "
          f"{'other':>6s} {'none':>6s} | most frequent shape asked -> drawn")
    for t in starts:
        gen, frames = torch.Generator().manual_seed(args.split_seed), []
        for part in ev.chunks(stories, 64):
            prompts = [tok.encode(s.sentences[0]) + [tok.boi_id] for s in part]
            truth = torch.stack([data.image_tensor(s.images[0], size) for s in part])           # (B, 3, S, S)
            x = model.generate_images(prompts, [torch.zeros(0, 3, size, size)] * len(part), steps=20, guidance=3.0,
                                      sampler="ddim", generator=gen, start=(truth, t))
            frames += [ev.to_uint8(f) for f in x]
        m = ev.score_t2i(stories, frames)
        misses = [x for s, f in zip(stories, frames) for x in data.text_to_image_misses(s.sentences[0], f)]
        kinds = Counter(kind for _, kind, _ in misses)
        swaps = Counter(f"{m.shape} -> {drawn}" for m, kind, drawn in misses if kind == "shape")
        named = sum(len(data.parse(s.sentences[0])) for s in stories)
        share = {k: 100 * kinds[k] / named for k in ("shape", "colour", "other", "none")}
        print(f"{t:5d} {float(model.cfg.schedule.alphas_cumprod[t]):9.3f} {m['t2i_objects']:7.1%} "
              f"{m['t2i_exact']:7.1%} {float(m['t2i_extra']):6.2f} | " + " ".join(f"{v:6.1f}" for v in share.values())
              + " | " + ", ".join(f"{k} {v}" for k, v in swaps.most_common(3)), flush=True)

if args.skip_shapes:
    sys.exit(0)

# the shape check: every (size, colour, place) of this grid, each shape word, the same noise per draw
shapes, colours, places = data.SHAPES, ("red", "blue", "yellow", "green"), ("centre", "top left", "bottom right", "left")
read = {s: Counter() for s in shapes}
rows = []
for big in ("big", "small"):
    for colour in colours:
        for place in places:
            prompts = [tok.encode(f"there is a {big} {colour} {s} at the {place}.") + [tok.boi_id] for s in shapes]
            for draw in range(args.noise_draws):
                frames = []
                for p in prompts:  # one generate call per sentence, each from a generator seeded the same
                    x = model.generate_images([p], [torch.zeros(0, 3, size, size)], steps=20, guidance=3.0,
                                              sampler="ddim", generator=torch.Generator().manual_seed(draw))
                    frames.append(ev.to_uint8(x[0]))
                for s, f in zip(shapes, frames):
                    objs = data.detect(f)
                    read[s][objs[0].shape if len(objs) == 1 else f"{len(objs)} objects"] += 1
                if big == "big" and draw == 0:
                    rows.append(np.concatenate(frames, 1))
cols = list(shapes) + sorted({k for c in read.values() for k in c} - set(shapes))
print(f"\nshape asked -> read back (one-object sentences, {sum(read[shapes[0]].values())} frames per shape, guidance 3)")
print(f"{'asked':10s}" + "".join(f"{c:>12s}" for c in cols))
for s in shapes:
    print(f"{s:10s}" + "".join(f"{read[s][c]:12d}" for c in cols))
if args.save:
    from PIL import Image
    grid = np.concatenate([np.concatenate(rows[i:i + 4], 1) for i in range(0, len(rows), 4)], 0)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(args.save)
    print(f"wrote {args.save}")
