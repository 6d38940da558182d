"""How fast does each image path teach the LLM to read images? Caption-only training from scratch, side by side.

    python bench/probe_visual.py [--variants mmfs qformer qformer+pooled pixels] [--steps 400] [--batch-size 32]
    python bench/probe_visual.py --variants mmfs stem32 c1s2 --captions 128 --seed 1   # the SPM stem's settings
    python bench/probe_visual.py --aim out/small                 # where a trained LLM's MMFS reads (no training)

Every variant starts from the same fresh `--small` model (same seed) and trains on the same batches of one kind of
document only: `<s><BoI><image>×K` + the frame's scene sentence + `</s>`, the captioning case. Every `--every`
steps it prints the caption cross-entropy on 64 held-out frames with their own images ("right") and with the
next story's images ("swapped"). While the gap swapped − right is 0 the LLM is not using the image at all; the
step where it first passes `--threshold` is when reading starts. The variants:

  mmfs            the small model: visual tokens and MMFS reading the ViT's pyramid;
  qformer         --no-mmfs: the visual Q-Former's K tokens are the only image path;
  qformer+pooled  --no-mmfs with MMConfig.pooled_visual (each visual token also gets a linear view of one cell of
                  the neck's grid);
  pixels          --no-mmfs, the K visual tokens replaced by a linear map of raw pixel cells (no ViT, no Q-Former):
                  how fast this LLM learns to read the simplest possible image tokens;
  stem32          the small model with the ViT-Adapter's SPM stem 32 channels wide instead of 16
                  (ViTConfig.conv_inplane): the stem is the only part that sees every pixel of a 7-px object;
  c1s2            the small model with the SPM's finest map c1 at stride 2 (ViTConfig.c1_stride: 32×32 instead of
                  16×16, the stem's full resolution; the LLM then reads 32/8/4, the UNet 32/8/4/2);
  c1s2+stem32     both;
  p8              the small model with 8 points per head and level in the LLM's MMFS instead of 4 (the paper's 8);
  every1          the small model with an MMFS block in every LLM layer, not every 2nd.

`--offset-lr-scale` gives the MMFS sampling offsets their own learning rate, as a fraction of `--lr`: 1 (the
default, as this probe always ran) or 0.1 (train.py's parameter groups, the authors').

`--captions N` then writes greedy captions for N held-out first frames and scores them as eval.py does (exact
sentence, objects right, colour / shape / size at each object's place): the probe's losses say when reading
starts, the captions what is read. With MMFS it also prints where the LLM reads (`aim`): with the true caption fed
in, at each state that predicts an object's shape, the share of each MMFS layer's image weight on points within 4
px of that object, beside the same share for another object (is the reading aimed, or a fixed cloud?).

This is the probe behind EXPERIMENTS.md's findings on the visual Q-Former and on the SPM stem ("Two cheaper ways").
Seconds per step on a 2-core CPU: 0.23 (pixels), 0.51-0.53 (qformer, qformer+pooled), 0.60-0.90 (mmfs), 0.71-0.83
(stem32), 0.87 (c1s2), 0.85-1.03 (c1s2+stem32); the first four take about 13 minutes (without `--captions`).
The losses are seeded and repeated exactly between two runs on this machine.
"""
import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import llm  # noqa: E402
import eval as evaluate  # noqa: E402
import model as M  # noqa: E402
from bench.probe_caption_paths import shape_positions  # noqa: E402

VARIANTS = ("mmfs", "qformer", "qformer+pooled", "pixels", "stem32", "c1s2", "c1s2+stem32", "p8", "every1")

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="image paths to compare")
ap.add_argument("--steps", type=int, default=400, help="optimiser steps per variant")
ap.add_argument("--batch-size", type=int, default=32, help="caption documents per step")
ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (constant, no warm-up)")
ap.add_argument("--every", type=int, default=50, help="evaluate every N steps")
ap.add_argument("--threshold", type=float, default=0.05, help="gap (nats per token) that counts as reading")
ap.add_argument("--seed", type=int, default=0, help="seeds the init and the training stories")
ap.add_argument("--offset-lr-scale", type=float, default=1.0,
                help="the MMFS sampling offsets' lr as a fraction of --lr (train.py: 0.1, the authors' groups)")
ap.add_argument("--captions", type=int, default=0, metavar="N",
                help="after training, greedy captions of N held-out frames, scored as eval.py does")
ap.add_argument("--aim", nargs="+", metavar="DIR", help="train nothing: print where the LLM's MMFS of these "
                "train.py checkpoints reads (128 held-out frames, or --captions N)")
