"""Does the UNet's condition say which object an event names, and where it is? Linear read-outs, on a checkpoint.

    python bench/probe_event.py --checkpoint out/small

A continuation prompt is the first frame, the scene sentence, an event ("the red circle turns black.") and <BoI>.
To redraw the frame the UNet must apply the event to the one object the event names and copy the others. This
probe takes the held-out stories whose event names an object of the first frame (moves, turns, disappearances) in a
frame of two or more objects, and asks two things of the LLM's state at <BoI> and of the UNet condition built from
it (the decoder Q-Former's tokens, the direct context and the pooled token, flattened):
  what:  the named object's colour and shape, and the event's kind (linear classifiers, against the majority class);
  where: the named object's centroid (a linear regression); scored as how often the object nearest the predicted
         point is the named one (against 1 / objects in the frame) and the mean error in pixels.
The "where" read-out is fitted twice: with each story's own first frame, and with the previous story's frame in its
place. The scene sentence names coarse places ("at the top left"), so the text alone gives some of it; only the gain
over the swapped frame comes from the picture. Read-outs are ridge least squares fitted on the first 3/4 of the
stories and scored on the rest. About 4 minutes for 400 stories on a 2-core CPU.
"""
import argparse
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
from model import MMInterleaved  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--checkpoint", default="out/small", help="a train.py output directory")
ap.add_argument("--n", type=int, default=400, help="stories (the first 3/4 fit the read-outs, the rest score them)")
ap.add_argument("--ridge", type=float, default=1e-2, help="ridge penalty (per sample)")
args = ap.parse_args()

model, tok = MMInterleaved.from_checkpoint(args.checkpoint)
S, K = model.cfg.image_size, model.cfg.num_image_tokens
split = data.ShapeStories("eval", seed=0, size=S)
stories, i = [], 0
while len(stories) < args.n:  # events that name an object of the first frame, in frames of 2-3 objects
    s, i = split[i], i + 1
    if s.events[1].kind != "appear" and len(s.objects[0]) >= 2:
        stories.append(s)
n_fit = 3 * len(stories) // 4


@torch.no_grad()
def features(swap):
    """(h at <BoI>, flattened UNet condition) per story, float64; swap: the previous story's frame instead."""
    hs, conds = [], []
    for b0 in range(0, len(stories), 32):
        batch = stories[b0:b0 + 32]
        prompts, images = [], []
        for j, s in enumerate(batch):
            ids, _ = data.tokenize_document([{"image": s.images[0]}, {"text": s.sentences[0]},
                                             {"text": s.sentences[1]}], tok, K)
            prompts.append(ids[:-1] + [tok.boi_id])  # as eval.py's continuation task: the document goes on
            frame = stories[b0 + j - 1].images[0] if swap else s.images[0]
            images.append(data.image_tensor(frame, S)[None])                              # (1, 3, S, S)
        cond, _ = model.prompt_conditions(prompts, images)                               # (B, Q', ctx)
        tokens = torch.full((len(prompts), max(map(len, prompts))), model.cfg.ids["pad"], dtype=torch.long)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = torch.tensor(p)
        h, _ = model.hidden_states(tokens, torch.cat(images), [1] * len(prompts))         # (B, T, dim)
        hs.append(torch.stack([h[b, len(p) - 1] for b, p in enumerate(prompts)]))       # the <BoI> state
        conds.append(cond.flatten(1))
    return torch.cat(hs).double(), torch.cat(conds).double()


def ridge(X, Y):
    """Fit on the first n_fit rows (a bias column added), predict the rest."""
    X = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    A, B = X[:n_fit], Y[:n_fit]
    W = torch.linalg.solve(A.T @ A + args.ridge * n_fit * torch.eye(X.shape[1], dtype=X.dtype), A.T @ B)
    return X[n_fit:] @ W


def classify(X, labels):
    """Held-out accuracy of a one-hot ridge classifier, and of always answering the majority class."""
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(v) for v in labels])
    acc = float((ridge(X, F.one_hot(y, len(classes)).double()).argmax(1) == y[n_fit:]).double().mean())
    return acc, max(float((y[n_fit:] == c).double().mean()) for c in range(len(classes)))


def named(s):
    e = s.events[1]
    return next(o for o in s.objects[0] if (o.colour, o.shape) == (e.colour, e.shape))


def locate(X):
    """How often the object nearest the predicted centroid is the named one, and the mean error (px)."""
    P = ridge(X, torch.tensor([[named(s).x / S, named(s).y / S] for s in stories], dtype=torch.float64)) * S
    right, err = 0, 0.0
    for s, (x, y) in zip(stories[n_fit:], P.tolist()):
        o = named(s)
        right += min(s.objects[0], key=lambda q: math.hypot(q.x - x, q.y - y)) is o
        err += math.hypot(o.x - x, o.y - y)
    return right / len(P), err / len(P)


own, other = features(False), features(True)
chance = np.mean([1 / len(s.objects[0]) for s in stories[n_fit:]])
print(f"{args.checkpoint}: {len(stories)} stories ({n_fit} fit, {len(stories) - n_fit} scored), ridge {args.ridge:g}")
print(f"{'read-out':<46} {'h(<BoI>)':>10} {'condition':>10} {'baseline':>9}")
for what, labels in (("named object's colour", [s.events[1].colour for s in stories]),
                     ("named object's shape", [s.events[1].shape for s in stories]),
                     ("event kind", [s.events[1].kind for s in stories])):
    (a_h, base), (a_c, _) = classify(own[0], labels), classify(own[1], labels)
    print(f"{what:<46} {100 * a_h:>9.1f}% {100 * a_c:>9.1f}% {100 * base:>8.1f}%")
for name, (h, c) in (("own frame", own), ("previous story's frame", other)):
    (r_h, e_h), (r_c, e_c) = locate(h), locate(c)
    print(f"{'where, ' + name + ': nearest is the named':<46} {100 * r_h:>9.1f}% {100 * r_c:>9.1f}% "
          f"{100 * chance:>8.1f}%")
    print(f"{'where, ' + name + ': mean error (px)':<46} {e_h:>10.1f} {e_c:>10.1f}")
