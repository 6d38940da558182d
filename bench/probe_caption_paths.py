"""Which path carries the picture into a caption? Captions with each of the LLM's MMFS blocks switched off, and
where on the pyramid the blocks read while captioning, on checkpoints.

    python bench/probe_caption_paths.py --checkpoint out/small [--checkpoint out/other ...] [--n 256]

The LLM sees a frame two ways: its K visual tokens (the resampler's, in the sequence) and its MMFS blocks, which
sample the ViT-Adapter pyramid (`llm.mmfs_levels`). Each block adds tanh(gate) · MMFS(...) to the residual stream,
so setting a gate to 0 removes that block and nothing else. This script captions the first frames of N held-out
stories greedily (as eval.py does) with every block on, with each block off, and with all off, and scores them
as eval.py does. Without MMFS the visual tokens are the only image path left, so "all off" tells how much they carry.
While the full model captions, it also records each block's softmax weight per head on each pyramid level and on
the sink (the weight that reads nothing), averaged over the generated tokens.

Last, is the shape read at the object's place? With the true captions fed in (frames of two or more objects), it
scores the shape word at each state that predicts one, as the model reads and with every point of the last block
pinned at those states on the object's centroid, then on another object's: a block that takes the shape from where
it looks names it far more often in the first case. About 30 s a checkpoint on a 2-core CPU.
"""
import argparse
import contextlib
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import eval as ev  # noqa: E402
from model import MMInterleaved  # noqa: E402


def mmfs_blocks(model):
    """The LLM's MMFS blocks (llm.CrossAttention), first layer first."""
    return [layer.llama_cross_attn for layer in model.llm.model.layers if layer.llama_cross_attn is not None]


@contextlib.contextmanager
def gates_off(model, which):
    """Inside, the blocks numbered in `which` add nothing (gate 0); their gates are restored on exit."""
    blocks = mmfs_blocks(model)
    saved = [b.gate.data.clone() for b in blocks]
    try:
        for i in which:
            blocks[i].gate.data.zero_()
        yield
    finally:
        for b, g in zip(blocks, saved):
            b.gate.data.copy_(g)


@contextlib.contextmanager
def level_shares(model):
    """Inside, every one-token decoding step adds each block's weights to a tally; on exit the yielded dict maps a
    block's number to its mean weight (heads, levels + 1): the share of each head on each level, then on the sink.
    Prompt passes (more than one query) are left out: the caption's own tokens are what reads the frame."""
    tallies, shares, patched = {}, {}, []
    for i, block in enumerate(mmfs_blocks(model)):
        attn = block.attn
        patched.append(attn)

        def sampling(query, reference_points, mask, attn=attn, orig=attn.sampling, i=i):
            loc, w, w_sink = orig(query, reference_points, mask)    # w (B, Lq, M, n·L, P), w_sink (B, Lq, M, n·L)
            if query.shape[1] == 1:
                B, _, M = w_sink.shape[:3]
                per_level = w.sum(-1).view(B, M, -1, attn.n_levels).sum(2)            # (B, M, L): summed over images
                row = torch.cat([per_level, w_sink.sum(-1).view(B, M, 1)], -1)         # (B, M, L + 1)
                total, count = tallies.get(i, (0, 0))
                tallies[i] = (total + row.sum(0).double(), count + B)
            return loc, w, w_sink

        attn.sampling = sampling
    try:
        yield shares
    finally:
        for attn in patched:
            del attn.sampling  # the instance attribute goes, the class's method shows again
        shares.update({i: total / count for i, (total, count) in tallies.items()})


@contextlib.contextmanager
def pinned(model, block, targets):
    """Inside, MMFS block number `block` reads every point of the query positions in `targets` ({position: (x, y)}
    in [0, 1] of the image, as MMFS locations are) at that one place; weights and every other position are as the
    model computes them. Rows of a batch share the targets. The patch is removed on exit."""
    attn = mmfs_blocks(model)[block].attn

    def sampling(query, reference_points, mask, orig=attn.sampling):
        loc, w, w_sink = orig(query, reference_points, mask)                  # loc (B, Lq, M, n·L, P, 2)
        if targets:
            loc = loc.clone()
            for pos, xy in targets.items():
                loc[:, pos] = torch.tensor(xy, dtype=loc.dtype, device=loc.device)
        return loc, w, w_sink

    attn.sampling = sampling
    try:
        yield
    finally:
        del attn.sampling


