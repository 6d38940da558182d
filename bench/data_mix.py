"""What a training step of `train.py --small` holds, per kind of frame, for mixes of story prefixes side by side.

    python bench/data_mix.py                          # uniform prefixes against --first-frame-prob 0.5 0.6 0.75
    python bench/data_mix.py --probs uniform 0.6 --steps 500
    python bench/data_mix.py --probs uniform 0.6 --events-text-first   # each mix also with --events-text-first

A ShapeStories frame trains one task, by its place in the story and the order of its image and sentence:
  caption       a first frame, image before its sentence: the LLM names the scene (no diffusion loss: it opens
                its document, so the UNet never runs on it);
  text->image   a first frame, sentence before its image: the UNet draws the scene from the text;
  continuation  a later frame, sentence before its image: the UNet draws the event from the previous frame;
  event, image first  a later frame, image before its sentence: the UNet draws the next frame before its event
                is told, and the LLM then names the event.
The counts are means over the first --steps batches of `--seed`, built exactly as train.py builds them (its
tokenizer, rows of <= seq_len tokens and <= max_images images, the batch size). "UNet images" is what costs
diffusion work: every frame but the captions. No model runs; a few seconds.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import llm  # noqa: E402
import model as M  # noqa: E402
from bench.recipe import train_preset  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--probs", nargs="+", default=["uniform", "0.5", "0.6", "0.75"],
                help="values of --first-frame-prob ('uniform': a uniform prefix of 1 to all frames)")
ap.add_argument("--events-text-first", action="store_true", help="count each mix also with every event's sentence "
                "before its image (train.py --events-text-first)")
ap.add_argument("--steps", type=int, default=200, help="batches counted per mix")
ap.add_argument("--seed", type=int, default=0)
args = ap.parse_args()

S = train_preset("small")  # batch size, sequence length, tokenizer: train.py's, read from its source
cfg = M.preset("small")
K, max_images = cfg.num_image_tokens, cfg.llm.max_images - 1  # as train.py
with tempfile.TemporaryDirectory() as tmp:
    tok = llm.Tokenizer.train(data.story_corpus(S["corpus"], args.seed), Path(tmp) / "tok", S["vocab"])
    tok = llm.Tokenizer(tok.path)  # loaded before the directory goes

KINDS = ("caption", "text->image", "continuation", "event, image first")
print(f"{'--first-frame-prob':>18} | " + " | ".join(f"{k:>18}" for k in KINDS) +
      f" | {'frames':>6} | {'UNet images':>11} | {'tokens':>6}   (per step of {S['batch_size']} x {S['seq_len']})")
for p, text_first in [(p, tf) for p in args.probs for tf in ((False, True) if args.events_text_first else (False,))]:
    p_first = None if p == "uniform" else float(p)
    sb = data.StoryBatches(tok, K, S["seq_len"], S["batch_size"], max_images, args.seed, cfg.image_size,
                           prefixes=True, first_frame_prob=p_first, events_text_first=text_first)
    counts, tokens = np.zeros(4), 0
    for step in range(args.steps):
        for j in range(S["batch_size"]):
            for doc, ids, _ in sb.row_documents(step * S["batch_size"] + j):  # what train.py's row j packs
                tokens += len(ids)
                for k in range(len(doc) // 2):  # frame k: its image segment first, or its sentence
                    image_first = "image" in doc[2 * k]
                    counts[(0 if image_first else 1) if k == 0 else (3 if image_first else 2)] += 1  # KINDS' order
    c = counts / args.steps
    print(f"{p + (', text first' if text_first else ''):>18} | " + " | ".join(f"{v:18.2f}" for v in c) +
          f" | {c.sum():6.2f} | {c[1:].sum():11.2f} | {tokens / args.steps:6.0f}")
