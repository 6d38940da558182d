"""Do a trained ViT's pyramid maps say each object's shape where it lies? A linear probe, read off checkpoints.

    python bench/probe_features.py --checkpoint out/small [--checkpoint out/other ...] [--untrained] [--parts]

MMFS reads the pyramid by bilinear sampling, so this probe reads it the same way: for every object of N held-out
first frames it samples each level at the object's centroid (a (C,) vector per level), then fits a multinomial
logistic regression (L-BFGS, a small L2 penalty, features standardised) from those vectors to the object's shape
and, as a control, to its colour. It fits on the objects of two frames in three and scores on the third, so no
frame is in both halves. A level that gives a high shape accuracy here has the shape in a form one linear read
recovers; the LLM's MMFS blocks (which read `llm.mmfs_levels`, marked *) then only have to look in the right place.

`--parts` also probes what each level is a sum of (vit.ViTAdapter.forward): the spatial prior module's map of that
side (a small conv net on the pixels; read here as the module gives it, while the three coarse levels hold it as the
extractors leave it, after reading the ViT's tokens) and the ViT's token map after each interaction block (the
level of the same depth adds it, resized). They say which of the two carries the shape.

`--untrained` adds the `--small` model as train.py builds it before its first step (seed 0): the floor a trained
checkpoint should clear. Chance is 1/3 for shape; 1/6 for colour (6 colours), though colour is one linear read
of the pixels, so even random features give it. Deterministic: the same frames and fit every run. About 25 s a
checkpoint on a 2-core CPU.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import model as M  # noqa: E402


def first_frames(stories):
    """Each story's first frame, (N, 3, S, S) in [0, 1]."""
    return torch.stack([data.to_tensor(s.images[0]) for s in stories])


def centroid_features(maps, stories, size):
    """Maps [(N, C, s, s)] of N frames of `size` px -> (n_objects, len(maps), C) float64: every map sampled
    bilinearly at each object's centroid, as MMFS samples (grid_sample's convention, align_corners=False)."""
    feats = []
    for i, s in enumerate(stories):
        # grid_sample's (x, y) in [-1, 1] over the whole image: pixel x -> 2x/S - 1
        grid = torch.tensor([[[2 * o.x / size - 1, 2 * o.y / size - 1] for o in s.objects[0]]], dtype=maps[0].dtype)
        per_map = [F.grid_sample(m[i:i + 1], grid[:, None], align_corners=False)[0, :, 0].T  # (n_obj, C)
                   for m in maps]
        feats.append(torch.stack(per_map, 1))                                        # (n_obj, maps, C)
    return torch.cat(feats).double()


def object_features(net, stories):
    """Each story's first frame through net.encode_images -> per object, each pyramid level sampled at its
    centroid: features (n_objects, levels, C), shape and colour labels (n_objects,), frame index (n_objects,),
    and the levels' sides."""
    frames = first_frames(stories)                                                   # (N, 3, S, S)
    with torch.no_grad():
        _, pyramid = net.encode_images(frames)                                       # [(N, C, s, s)] per level
    objs = [(i, o) for i, s in enumerate(stories) for o in s.objects[0]]
    return (centroid_features(pyramid, stories, frames.shape[-1]),
            torch.tensor([data.SHAPES.index(o.shape) for _, o in objs]),
            torch.tensor([data.COLOURS.index(o.colour) for _, o in objs]),
            torch.tensor([i for i, _ in objs]), [p.shape[-1] for p in pyramid])