def shape_positions(tok, story, k):
    """The teacher-forced caption of a story's first frame -> (tokens (T,), [(position, object, candidates (3,),
    index of the true shape)]): at `position` the state predicts the object's shape word ("a SIZE COLOUR |SHAPE at
    ..."); `candidates` are the next tokens of the three shapes there. Objects whose three shapes do not start
    with three different tokens after the same prefix are left out."""
    sentence = story.sentences[0]
    words = sentence.rstrip(".").split()  # commas stay on their words, as they are tokens
    caption = tok.encode(sentence, bos=False)
    ids = [tok.bos_id] + tok.image_tokens(k) + caption
    starts = [i for i, w in enumerate(words) if w == "a"]  # "a SIZE COLOUR SHAPE at the PLACE", in order
    found = []
    for obj, a in zip(story.objects[0], starts):
        prefix = tok.encode(" ".join(words[:a + 3]), bos=False)
        nexts = [tok.encode(" ".join(words[:a + 3] + [shape]), bos=False) for shape in data.SHAPES]
        if any(n[:len(prefix)] != prefix or len(n) == len(prefix) for n in nexts):
            continue
        cand = torch.tensor([n[len(prefix)] for n in nexts])
        pos = len(ids) - len(caption) + len(prefix) - 1  # the prefix's last token
        if len(set(cand.tolist())) == 3 and ids[pos + 1] == int(cand[data.SHAPES.index(obj.shape)]):
            found.append((pos, obj, cand, data.SHAPES.index(obj.shape)))
    return torch.tensor(ids), found


def shape_reads(model, tok, stories, block=-1):
    """Is the shape read at the object's place? Teacher-forced shape words of first frames with two or more
    objects, the shape counted as named when its next token beats the other two shapes': as the model reads, with
    every point of MMFS block `block` (the last by default) at those states on the object's centroid, and on the
    next mention's object. -> ({"as trained", "on the object", "on another object"}: share of objects, count)."""
    k, size = model.cfg.num_image_tokens, model.cfg.image_size
    block = range(len(mmfs_blocks(model)))[block]
    right, count = {"as trained": 0, "on the object": 0, "on another object": 0}, 0
    with torch.no_grad():
        for story in stories:
            if len(story.objects[0]) < 2:
                continue
            ids, found = shape_positions(tok, story, k)
            if not found:
                continue
            image = data.to_tensor(story.images[0])[None]
            objs = story.objects[0]
            place = {name: {} for name in right}
            for pos, obj, _, _ in found:
                other = objs[(objs.index(obj) + 1) % len(objs)]
                place["on the object"][pos] = ((obj.x + 0.5) / size, (obj.y + 0.5) / size)  # pixel centres
                place["on another object"][pos] = ((other.x + 0.5) / size, (other.y + 0.5) / size)
            for name, targets in place.items():
                with pinned(model, block, targets):
                    h, _ = model.hidden_states(ids[None], image, [1])
                logits = model.logits(h)[0]                                              # (T, vocab)
                right[name] += sum(int(logits[pos, cand].argmax()) == true for pos, _, cand, true in found)
            count += len(found)
    return {name: r / max(count, 1) for name, r in right.items()}, count


def caption_scores(model, tok, stories, batch_size=64):
    """eval.py's caption task and scores -> {metric: float}."""
    with torch.no_grad():
        caps = ev.caption_task(model, tok, stories, argparse.Namespace(batch_size=batch_size))
    return {k: float(v) for k, v in ev.score_captions(stories, caps).items()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", default=[], help="train.py's --out directory (repeatable)")
    ap.add_argument("--n", type=int, default=256, help="held-out stories (eval split, seed 0: stories 0..n-1)")
    args = ap.parse_args()
    if not args.checkpoint:
        ap.error("give at least one --checkpoint")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    ev.log = lambda msg: None  # eval.py's progress lines
    for d in args.checkpoint:
        try:
            model, tok = MMInterleaved.from_checkpoint(d, device="cpu")
        except (OSError, ValueError) as e:
            sys.exit(f"probe_caption_paths.py: cannot load {d}: {str(e).splitlines()[0]}")
        model.eval()
        stories = [data.ShapeStories("eval", seed=0, size=model.cfg.image_size)[i] for i in range(args.n)]
        blocks = mmfs_blocks(model)
        if not blocks:
            sys.exit(f"probe_caption_paths.py: {d} has no MMFS blocks in its LLM (a --no-mmfs run)")
        print(f"{d}: captions of {args.n} held-out first frames (objects right / shape right at each place)")
        with level_shares(model) as shares:
            runs = [("every block on", caption_scores(model, tok, stories))]
        for i in range(len(blocks)):
            with gates_off(model, [i]):
                runs.append((f"block {i} off", caption_scores(model, tok, stories)))
        with gates_off(model, range(len(blocks))):
            runs.append(("all blocks off", caption_scores(model, tok, stories)))
        for name, m in runs:
            print(f"  {name:<15} {100 * m['caption_objects']:5.1f} % / {100 * m['caption_shape']:5.1f} %")
        levels = [f"{s}x{s}" for s in model.cfg.llm.mmfs_levels] + ["sink"]
        print(f"  weight per head while captioning ({' / '.join(levels)}):")
        for i, b in enumerate(blocks):
            heads = ", ".join(" / ".join(f"{100 * float(x):.0f}" for x in h) for h in shares[i])
            print(f"  block {i} (tanh gate {float(torch.tanh(b.gate.detach())):+.3f}): {heads} %", flush=True)
        reads, count = shape_reads(model, tok, stories)
        print(f"  shape word right, teacher-forced ({count} objects of frames with 2 or more), block "
              f"{len(blocks) - 1}'s points " + ", ".join(f"{name} {100 * r:.1f} %" for name, r in reads.items()),
              flush=True)
