"""Does the condition the UNet gets depend on what the sentence says? Read off a trained checkpoint, in seconds.

    python bench/probe_sensitivity.py --checkpoint out/small [--checkpoint out/other ...]

For one-object scene sentences ("there is a small red square at the top left.") it changes one attribute at a time
over all its values, the others fixed, and measures how much each group of condition tokens moves:

  spread = RMS over tokens and channels of the std across the values / RMS of the tokens themselves.

It averages that over 16 random base objects. `count` instead names the first 1, 2 and 3 objects of 16 held-out
three-object scenes. The groups are the UNet's condition tokens (model.py's image_condition): the decoder
Q-Former's, the `direct_context` ones past it (if any) and the pooled mean (if any). A group whose spread stays near
0 for colour, shape and place tells the UNet nothing about them, however well the rest of the model is trained.
"""
import argparse
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import model as M  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--checkpoint", action="append", required=True, help="train.py's --out directory (repeatable)")
ap.add_argument("--bases", type=int, default=16, help="random base objects (and three-object scenes) to average")
ap.add_argument("--seed", type=int, default=0)
args = ap.parse_args()
torch.set_num_threads(min(2, os.cpu_count() or 1))
VALUES = {"colour": data.COLOURS, "shape": data.SHAPES, "size": data.SIZES, "place": data.PLACES}


def groups(cfg):
    """name -> slice of the condition tokens, in image_condition's order."""
    q, n = cfg.decoder.num_queries, cfg.direct_context
    out = {"decoder": slice(0, q)}
    if n:
        out["direct"] = slice(q, q + n)
    if cfg.pooled_condition:
        out["pooled"] = slice(q + n, q + n + 1)
    return out


def spread(cond, part):
    """cond (V, tokens, ctx) for V variants of one sentence -> the group's spread across them / its scale."""
    c = cond[:, part].double()
    return float(c.std(0).pow(2).mean().sqrt() / c.pow(2).mean().sqrt().clamp(min=1e-12))


def one_object(o):
    """{size, colour, shape, place} -> its one-object scene sentence."""
    return data.scene_sentence([data.Mention(**o)])


rng = np.random.default_rng(args.seed)
bases = [{k: str(rng.choice(v)) for k, v in VALUES.items()} for _ in range(args.bases)]
scenes = []  # held-out three-object scenes, their objects in the order the scene sentence names them
for i in range(10 ** 4):
    s = data.make_story("eval", args.seed, i)
    if len(s.objects[0]) == 3:
        scenes.append(data.parse(s.sentences[0]))
        if len(scenes) == args.bases:
            break

for path in args.checkpoint:
    net, tok = M.MMInterleaved.from_checkpoint(path)
    parts = groups(net.cfg)

    def conditions(sentences):
        with torch.no_grad():
            cond, _ = net.prompt_conditions([tok.encode(s) + [tok.boi_id] for s in sentences],
                                            [torch.zeros(0, 3, net.cfg.image_size, net.cfg.image_size)] * len(sentences))
        return cond                                                                         # (V, tokens, ctx)

    rows = {}
    for attr, values in VALUES.items():
        per_base = [conditions([one_object({**b, attr: v}) for v in values]) for b in bases]
        rows[attr] = {g: np.mean([spread(c, p) for c in per_base]) for g, p in parts.items()}
    per_scene = []
    for objs in scenes:
        per_scene.append(conditions([data.scene_sentence(objs[:k]) for k in (1, 2, 3)]))
    rows["count"] = {g: np.mean([spread(c, p) for c in per_scene]) for g, p in parts.items()}

    print(f"\n{path}: spread of each group of condition tokens / its scale")
    print(f"{'changed':>8} | " + " | ".join(f"{g:>8}" for g in parts))
    for attr, r in rows.items():
        print(f"{attr:>8} | " + " | ".join(f"{100 * r[g]:7.1f}%" for g in parts))
