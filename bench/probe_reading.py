"""Reading guidance, swept: text-to-image under the model's own caption likelihood, per (scale, window, iterations).

    python bench/probe_reading.py --checkpoint out/small                      # the session-41 sweep, split 1
    python bench/probe_reading.py --checkpoint out/small --grid 0.3:300:900:4 --split-seed 0 --n 256

Each setting `scale:low:high:iterations` draws the scene sentences of `--n` held-out stories (eval split
`--split-seed`, 1 by default so that the setting is not picked on eval.py's headline stories) with DDIM 20 at guidance
3, as eval.py, from the same noise for every setting, and at each sampling step with low <= t <= high moves the x0
estimate `iterations` times by `scale` up log p(sentence | x0) (MMInterleaved.reading_step). Scale 0 is the plain
drawing. Printed per setting: the named objects found and exact (eval.py's scoring), extra objects a frame, the
chance level (another story's sentence), the mean caption log-likelihood of the final frames (what the guidance
climbs), and the seconds it took.
"""
import argparse
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
ap.add_argument("--n", type=int, default=128, help="stories")
ap.add_argument("--split-seed", type=int, default=1, help="eval split (eval.py's headline uses 0); seeds the noise")
ap.add_argument("--grid", default="0:0:0:1,0.1:300:700:1,0.3:300:700:1,0.3:300:900:2,0.5:300:900:2,0.3:0:999:2,"
                "0.3:300:900:4,1.0:300:900:2,0.3:300:999:4,0.3:400:900:4,0.3:250:900:4,0.15:300:900:8,0.3:300:900:8",
                help="comma-separated scale:low:high:iterations settings")
ap.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
args = ap.parse_args()

torch.set_num_threads(min(2, os.cpu_count() or 1))
ev.log = lambda msg: None  # eval.py's progress lines would bury the table
model, tok = MMInterleaved.from_checkpoint(args.checkpoint, device="cpu")
size = model.cfg.image_size
stories = [data.ShapeStories("eval", seed=args.split_seed, size=size)[i] for i in range(args.n)]
texts = [tok.encode(s.sentences[0], bos=False) for s in stories]
print(f"reading guidance, {args.n} stories of eval split {args.split_seed}, DDIM 20, guidance 3 ({args.checkpoint})")
print(f"{'scale:low:high:iters':22s} {'found':>7s} {'exact':>7s} {'extra':>6s} {'chance':>7s} {'log p':>7s} {'s':>5s}")
for setting in args.grid.split(","):
    try:
        scale, low, high, iters = setting.split(":")
        scale, window, iters = float(scale), (int(low), int(high)), int(iters)
    except ValueError:
        sys.exit(f"probe_reading.py: --grid setting {setting!r}: expected scale:low:high:iterations")
    gen_args = argparse.Namespace(steps=20, guidance=3.0, sampler="ddim", batch_size=args.batch_size,
                                  seed=args.split_seed, read_guidance=scale, read_window=window, read_iters=iters)
    t0 = time.time()
    try:
        frames = ev.t2i_task(model, tok, stories, gen_args, read=scale > 0)
    except ValueError as e:
        sys.exit(f"probe_reading.py: --grid setting {setting!r}: {e}")
    seconds = time.time() - t0
    m = ev.score_t2i(stories, frames)
    lp = ev.caption_scores(model, frames, texts, args.batch_size)
    print(f"{setting:22s} {m['t2i_objects']:7.1%} {m['t2i_exact']:7.1%} {float(m['t2i_extra']):6.2f} "
          f"{m['t2i_objects_other']:7.1%} {lp.mean().item():7.2f} {seconds:5.0f}", flush=True)
