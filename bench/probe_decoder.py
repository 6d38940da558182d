"""How fast does the image decoder learn to draw what the text says? Text-to-image training from scratch, side by side.

    python bench/probe_decoder.py [--variants v x0 eps] [--steps 300] [--batch-size 32] [--n 64]

The decoder-side twin of probe_visual.py. Every variant starts from the same fresh `--small` model (same seed) and
trains with the model's own loss (text CE + 10 × diffusion MSE) on the same batches of text-to-image documents,
`<s>` scene sentence `<BoI><image>×K</s>` (plus, with `--continuations`, two-frame continuation documents).
Then, on `--n` held-out stories, it draws each first frame from its sentence (eval.py's text-to-image task: DDIM,
20 steps, guidance 3) and reports

  found    the named objects the detector finds by colour and shape (eval.py's "objects found");
  chance   the same frames scored against the previous story's sentence: what a frame that ignores its text
           scores (blank frames score 0, blobs 3-12 % here, so "found" means little unless it clears this);
  gap      eval.py's condition check at t = T-1 / 0.6(T-1) / 0.3(T-1): 1 - loss(own text) / loss(other text).

The variants differ only in what the UNet predicts (diffusion.Schedule.prediction_type):

  v    v-prediction, the small preset's choice;
  x0   the clean image ("sample");
  eps  the noise, as Stable Diffusion.

Seconds per step on a 2-core CPU: 1.0-1.4; the three variants of 300 steps took 22 minutes with the evaluation.
`--variants x0 --continuations 64` (the recipe's 1:2 mix of text-to-image and continuation frames) takes 3.8 s/step;
`--t2i-weight W` weights the text-to-image frames' diffusion loss W times a continuation's (MMConfig.t2i_loss_weight);
`--hide-prev P` hides the previous frame from the UNet's MMFS for a share P of the continuations (mmfs_hide_prob).
`--eval-every N` also scores every N steps (the learning rate is constant, so step N of a longer run is the N-step
run), and `--frames out.png` saves 8 true frames beside the drawn ones.
"""
import argparse
import dataclasses
import importlib
import math
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import llm  # noqa: E402
import model as M  # noqa: E402

ev = importlib.import_module("eval")  # `import eval` would shadow the builtin
PREDICTION = {"v": "v_prediction", "x0": "sample", "eps": "epsilon"}

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--variants", nargs="+", default=list(PREDICTION), choices=list(PREDICTION),
                help="what the UNet predicts")
ap.add_argument("--steps", type=int, default=300, help="optimiser steps per variant")
ap.add_argument("--batch-size", type=int, default=32, help="text-to-image documents per step")
ap.add_argument("--continuations", type=int, default=0,
                help="also train on this many two-frame continuation documents per step (the recipe's mix is ~2 per "
                     "text-to-image frame): does sharing the loss with them slow text-to-image down?")
ap.add_argument("--t2i-weight", type=float, default=1.0,
                help="diffusion-loss weight of the text-to-image frames against 1 for the continuations")
ap.add_argument("--hide-prev", type=float, default=0.0, metavar="P",
                help="MMConfig.mmfs_hide_prob: the UNet's MMFS sees no previous frame for this share of the "
                     "continuation frames, which must then be drawn from the text")
ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (constant, no warm-up)")
ap.add_argument("--n", type=int, default=64, help="held-out stories to draw and score")
ap.add_argument("--eval-every", type=int, default=0, help="also draw and score every N steps (a learning curve)")
ap.add_argument("--frames", metavar="PNG", help="save the last evaluation's first 8 frames beside the true ones")
ap.add_argument("--seed", type=int, default=0, help="seeds the init, the training stories and the draws")
g = ap.add_argument_group("the text path (MMConfig; EXPERIMENTS.md's tables from before both were in the preset "
                          "used 0 0)")
g.add_argument("--back-tokens", type=int, help="each LLM state also names the N tokens before it (preset: 6)")
g.add_argument("--direct-context", type=int, help="N context states straight to the UNet, past the decoder (preset: 40)")
args = ap.parse_args()
if args.frames and not args.frames.lower().endswith(".png"):
    ap.error(f"--frames {args.frames}: give a .png path (one picture per variant is written beside it)")
torch.set_num_threads(min(2, os.cpu_count() or 1))

with tempfile.TemporaryDirectory() as tmp:  # the --small tokenizer, trained as train.py does
    tok = llm.Tokenizer.train(data.story_corpus(2000, args.seed), os.path.join(tmp, "tok"), 400)