args = ap.parse_args()
torch.set_num_threads(min(2, os.cpu_count() or 1))

with tempfile.TemporaryDirectory() as tmp:  # the --small tokenizer, trained as train.py does
    tok = llm.Tokenizer.train(data.story_corpus(2000, args.seed), os.path.join(tmp, "tok"), 400)


class PixelCells(nn.Module):
    """K tokens from a √K × √K grid of raw pixel cells, one Linear: the simplest image tokens there are."""

    def __init__(self, k, image_size, dim):
        super().__init__()
        self.side = math.isqrt(k)
        self.cell = image_size // self.side
        self.proj = nn.Linear(3 * self.cell ** 2, dim)

    def forward(self, images):                                                           # (n, 3, S, S)
        cells = F.unfold(images, self.cell, stride=self.cell).transpose(1, 2)            # (n, K, 3·cell²)
        return self.proj(cells)                                                          # (n, K, dim)


def build(variant):
    torch.manual_seed(args.seed)
    cfg = M.preset("small", bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    cfg.llm = dataclasses.replace(cfg.llm, vocab_size=tok.n_vocab)
    if "stem32" in variant:
        cfg.vit = dataclasses.replace(cfg.vit, conv_inplane=32)
    if "c1s2" in variant:  # c1 is 32×32; MMFS reads it in place of the 16×16 level there no longer is
        cfg.vit = dataclasses.replace(cfg.vit, c1_stride=2)
        cfg.llm = dataclasses.replace(cfg.llm, mmfs_levels=(32, *cfg.llm.mmfs_levels[1:]))
        cfg.unet = dataclasses.replace(cfg.unet, mmfs_levels=(32, *cfg.unet.mmfs_levels[1:]))
    if variant == "p8":  # 8 points per head and level instead of 4
        cfg.llm = dataclasses.replace(cfg.llm, mmfs_points=8)
    if variant == "every1":  # an MMFS block in every LLM layer, not every 2nd
        cfg.llm = dataclasses.replace(cfg.llm, mmfs_every=1)
    if variant in ("qformer", "qformer+pooled", "pixels"):  # the --no-mmfs paths
        cfg = M.without_mmfs(cfg)
    cfg.pooled_visual = variant == "qformer+pooled"
    net = M.MMInterleaved(cfg)
    if variant == "pixels":  # the visual tokens come from pixels; the pyramid is unused without MMFS
        net.pixel_cells = PixelCells(cfg.num_image_tokens, cfg.image_size, cfg.llm.dim)
        net.encode_images = lambda images: (net.pixel_cells(images), [])
    return net


def batch(split, start, n, k, size):
    """n caption documents (stories start.. of a split) -> padded ids (n, T) and their first frames (n, 3, S, S)."""
    stories = [data.make_story(split, args.seed, start + i, size) for i in range(n)]
    b = data.collate([data.tokenize_document([{"image": s.images[0]}, {"text": s.sentences[0]}], tok, k)
                      for s in stories], tok.pad_id, size)
    return b["tokens"], b["images"]


def caption_ce(net, ids, images):
    """Mean cross-entropy of the sentence tokens (and </s>) given the image."""
    h, _ = net.hidden_states(ids, images, [1] * len(images))                             # (n, T, dim)
    labels = net.text_labels(ids)  # (n, T-1): <s> -> <BoI> and every <image> target are ignored (§3.5)
    return F.cross_entropy(net.logits(h[:, :-1]).flatten(0, 1), labels.flatten(), ignore_index=-100)


def aim(net, tok, stories, k, radius=4.0):
    """Where the LLM's MMFS reads when the true caption is fed in and the next word is an object's shape: per MMFS
    layer, the share of its image weight (the sink left out) on points within `radius` px of that object, and the
    same share for the points of another mention (the next one): aimed at the object or a fixed cloud?"""
    layers = [layer.llama_cross_attn for layer in net.llm.model.layers if layer.llama_cross_attn is not None]
    inputs = {}
    hooks = [m.attn.register_forward_pre_hook(lambda mod, a, i=i: inputs.__setitem__(i, a))
             for i, m in enumerate(layers)]
    size = net.cfg.image_size
    reads = [[] for _ in layers]  # per layer: (points px (M·L·P, 2), weights (M·L·P,), object (x, y)) per mention
    try:
        with torch.no_grad():
            for s in stories:
                ids, found = shape_positions(tok, s, k)  # the states that predict each object's SHAPE
                net.hidden_states(ids[None], data.image_tensor(s.images[0], size)[None], [1])
                for pos, o, _, _ in found:
                    for i, m in enumerate(layers):
                        q, ref, _, mask = inputs[i]
                        loc, w, _ = m.attn.sampling(q[:, pos:pos + 1], ref, mask[:, pos:pos + 1].bool())
                        reads[i].append((loc.reshape(-1, 2) * size, w.reshape(-1), torch.tensor([o.x, o.y])))
    finally:  # the model is the caller's: leave no hook on it
        for h in hooks:
            h.remove()

    def share(pairs):
        return sum((w * ((p - xy).norm(dim=-1) <= radius)).sum() / w.sum() for p, w, xy in pairs).item() / len(pairs)
    return [(share(r), share([(p, w, r[(j + 1) % len(r)][2]) for j, (p, w, _) in enumerate(r)])) for r in reads]


if args.aim:  # trained checkpoints: where their LLM reads, on the frames --captions would caption
    frames = [data.make_story("eval", args.seed, 1000 + i, 32) for i in range(args.captions or 128)]
    for d in args.aim:
        net, ck_tok = M.MMInterleaved.from_checkpoint(d)
        shares = aim(net.eval(), ck_tok, frames, net.cfg.num_image_tokens)
        print(f"{d}: MMFS weight near the shape's object, per LLM block (another object's): "
              + ", ".join(f"{a:.1%} ({b:.1%})" for a, b in shares))
    sys.exit(0)

results, scores = {}, {}
for variant in args.variants:
    net = build(variant)
    k, size = net.cfg.num_image_tokens, net.cfg.image_size
    offsets = [p for n, p in net.named_parameters() if "sampling_offsets" in n and p.requires_grad]
    rest = [p for n, p in net.named_parameters() if "sampling_offsets" not in n and p.requires_grad]
    opt = torch.optim.AdamW([dict(params=rest), dict(params=offsets, lr=args.lr * args.offset_lr_scale)],
                            lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    eval_ids, eval_images = batch("eval", 0, 64, k, size)
    reads_at, t0 = None, time.time()
    for step in range(args.steps + 1):
        if step % args.every == 0 or step == args.steps:
            net.eval()
            with torch.no_grad():
                right = caption_ce(net, eval_ids, eval_images).item()
                swapped = caption_ce(net, eval_ids, eval_images.roll(1, 0)).item()
            net.train()
            if not (math.isfinite(right) and math.isfinite(swapped)):
                sys.exit(f"probe_visual.py: error: {variant}: non-finite loss at step {step}")
            if reads_at is None and swapped - right > args.threshold:
                reads_at = step
            print(f"{variant:>15} step {step:4d}: caption CE right {right:.4f}, swapped {swapped:.4f}, "
                  f"gap {swapped - right:+.4f} ({time.time() - t0:.0f} s)", flush=True)
        if step == args.steps:
            break
        ids, images = batch("train", step * args.batch_size, args.batch_size, k, size)
        loss = caption_ce(net, ids, images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    results[variant] = (right, swapped, reads_at, (time.time() - t0) / args.steps)
    if args.captions:
        net.eval()
        stories = [data.make_story("eval", args.seed, 1000 + i, size) for i in range(args.captions)]
        with torch.no_grad():
            captions = evaluate.caption_task(net, tok, stories, argparse.Namespace(batch_size=64))
        scores[variant] = evaluate.score_captions(stories, captions)
        if net.cfg.llm.mmfs_every:
            scores[variant]["aim"] = aim(net, tok, stories, k)

print(f"\n{'variant':>15} | CE right | CE swapped | reads from step (gap > {args.threshold}) | s/step")
for variant, (right, swapped, reads_at, sps) in results.items():
    print(f"{variant:>15} | {right:8.4f} | {swapped:10.4f} | {'never' if reads_at is None else reads_at:>27} | "
          f"{sps:.2f}")
if scores:
    print(f"\n{'variant':>15} | {args.captions} held-out captions: exact | objects right | colour | shape | size | "
          f"MMFS weight near the shape's object, per layer (another object's)")
    for variant, sc in scores.items():
        near = ", ".join(f"{a:.0%} ({b:.0%})" for a, b in sc.get("aim", [])) or "-"
        print(f"{variant:>15} | {sc['caption_exact']:21.1%} | {sc['caption_objects']:13.1%} | "
              f"{sc['caption_colour']:6.1%} | {sc['caption_shape']:5.1%} | {sc['caption_size']:4.1%} | {near}")