def adapter_parts(net, frames):
    """What each pyramid level is a sum of, caught with forward hooks while net.encode_images runs: the spatial
    prior module's four maps as it outputs them (a conv net on the pixels; before the extractors refine the three
    coarse ones) and the ViT's token map after each interaction block (the level of the same depth adds it,
    resized). -> {name: (N, D, s, s)}."""
    vit, caught = net.vit, {}
    g, sides = vit.cfg.grid, vit.cfg.pyramid_sizes

    def spm_hook(module, args, out):
        c1, tokens = out                                                              # (N, D, s1, s1), [(N, s², D)]
        caught[f"SPM {sides[0]}x{sides[0]}"] = c1
        for t, s in zip(tokens, sides[1:]):
            caught[f"SPM {s}x{s}"] = t.transpose(1, 2).reshape(len(t), -1, s, s)

    def block_hook(i):
        def hook(module, args, out):
            x = out[0]                                                                # (N, g², D), no CLS
            caught[f"ViT layers {vit.cfg.runs[i][0]}-{vit.cfg.runs[i][1]} {g}x{g}"] = x.transpose(1, 2).reshape(
                len(x), -1, g, g)
        return hook

    handles = [vit.adapter_spm.register_forward_hook(spm_hook)]
    handles += [b.register_forward_hook(block_hook(i)) for i, b in enumerate(vit.adapter_interactions)]
    try:
        with torch.no_grad():
            net.encode_images(frames)
    finally:
        for h in handles:
            h.remove()
    return caught


def linear_probe(x, y, test, n_classes, l2=1e-3):
    """Fit softmax regression on the rows not in `test`, return the accuracy on the rows in `test` (float64)."""
    train = ~test
    mean, std = x[train].mean(0), x[train].std(0).clamp(min=1e-6)
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], n_classes, dtype=x.dtype, requires_grad=True)
    b = torch.zeros(n_classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x[train] @ w + b, y[train]) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((x[test] @ w + b).argmax(1) == y[test]).double().mean())


def probe(net, stories, parts=False):
    """-> {level name: (shape accuracy, colour accuracy)}, one row per pyramid level and one for all of them; with
    `parts`, one more row per adapter_parts map."""
    feats, shape, colour, frame, sides = object_features(net, stories)
    test = frame % 3 == 0
    read = set(net.cfg.llm.mmfs_levels) if net.cfg.llm.mmfs_every else set()
    rows = {}
    for j, side in enumerate(sides):
        x = feats[:, j]
        rows[f"{side}x{side}{'*' if side in read else ''}"] = (linear_probe(x, shape, test, len(data.SHAPES)),
                                                               linear_probe(x, colour, test, len(data.COLOURS)))
    x = feats.flatten(1)
    rows["all levels"] = (linear_probe(x, shape, test, len(data.SHAPES)),
                          linear_probe(x, colour, test, len(data.COLOURS)))
    if parts:
        frames = first_frames(stories)
        for name, m in adapter_parts(net, frames).items():
            x = centroid_features([m], stories, frames.shape[-1])[:, 0]
            rows[name] = (linear_probe(x, shape, test, len(data.SHAPES)),
                          linear_probe(x, colour, test, len(data.COLOURS)))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", default=[], help="train.py's --out directory (repeatable)")
    ap.add_argument("--untrained", action="store_true", help="also probe the untrained --small model (seed 0)")
    ap.add_argument("--parts", action="store_true", help="also probe what the levels are sums of: the spatial prior "
                    "module's maps and the ViT's token map after each interaction block")
    ap.add_argument("--frames", type=int, default=600, help="held-out first frames (eval split, stories 0..N-1)")
    args = ap.parse_args()
    if not args.checkpoint and not args.untrained:
        ap.error("give at least one --checkpoint, or --untrained")
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    nets = []
    if args.untrained:
        torch.manual_seed(0)
        nets.append(("untrained --small", M.MMInterleaved(M.preset("small"))))
    for d in args.checkpoint:
        try:
            nets.append((d, M.MMInterleaved.from_checkpoint(d, device="cpu")[0]))
        except (OSError, ValueError) as e:
            sys.exit(f"probe_features.py: cannot load {d}: {str(e).splitlines()[0]}")
    by_size = {}
    for name, net in nets:
        net.eval()
        size = net.cfg.image_size
        if size not in by_size:
            by_size[size] = [data.make_story("eval", 0, i, size) for i in range(args.frames)]
        rows = probe(net, by_size[size], args.parts)
        n = sum(len(s.objects[0]) for s in by_size[size])
        print(f"{name}: {n} objects in {args.frames} frames; held-out accuracy, shape / colour (* = the LLM reads it)")
        for level, (acc_shape, acc_colour) in rows.items():
            print(f"  {level:<15} {100 * acc_shape:5.1f} % / {100 * acc_colour:5.1f} %", flush=True)