def build(variant):
    torch.manual_seed(args.seed)
    cfg = M.preset("small", bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    cfg.llm = dataclasses.replace(cfg.llm, vocab_size=tok.n_vocab)
    cfg.schedule = dataclasses.replace(cfg.schedule, prediction_type=PREDICTION[variant])
    cfg.t2i_loss_weight = args.t2i_weight
    cfg.mmfs_hide_prob = args.hide_prev
    if args.back_tokens is not None:
        cfg.back_tokens = args.back_tokens
    if args.direct_context is not None:
        cfg.direct_context = args.direct_context
    return M.MMInterleaved(cfg)


def batch(step, k, size):
    """This step's documents -> padded ids (rows, T), their frames in row-major order, images per row. First
    batch_size text-to-image documents, then `--continuations` documents `<s><BoI>`frame 0, its scene sentence,
    the first event `<BoI>`frame 1`</s>` (from other training stories: indices from 10^7 on)."""
    n, c = args.batch_size, args.continuations
    docs = []
    for i in range(n):
        s = data.make_story("train", args.seed, step * n + i, size)
        docs.append([{"text": s.sentences[0]}, {"image": s.images[0]}])
    for i in range(c):
        s = data.make_story("train", args.seed, 10 ** 7 + step * c + i, size)
        docs.append([{"image": s.images[0]}, {"text": s.sentences[0]}, {"text": s.sentences[1]},
                     {"image": s.images[1]}])
    b = data.collate([data.tokenize_document(d, tok, k) for d in docs], tok.pad_id, size)
    return b["tokens"], b["images"], b["images_per_row"]


held_out = [data.make_story("eval", args.seed, i) for i in range(args.n)]
gen_args = argparse.Namespace(batch_size=32, steps=20, guidance=3.0, sampler="ddim", seed=args.seed)


def evaluate(net, variant, step):
    """Draw the held-out first frames and score them (eval.py's text-to-image and condition rows)."""
    net.eval()
    with torch.no_grad():
        frames = ev.t2i_task(net, tok, held_out, gen_args)
        scores = {**ev.score_t2i(held_out, frames),
                  **ev.score_condition(held_out, ev.condition_task(net, tok, held_out, gen_args))}
    net.train()
    gaps = " / ".join(f"{100 * scores[f'cond_gap_t{p}']:.1f}" for p in ev.CONDITION_T)
    print(f"{variant:>4} after {step:4d} steps: found {100 * scores['t2i_objects']:.1f} %, "
          f"chance {100 * scores['t2i_objects_other']:.1f} %, gap {gaps} %", flush=True)
    if args.frames:  # one row per story: the true frame, then the drawn one
        data.preview([argparse.Namespace(images=[s.images[0], f], sentences=s.sentences[:1])
                      for s, f in zip(held_out[:8], frames)], f"-{variant}".join(os.path.splitext(args.frames)))
    return scores


results = {}
for variant in args.variants:
    net = build(variant)
    k, size = net.cfg.num_image_tokens, net.cfg.image_size
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.99),
                            weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)  # timesteps, noise and CFG dropout
    t0, t_eval = time.time(), 0.0
    for step in range(args.steps):
        ids, images, per_row = batch(step, k, size)
        out = net(ids, images, per_row, generator=gen)
        if not math.isfinite(out["loss"].item()):
            sys.exit(f"probe_decoder.py: error: {variant}: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"{variant:>4} step {step:4d}: text {out['loss_txt'].item():.4f}, image {out['loss_img'].item():.4f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            t1 = time.time()
            evaluate(net, variant, step + 1)
            t_eval += time.time() - t1
    sps = (time.time() - t0 - t_eval) / max(args.steps, 1)
    results[variant] = (evaluate(net, variant, args.steps), sps)

print("\nvariant | found | chance | extra / frame | gap t = T-1 / 0.6(T-1) / 0.3(T-1) | s/step")
for variant, (s, sps) in results.items():
    gaps = " / ".join(f"{100 * s[f'cond_gap_t{p}']:.1f}" for p in ev.CONDITION_T)
    print(f"{variant:>7} | {100 * s['t2i_objects']:4.1f} % | {100 * s['t2i_objects_other']:5.1f} % | "
          f"{s['t2i_extra']:13.2f} | {gaps:>33} % | {sps:.2f}")
