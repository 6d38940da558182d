"""Does the pyramid the UNet's MMFS reads hold each pixel's colour? A linear read-out per level, on a checkpoint.

    python bench/probe_pyramid.py --checkpoint out/small

A continuation copies the previous frame through MMFS: each UNet pixel samples the previous frame's pyramid
(ViT-Adapter maps, 16/8/4/2 in the small preset) around its own position. This probe asks whether that pyramid says,
at each pixel, which palette colour is there. For each level it bilinearly resizes the map to the frame's pixels
(what sampling at a pixel centre returns), applies the LayerNorm the UNet's MMFS applies (without its learned scale),
fits a linear least-squares classifier (ridge, one-hot targets: background or one of the palette colours) on the
first frames of `--train` held-out stories and scores it on the next `--test`. "Object pixels" leaves out the
background, which is most of a frame. Runs in about a minute on a 2-core CPU; nothing is trained but the read-out.
"""
import argparse
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
ap.add_argument("--train", type=int, default=512, help="frames the read-out is fitted on")
ap.add_argument("--test", type=int, default=256, help="frames it is scored on")
ap.add_argument("--ridge", type=float, default=1e-2, help="ridge penalty (per sample)")
args = ap.parse_args()

model, _ = MMInterleaved.from_checkpoint(args.checkpoint)
S = model.cfg.image_size
stories = data.ShapeStories("eval", seed=0, size=S)
frames = np.stack([stories[i].images[0] for i in range(args.train + args.test)])       # (n, S, S, 3) uint8
with torch.no_grad():
    _, pyramid = model.encode_images(torch.stack([data.image_tensor(f, S) for f in frames]))
# per-pixel class: 0 = background, k + 1 = palette colour k (frames are drawn in exact palette colours)
labels = np.zeros(frames.shape[:3], np.int64)
for k, c in enumerate(data.PALETTE.values()):
    labels[(frames == np.array(c, np.uint8)).all(-1)] = k + 1
labels = torch.from_numpy(labels)
n_cls = len(data.PALETTE) + 1
fg_share = float((labels > 0).float().mean())
print(f"{args.checkpoint}: {args.train} + {args.test} frames of {S}x{S}; object pixels are {100 * fg_share:.1f} %")
print(f"{'level':>6} {'pixels right':>13} {'object pixels right':>20}")
for level in pyramid:                                                                    # (n, C, s, s)
    C = level.shape[1]
    feats = F.interpolate(level.double(), size=(S, S), mode="bilinear", align_corners=False)
    feats = F.layer_norm(feats.permute(0, 2, 3, 1), (C,))                                # (n, S, S, C)
    feats = torch.cat([feats, torch.ones_like(feats[..., :1])], -1).reshape(len(frames), S * S, C + 1)
    X_tr, X_te = feats[:args.train].reshape(-1, C + 1), feats[args.train:].reshape(-1, C + 1)
    y_tr, y_te = labels[:args.train].reshape(-1), labels[args.train:].reshape(-1)
    Y = F.one_hot(y_tr, n_cls).double()
    W = torch.linalg.solve(X_tr.T @ X_tr + args.ridge * len(X_tr) * torch.eye(C + 1, dtype=X_tr.dtype), X_tr.T @ Y)
    pred = (X_te @ W).argmax(1)
    fg = y_te > 0
    print(f"{level.shape[-1]:>6} {100 * float((pred == y_te).double().mean()):>12.1f}% "
          f"{100 * float((pred[fg] == y_te[fg]).double().mean()):>19.1f}%")
