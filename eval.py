"""Evaluate checkpoints on held-out ShapeStories (DESIGN §5): captions, text-to-image, continuation consistency.

    python eval.py --checkpoint out/small                        # 64 eval stories, table + out/small/eval.json
    python eval.py --checkpoint out/small --compare out/no-mmfs  # the --no-mmfs run in a second column
    python eval.py --checkpoint out/a --compare out/b out/c      # three columns, then a - b and a - c

Read top-down: the three tasks, each split into generation (needs the model) and scoring (pure: the deterministic
detector and parser of data.py read the outputs back), then `evaluate`, the table / JSON / image writers, `main`.
  1. captions: `<s><BoI><image>*K` with the story's first frame -> greedy text, first sentence vs the scene sentence
     (exact, objects right, and colour / shape / size right at each object's place); with --caption-rerank N also
     the caption checked by drawing: of the greedy one and N sampled ones, the one with the highest log p(caption |
     frame) (the LLM's reading) + log p(frame | caption) (the UNet's, its diffusion ELBO: model.py's drawing_nll;
     rows "checked by drawing"), and the bound a perfect ranker of those candidates would reach;
  2. text-to-image: `<s>` scene sentence `<BoI>` -> a frame, the objects it names looked up by colour and shape;
     with --rerank K also the best of K frames, the one the model itself captions likeliest (the same task with a
     generate-then-rank sampler: the rows "best of --rerank", beside the plain drawing's), and the bound a perfect
     ranker of those K frames would reach (the detector picking: it reads the answer, so it is no sampler);
     with --read-guidance S also the same drawings (same noise) under reading guidance: the model's own caption
     likelihood of the scene sentence steers each step's x0 estimate (model.py's reading_step; rows "read-guided");
  3. continuation: first frame, scene sentence, first event, `<BoI>` -> the next frame; centroid errors (px) of the
     objects the event left alone and of the moved one against where the event put it (inf when missing), and of
     the unmoved ones matched on shape alone (a copy in place in the wrong colour counts there), and the unmoved
     ones found per kind of event (an object appears / moves / turns / disappears);
  4. condition: does the UNet listen to the text at all? Each first frame is noised once per timestep and denoised
     under its own scene sentence's condition and under the previous story's; the gap is 1 - own loss / other loss
     (0: the text is ignored; it grows as the drawing follows the words). No sampling: cheap, and it moves long
     before text-to-image accuracy does.
Every story i < --n of the eval split is used, so two checkpoints see the same prompts and, since the diffusion
noise comes from one CPU generator seeded per task from --seed, the same noise (per batch: --batch-size matters).
Each fraction is printed ± its standard error over the eval stories (the story is the unit of sampling; the delta
method), and with --compare one more column per compared checkpoint gives the paired difference, the first minus
it, ± its standard error.
Neither error knows how much another training seed would move a run: that takes a second run.
The JSON holds the settings and per checkpoint its metrics and their std_errors (with one --compare DIR, the
difference; with several, the differences, one per DIR): fractions in [0, 1], errors in px, null where no story had
such an object or event, or where a median error is infinite (over half of those objects missing: see *_found;
*_found_px is the median over the found ones alone).
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import data
import diffusion
import weights
from model import MMInterleaved, check_reading, parse_window


def log(msg):
    """Progress goes to stderr; stdout holds only the table."""
    print(msg, file=sys.stderr, flush=True)


def chunks(items, n):
    """Consecutive slices of at most n items."""
    return [items[i:i + n] for i in range(0, len(items), n)]


def to_uint8(x):
    """(3, S, S) float in [0, 1] -> uint8 (S, S, 3), as the detector and PNGs want it."""
    return (x.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def first_sentence(text):
    """Up to and including the first "." (the model may go on to an event sentence)."""
    end = text.find(".")
    return (text if end < 0 else text[:end + 1]).strip()


# ---------------------------------------------------------------------------------------------------------------
# generation: model in, raw outputs out (captions as text, frames as uint8 (S, S, 3))

def written_sentence(tok, ids):
    """Generated ids -> the first sentence they say, without the `</s>` or `<BoI>` that stopped them."""
    if ids and ids[-1] in (tok.eos_id, tok.boi_id):
        ids = ids[:-1]
    return first_sentence(tok.decode(ids))


def add_sentences(cands, tok, outs):
    """Append to the list `cands` the first sentence written by each generated id list of `outs`, if it is not
    empty and not there yet: the candidates of a caption check (here and in sample.py)."""
    for ids in outs:
        text = written_sentence(tok, ids)
        if text and text not in cands:
            cands.append(text)


def caption_prompt(model, tok, stories):
    """The caption prompt `<s><BoI><image>*K` (ids) and how many tokens to let the model write after it: room for
    the longest true caption and then some (the model is never told where to stop)."""
    prompt = [tok.bos_id] + tok.image_tokens(model.cfg.num_image_tokens)
    need = max(len(tok.encode(s.sentences[0], bos=False)) for s in stories) + 8
    return prompt, min(need, model.cfg.llm.max_seq_len - len(prompt))


def caption_task(model, tok, stories, args):
    """Greedy caption of each story's first frame -> the first generated sentence per story."""
    size, dev = model.cfg.image_size, next(model.parameters()).device
    prompt, max_new = caption_prompt(model, tok, stories)
    out = []
    for part in chunks(stories, args.batch_size):
        tokens = torch.tensor([prompt] * len(part), device=dev)                              # (B, 2 + K)
        images = torch.stack([data.image_tensor(s.images[0], size) for s in part]).to(dev)   # (B, 3, S, S)
        out += [written_sentence(tok, ids)
                for ids in model.generate_text(tokens, images, max_new_tokens=max_new, temperature=0.0)]
        log(f"  captions {len(out)}/{len(stories)}")
    return out


CHECK_LEVELS, CHECK_DRAWS = 10, 2  # --caption-rerank: timesteps spread over the schedule, noise draws at each


def caption_candidates(model, tok, stories, args, greedy):
    """Per first frame, the greedy caption and then the distinct non-empty first sentences of --caption-rerank N
    samples at temperature 1 (seeded from --seed) -> a list of candidate captions per story, the greedy one first."""
    size, dev = model.cfg.image_size, next(model.parameters()).device
    prompt, max_new = caption_prompt(model, tok, stories)
    gen = torch.Generator().manual_seed(args.seed + 3)
    cands = [[g] for g in greedy]
    for part in chunks(list(range(len(stories))), args.batch_size):
        images = torch.stack([data.image_tensor(stories[i].images[0], size) for i in part]).to(dev)  # (B, 3, S, S)
        tokens = torch.tensor([prompt] * len(part), device=dev)
        for _ in range(args.caption_rerank):
            for i, ids in zip(part, model.generate_text(tokens, images, max_new_tokens=max_new, temperature=1.0,
                                                        generator=gen)):
                add_sentences(cands[i], tok, [ids])
    return cands


def check_captions(model, tok, stories, cands, args):
    """Two readings of each candidate caption c of each first frame x: log p(c | x), the LLM reading the frame, and
    -log p(x | c) in nats up to a constant, the UNet drawing it back (model.drawing_nll: CHECK_LEVELS timesteps
    spread evenly, CHECK_DRAWS noise draws at each, the same noise for every candidate of a frame)
    -> (read, drawn), lists of lists of floats shaped as cands; an empty caption reads as -inf."""
    size, dev = model.cfg.image_size, next(model.parameters()).device
    levels = diffusion.spread_timesteps(model.cfg.schedule.num_train_timesteps, CHECK_LEVELS, CHECK_DRAWS)  # (L,)
    gen = torch.Generator().manual_seed(args.seed + 4)
    noise = torch.randn(len(stories), len(levels), *model.diffusion_shape, generator=gen)  # (n, L, C, s, s)
    read = [[-math.inf] * len(cs) for cs in cands]
    drawn = [[0.0] * len(cs) for cs in cands]
    flat = [(i, j, tok.encode(c, bos=False)) for i, cs in enumerate(cands) for j, c in enumerate(cs)]
    flat = [f for f in flat if f[2]]  # an empty caption has nothing to score
    for part in chunks(flat, args.batch_size):
        story, texts = [i for i, _, _ in part], [t for _, _, t in part]
        images = torch.stack([data.image_tensor(stories[i].images[0], size) for i in story]).to(dev)  # (B, 3, S, S)
        lp = model.caption_logprob(images, texts).tolist()                                 # (B,) log p(c | x)
        nll = model.drawing_nll(images, texts, levels, noise[story]).tolist()              # (B,) -log p(x | c)
        for (i, j, _), r, d in zip(part, lp, nll):
            read[i][j], drawn[i][j] = r, d
    return read, drawn


def pick_captions(read, drawn, weight):
    """Per story the index of the candidate with the highest log p(c | x) - weight · (-log p(x | c)): the product of
    the two experts p(c | x) · p(x | c)^weight (ties: the earlier candidate, so the greedy caption first)."""
    return [max(range(len(r)), key=lambda j: r[j] - weight * d[j]) for r, d in zip(read, drawn)]


def caption_rerank_task(model, tok, stories, args, greedy):
    """Captions checked by drawing: per first frame the greedy caption and --caption-rerank N sampled ones, the one
    kept by pick_captions at --caption-weight. The LLM proposes, the UNet's likelihood of the frame under each
    proposal checks the shapes the reading gets wrong (EXPERIMENTS.md, "Captions checked by drawing").
    -> (captions, per story the chosen candidate's index (0: greedy), per story the candidates)."""
    cands = caption_candidates(model, tok, stories, args, greedy)
    log(f"  {sum(map(len, cands)) / len(stories):.2f} candidates a frame")
    best = pick_captions(*check_captions(model, tok, stories, cands, args), args.caption_weight)
    log(f"  the greedy caption kept for {best.count(0)} of {len(stories)}")
    return [cs[j] for cs, j in zip(cands, best)], best, cands


def draw(model, prompts, images, args, seed, what, read_texts=None):
    """Batched generate_images with its own seeded CPU generator -> uint8 frames. With read_texts (one id list per
    prompt), under reading guidance as --read-guidance, --read-window and --read-iters set it."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    texts = read_texts or [None] * len(prompts)
    for p, im, tx in zip(chunks(prompts, args.batch_size), chunks(images, args.batch_size),
                         chunks(texts, args.batch_size)):
        read = dict(read_texts=tx, read_scale=args.read_guidance, read_window=args.read_window,
                    read_iters=args.read_iters) if read_texts is not None else {}
        x = model.generate_images(p, im, steps=args.steps, guidance=args.guidance, sampler=args.sampler,
                                  generator=gen, **read)                                  # (B, 3, S, S)
        out += [to_uint8(f) for f in x]
        log(f"  {what} {len(out)}/{len(prompts)}")
    return out


def t2i_task(model, tok, stories, args, seed=None, what="text-to-image", read=False):
    """`<s>` scene sentence `<BoI>` -> the drawn first frame per story (noise from `seed`, default --seed); with
    `read`, under reading guidance toward the scene sentence itself."""
    size = model.cfg.image_size
    prompts = [tok.encode(s.sentences[0]) + [tok.boi_id] for s in stories]
    texts = [p[1:-1] for p in prompts] if read else None  # the sentence between <s> and <BoI>
    return draw(model, prompts, [torch.zeros(0, 3, size, size)] * len(stories), args,
                args.seed if seed is None else seed, what, read_texts=texts)


def rerank_task(model, tok, stories, args, first):
    """Best of --rerank K drawings per scene sentence, by the model's own reading: log p(sentence | frame) with the
    frame first, as a caption, for each candidate -> (frames, chosen candidate per story). Candidate 0 is `first`,
    the t2i task's drawing, so a story's best is never worse-scored than its plain one; candidate j > 0 draws with
    seed + 1000 j. A generate-then-rank sampler (as DALL-E's CLIP reranking), with the model as its own ranker.
    Also returns the K candidates' frames (K lists of n), for the detector's bound in `evaluate`."""
    cands = [first] + [t2i_task(model, tok, stories, args, args.seed + 1000 * j, f"candidate {j}")
                       for j in range(1, args.rerank)]
    texts = [tok.encode(s.sentences[0], bos=False) for s in stories]
    scores = torch.stack([caption_scores(model, frames, texts, args.batch_size) for frames in cands])  # (K, n)
    best = scores.argmax(0).tolist()                                                       # (n,) candidate index
    log(f"  reranked {len(stories)}: the plain drawing kept for {best.count(0)}")
    return [cands[j][i] for i, j in enumerate(best)], best, cands


def caption_scores(model, frames, texts, batch_size):
    """log p(text | frame) per uint8 frame, the frame read first as in a caption (caption_logprob) -> (n,) on the
    CPU, in batches of batch_size."""
    size, dev = model.cfg.image_size, next(model.parameters()).device
    out = []
    for fr, tx in zip(chunks(frames, batch_size), chunks(texts, batch_size)):
        images = torch.stack([data.image_tensor(f, size) for f in fr]).to(dev)             # (B, 3, S, S)
        out.append(model.caption_logprob(images, tx).cpu())
    return torch.cat(out)


def continuation_task(model, tok, stories, args):
    """First frame, scene sentence, first event, `<BoI>` -> the drawn second frame per story."""
    k, size = model.cfg.num_image_tokens, model.cfg.image_size
    prompts, images = [], []
    for s in stories:
        doc = [{"image": s.images[0]}, {"text": s.sentences[0]}, {"text": s.sentences[1]}]
        ids, _ = data.tokenize_document(doc, tok, k)
        prompts.append(ids[:-1] + [tok.boi_id])  # drop </s>: the document goes on with an image
        images.append(data.image_tensor(s.images[0], size)[None])                            # (1, 3, S, S)
    return draw(model, prompts, images, args, args.seed + 1, "continuation")


CONDITION_T = (100, 60, 30)  # timesteps of the condition check, in % of the schedule (T-1, 0.6 (T-1), 0.3 (T-1))


@torch.no_grad()
def condition_task(model, tok, stories, args):
    """Per story and timestep: the diffusion loss of its first frame under its own condition and under the previous
    story's (same noise; with one story that is itself) -> {"own": (n, len(CONDITION_T)), "other": ...} tensors."""
    size, sched = model.cfg.image_size, model.cfg.schedule
    prompts = [tok.encode(s.sentences[0]) + [tok.boi_id] for s in stories]
    parts, conds = [], []
    for p in chunks(list(range(len(stories))), args.batch_size):
        cond, kw = model.prompt_conditions([prompts[i] for i in p], [torch.zeros(0, 3, size, size)] * len(p))
        parts.append((p, kw))
        conds.append(cond)
    conds = torch.cat(conds)                                                               # (n, Q, ctx)
    gen = torch.Generator().manual_seed(args.seed + 2)
    losses = {"own": [], "other": []}
    for p, kw in parts:
        frames = torch.stack([data.image_tensor(stories[i].images[0], size) for i in p])  # (B, 3, S, S)
        x0 = model.to_diffusion_space(frames.to(conds.device)).to(conds.dtype)
        own, other = conds[p], conds[[(i - 1) % len(stories) for i in p]]
        row = {"own": [], "other": []}
        for pct in CONDITION_T:
            t = torch.full((len(p),), round(pct / 100 * (sched.num_train_timesteps - 1)), device=x0.device)
            noise = torch.randn(x0.shape, generator=gen).to(x0)
            xt = diffusion.q_sample(x0, t, noise, sched)
            target = diffusion.training_target(x0, noise, t, sched)
            for name, cond in (("own", own), ("other", other)):
                pred = model.unet_forward(xt, t, cond, **kw)
                row[name].append((pred.float() - target.float()).pow(2).flatten(1).mean(1).cpu())  # (B,)
        for name in losses:
            losses[name].append(torch.stack(row[name], 1))                                # (B, len(CONDITION_T))
    log(f"  condition {len(stories)}/{len(stories)}")
    return {name: torch.cat(v) for name, v in losses.items()}


# ---------------------------------------------------------------------------------------------------------------
# scoring: outputs in, metrics out (no model needed)

class Ratio(float):
    """A pooled fraction sum(num) / sum(den) over the stories that keeps its per-story terms, so that its sampling
    error can be estimated with the story as the unit: a story's objects share one prompt and one noise draw, so
    they are not independent samples. Everywhere else it is a plain float."""

    def __new__(cls, num, den):
        num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)     # (n_stories,) each
        self = super().__new__(cls, num.sum() / den.sum())
        self.num, self.den = num, den
        return self

    def influence(self):
        """How much each story moves the ratio, to first order (the delta method): (num_i - R den_i) / sum(den)."""
        return (self.num - float(self) * self.den) / self.den.sum()


def ratio(num, den):
    """Ratio of per-story counts; None when no story had anything to count."""
    return Ratio(num, den) if sum(den) > 0 else None


def rate(flags):
    """Fraction of True among the applicable (non-None) flags, one per story; None when none applies."""
    flags = list(flags)
    return ratio([bool(f) for f in flags], [f is not None for f in flags])


def std_error(influence):
    """Standard error from per-story influence terms z_i (of one ratio, or z_a - z_b for a paired difference of
    two checkpoints on the same stories): sqrt(n / (n - 1) * sum z_i^2). It measures which stories (and noise) the
    evaluation drew, not the training run's own seed; nan for a single story."""
    n = len(influence)
    return math.sqrt(n / (n - 1) * float(np.sum(np.square(influence)))) if n > 1 else math.nan


def median(errs):
    """Median with inf (a missing object) counted like any other error: inf when over half are missing."""
    return float(np.median(errs)) if errs else None


def score_captions(stories, captions):
    """Exact-caption accuracy, the fraction of true objects the captions name right, and per attribute."""
    r = [data.score_caption(c, s.sentences[0]) for s, c in zip(stories, captions)]
    n = [x["n_true"] for x in r]
    return {"caption_exact": rate(x["exact"] for x in r), "caption_objects": ratio([x["n_correct"] for x in r], n),
            **{f"caption_{a}": ratio([x[f"n_{a}"] for x in r], n) for a in data.ATTRIBUTES}}


def score_t2i(stories, frames):
    """Named objects found by colour + shape, exact (size and place too), mean extra objects per frame; and the
    chance level: the objects of the previous story's sentence found in each frame, which its own text cannot have
    helped draw (with one story, that is its own sentence)."""
    dets = [data.detect(f) for f in frames]
    r = [data.score_text_to_image(s.sentences[0], f, d) for s, f, d in zip(stories, frames, dets)]
    other = [data.score_text_to_image(stories[i - 1].sentences[0], f, d) for i, (f, d) in enumerate(zip(frames, dets))]
    n, one = [x["n"] for x in r], [1] * len(r)
    return {"t2i_objects": ratio([x["found"] for x in r], n), "t2i_exact": ratio([x["exact"] for x in r], n),
            "t2i_extra": ratio([x["extra"] for x in r], one),
            "t2i_objects_other": ratio([x["found"] for x in other], [x["n"] for x in other])}


def score_continuations(stories, frames):
    """Median centroid errors (px) of unmoved / moved objects over all stories, fractions found, event checks."""
    r = [data.score_continuation(s.objects[0], s.events[1], f) for s, f in zip(stories, frames)]
    out = {}
    # unmoved_shape: the unmoved objects matched on shape alone (any colour), scored the same way
    for role in ("unmoved", "moved", "unmoved_shape"):
        errs = [e for x in r for e in x[f"{role}_err"]]
        out[f"{role}_median_px"] = median(errs)
        # the same over the objects the detector found: how exact the copy is where there is one (the goal counts
        # a missing object as infinitely far, so this one can be small while the median above is inf)
        out[f"{role}_found_px"] = median([e for e in errs if math.isfinite(e)])
        out[f"{role}_found"] = ratio([sum(map(math.isfinite, x[f"{role}_err"])) for x in r],
                                     [len(x[f"{role}_err"]) for x in r])
        out[f"{role}_count"] = len(errs)
    def unmoved_found(flags):  # the unmoved objects found in the stories flagged
        return ratio([sum(map(math.isfinite, x["unmoved_err"])) if f else 0 for f, x in zip(flags, r)],
                     [len(x["unmoved_err"]) if f else 0 for f, x in zip(flags, r)])
    # per kind of event: copying works when the event only adds an object; a move, a turn or a disappearance also
    # asks which object the words name, and a wrong guess loses a bystander
    events = [s.events[1] for s in stories]
    for kind in data.EVENT_WEIGHTS:
        out[f"unmoved_found_{kind}"] = unmoved_found([e.kind == kind for e in events])
    # and, for those three, by whether another object of the frame has the colour of the one the event names: then
    # the colour word does not say which object is meant, only the shape does
    shared = [data.names_shared_colour(s.objects[0], e) for s, e in zip(stories, events)]
    out["unmoved_found_shared_colour"] = unmoved_found(shared)
    out["unmoved_found_own_colour"] = unmoved_found([e.kind != "appear" and not sh for e, sh in zip(events, shared)])
    out["appeared_ok"] = rate(x["appeared_ok"] for x in r)
    out["gone_ok"] = rate(x["gone_ok"] for x in r)
    out["cont_extra"] = ratio([x["extra"] for x in r], [1] * len(r))
    return out


def score_condition(stories, losses):
    """Per timestep: 1 - mean own-condition loss / mean other-condition loss (> 0: the right text helps), written as
    the ratio sum(other - own) / sum(other) over the stories."""
    own, other = losses["own"].double().numpy(), losses["other"].double().numpy()      # (n, len(CONDITION_T))
    return {f"cond_gap_t{pct}": Ratio(other[:, k] - own[:, k], other[:, k]) for k, pct in enumerate(CONDITION_T)}


def evaluate(model, tok, stories, args):
    """All four tasks on one model -> (metrics, outputs); outputs keep the captions and frames for pictures."""
    metrics, outputs = {}, {}
    for name, task, score in (("captions", caption_task, score_captions), ("t2i", t2i_task, score_t2i),
                              ("continuation", continuation_task, score_continuations),
                              ("condition", condition_task, score_condition)):
        t0 = time.time()
        log(f"{name}:")
        outputs[name] = task(model, tok, stories, args)
        metrics.update(score(stories, outputs[name]))
        log(f"  done in {time.time() - t0:.1f} s")
        if name == "captions" and args.caption_rerank > 0:  # the greedy caption, N sampled ones, the best checked
            t0 = time.time()
            log(f"captions, best of {args.caption_rerank} samples and the greedy one, checked by drawing:")
            outputs["captions_best"], chosen, cands = caption_rerank_task(model, tok, stories, args,
                                                                          outputs["captions"])
            best = score_captions(stories, outputs["captions_best"])
            metrics.update({k.replace("caption_", "caption_best_"): v for k, v in best.items()})
            greedy = metrics["caption_objects"]  # the same stories and objects: the gain, paired story by story
            metrics["caption_best_gain"] = ratio(best["caption_objects"].num - greedy.num, greedy.den)
            metrics["caption_best_greedy_kept"] = rate([j == 0 for j in chosen])
            metrics["caption_best_candidates"] = ratio([len(c) for c in cands], [1] * len(cands))
            # the candidate that names the most objects right: what a perfect ranker of these could reach (a bound
            # that reads the answer, as t2i_best_bound)
            right = [max(data.score_caption(c, s.sentences[0])["n_correct"] for c in cs)
                     for s, cs in zip(stories, cands)]
            metrics["caption_best_bound"] = ratio(right, greedy.den)
            log(f"  done in {time.time() - t0:.1f} s")
        if name == "t2i" and args.rerank > 1:  # the same drawings, then K - 1 more, the best by the model's reading
            t0 = time.time()
            log(f"text-to-image, best of {args.rerank}:")
            outputs["t2i_best"], chosen, cands = rerank_task(model, tok, stories, args, outputs["t2i"])
            best = score_t2i(stories, outputs["t2i_best"])
            metrics.update({k.replace("t2i_", "t2i_best_"): v for k, v in best.items() if k != "t2i_objects_other"})
            metrics["t2i_best_plain_kept"] = rate([j == 0 for j in chosen])
            plain = metrics["t2i_objects"]  # the same stories and objects: the gain, paired story by story
            metrics["t2i_best_gain"] = ratio(best["t2i_objects"].num - plain.num, plain.den)
            # the candidate the detector itself would keep: what a perfect ranker of these K drawings could reach.
            # A bound that reads the answer, never a sampler: it says how much is the ranker's to win
            found = np.max([score_t2i(stories, c)["t2i_objects"].num for c in cands], axis=0)    # (n,)
            metrics["t2i_best_bound"] = ratio(found, plain.den)
            log(f"  done in {time.time() - t0:.1f} s")
        if name == "t2i" and args.read_guidance > 0:  # the same prompts and noise, steered by the model's reading
            t0 = time.time()
            log(f"text-to-image, read-guided ({args.read_guidance}):")
            outputs["t2i_read"] = t2i_task(model, tok, stories, args, what="read-guided", read=True)
            read = score_t2i(stories, outputs["t2i_read"])
            metrics.update({k.replace("t2i_", "t2i_read_"): v for k, v in read.items() if k != "t2i_objects_other"})
            plain = metrics["t2i_objects"]
            metrics["t2i_read_gain"] = ratio(read["t2i_objects"].num - plain.num, plain.den)
            log(f"  done in {time.time() - t0:.1f} s")
    return metrics, outputs


# ---------------------------------------------------------------------------------------------------------------
# reporting

ROWS = [  # (key, label, as a percentage?)
    ("caption_exact", "caption: exact sentence", True),
    ("caption_objects", "caption: objects right", True),
    ("caption_colour", "caption: colour right (by place)", True),
    ("caption_shape", "caption: shape right (by place)", True),
    ("caption_size", "caption: size right (by place)", True),
    ("caption_best_exact", "caption, checked by drawing: exact sentence", True),
    ("caption_best_objects", "caption, checked by drawing: objects right", True),
    ("caption_best_colour", "caption, checked by drawing: colour right", True),
    ("caption_best_shape", "caption, checked by drawing: shape right", True),
    ("caption_best_size", "caption, checked by drawing: size right", True),
    ("caption_best_gain", "caption, checked by drawing: objects right, gain", True),
    ("caption_best_greedy_kept", "caption, checked by drawing: the greedy one kept", True),
    ("caption_best_candidates", "caption, checked by drawing: candidates / frame", False),
    ("caption_best_bound", "caption, checked by drawing: best candidate (a bound)", True),
    ("t2i_objects", "text->image: objects found (colour, shape)", True),
    ("t2i_exact", "text->image: objects exact (+ size, place)", True),
    ("t2i_extra", "text->image: extra objects / frame", False),
    ("t2i_objects_other", "text->image: found for another story's text", True),
    ("t2i_best_objects", "text->image, best of --rerank: objects found", True),
    ("t2i_best_exact", "text->image, best of --rerank: objects exact", True),
    ("t2i_best_extra", "text->image, best of --rerank: extra objects / frame", False),
    ("t2i_best_gain", "text->image, best of --rerank: objects found, gain", True),
    ("t2i_best_plain_kept", "text->image, best of --rerank: the plain drawing kept", True),
    ("t2i_best_bound", "text->image, best of --rerank by the detector (a bound)", True),
    ("t2i_read_objects", "text->image, read-guided: objects found", True),
    ("t2i_read_exact", "text->image, read-guided: objects exact", True),
    ("t2i_read_extra", "text->image, read-guided: extra objects / frame", False),
    ("t2i_read_gain", "text->image, read-guided: objects found, gain", True),
    ("unmoved_median_px", "continuation: unmoved median error (px)", False),
    ("unmoved_found", "continuation: unmoved found", True),
    ("unmoved_found_px", "continuation: unmoved found: median error (px)", False),
    *[(f"unmoved_found_{k}", f"continuation: unmoved found, {k} events", True) for k in data.EVENT_WEIGHTS],
    ("unmoved_found_shared_colour", "continuation: unmoved found, named colour shared", True),
    ("unmoved_found_own_colour", "continuation: unmoved found, named colour its own", True),
    ("unmoved_shape_median_px", "continuation: unmoved, any colour: median error (px)", False),
    ("unmoved_shape_found", "continuation: unmoved, any colour: found", True),
    ("moved_median_px", "continuation: moved median error (px)", False),
    ("moved_found", "continuation: moved found", True),
    ("moved_found_px", "continuation: moved found: median error (px)", False),
    ("appeared_ok", "continuation: appeared right", True),
    ("gone_ok", "continuation: disappeared right", True),
    ("cont_extra", "continuation: extra objects / frame", False),
    ("cond_gap_t100", "condition: loss gap vs other text, t=T-1", True),
    ("cond_gap_t60", "condition: loss gap vs other text, t=0.6(T-1)", True),
    ("cond_gap_t30", "condition: loss gap vs other text, t=0.3(T-1)", True),
]


def fmt(v, pct):
    """One table cell; None: no story had such an object or event."""
    return "n/a" if v is None else f"{100 * v:.1f}%" if pct else f"{v:.2f}"


def finite(metrics):
    """JSON has no inf: an infinite median error (over half the objects missing) is written as null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}


def std_errors(metrics):
    """key -> standard error of each Ratio metric (its sampling error over the eval stories)."""
    return {k: std_error(v.influence()) for k, v in metrics.items() if isinstance(v, Ratio)}


def differences(a, b):
    """key -> (a - b, its standard error) for the Ratio metrics of two checkpoints scored on the same stories. Paired:
    smaller than either run's own error where both find the same stories hard, no smaller where they do not."""
    same = [k for k, v in a.items() if isinstance(v, Ratio) and isinstance(b.get(k), Ratio)
            and len(v.num) == len(b[k].num)]
    return {k: (float(a[k]) - float(b[k]), std_error(a[k].influence() - b[k].influence())) for k in same}


def cell(v, se, pct):
    """A value with its standard error, e.g. "30.6% ± 2.3" (a fraction, in points) or "1.12 ± 0.05"."""
    if v is None or se is None or not math.isfinite(se):
        return fmt(v, pct)
    return f"{100 * v:.1f}% ± {100 * se:.1f}" if pct else f"{v:.2f} ± {se:.2f}"


def table(results):
    """Metrics as rows, one column per checkpoint (value ± standard error over the eval stories); with two or more
    checkpoints, one more column per later checkpoint holds the paired difference, first minus it, ± its standard
    error."""
    names = [r["checkpoint"] for r in results]
    ses = [std_errors(r["metrics"]) for r in results]
    diffs = [differences(results[0]["metrics"], r["metrics"]) for r in results[1:]]
    nth = ("second", "third", "fourth", "fifth", "sixth")
    head = names + [f"first - {nth[i] if i < len(nth) else f'#{i + 2}'}" for i in range(len(diffs))]
    w0, w = max(len(label) for _, label, _ in ROWS), max(15, *map(len, head))
    lines = [f"{'':<{w0}}  " + "  ".join(f"{n:>{w}}" for n in head)]
    for key, label, pct in ROWS:
        if all(key not in r["metrics"] for r in results):  # a row of an option no run used (--rerank, ...)
            continue
        cells = [cell(r["metrics"].get(key), se.get(key), pct) for r, se in zip(results, ses)]
        for diff in diffs:
            d, se = diff.get(key, (None, None))
            cells.append("" if d is None else f"{100 * d:+.1f} ± {100 * se:.1f}" if pct else f"{d:+.2f} ± {se:.2f}")
        lines.append(f"{label:<{w0}}  " + "  ".join(f"{c:>{w}}" for c in cells))
    return "\n".join(lines)


def report(settings, results):
    """The JSON report: the settings, each checkpoint's metrics and their standard errors, and the paired
    differences of the first checkpoint against each later one."""
    out = {"settings": settings,
           "results": [{"checkpoint": r["checkpoint"], "metrics": finite(r["metrics"]),
                        "std_errors": finite(std_errors(r["metrics"]))} for r in results]}
    # first minus each later checkpoint on the same stories, and the standard error of that difference
    paired = [{k: finite(dict(value=d, std_error=se)) for k, (d, se) in
               differences(results[0]["metrics"], r["metrics"]).items()} for r in results[1:]]
    if len(paired) == 1:
        out["difference"] = paired[0]
    elif paired:
        out["differences"] = [{"checkpoint": r["checkpoint"], "difference": p} for r, p in zip(results[1:], paired)]
    return out


def save_grid(path, rows, zoom=4):
    """One picture per task: per row some frames side by side and a few lines of text under them."""
    font = ImageFont.load_default()
    n = rows[0][0][0].shape[0] * zoom
    cols = max(len(frames) for frames, _ in rows)
    lines = max(len(texts) for _, texts in rows)
    row_h = n + 4 + 12 * lines + 8
    width = max(cols * (n + 4), 7 * max(len(t) for _, texts in rows for t in texts) + 10)
    canvas = Image.new("RGB", (width, row_h * len(rows)), (200, 200, 200))
    pen = ImageDraw.Draw(canvas)
    for r, (frames, texts) in enumerate(rows):
        for c, img in enumerate(frames):
            canvas.paste(Image.fromarray(img).resize((n, n), Image.NEAREST), (c * (n + 4), r * row_h))
        for i, text in enumerate(texts):
            pen.text((2, r * row_h + n + 4 + 12 * i), text, fill=(0, 0, 0), font=font)
    canvas.save(path)


def save_images(directory, stories, results, max_rows=12):
    """captions.png (frame; truth and each checkpoint's caption), t2i.png and continuation.png (truth, then each
    checkpoint's frame; t2i.png then each best of --rerank and each read-guided) for the first stories."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    outs = [r["outputs"] for r in results]
    ss = list(enumerate(stories))[:max_rows]
    save_grid(directory / "captions.png", [([s.images[0]], [f"true: {s.sentences[0]}"] + [
        f"[{j}]:  {o['captions'][i]}" for j, o in enumerate(outs)] + [
        f"[{j}] checked:  {o['captions_best'][i]}" for j, o in enumerate(outs) if "captions_best" in o])
        for i, s in ss])
    save_grid(directory / "t2i.png", [([s.images[0]] + [o["t2i"][i] for o in outs] +  # then each best of --rerank
                                       [o["t2i_best"][i] for o in outs if "t2i_best" in o] +
                                       [o["t2i_read"][i] for o in outs if "t2i_read" in o], [s.sentences[0]])
                                      for i, s in ss])
    save_grid(directory / "continuation.png", [([s.images[0], s.images[1]] + [o["continuation"][i] for o in outs],
                                                [s.sentences[1]]) for i, s in ss])


# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Evaluate MM-Interleaved checkpoints on held-out ShapeStories.")
    g = ap.add_argument_group("checkpoints")
    g.add_argument("--checkpoint", default="out/small", metavar="DIR", help="checkpoint directory (train.py --out)")
    g.add_argument("--compare", nargs="+", default=[], metavar="DIR",
                   help="more checkpoints (e.g. the --no-mmfs run), side by side, each paired with the first")
    g = ap.add_argument_group("data")
    g.add_argument("--n", type=int, default=64, help="number of eval stories (stories 0..n-1)")
    g.add_argument("--seed", type=int, default=0, help="eval split seed; also seeds the diffusion noise")
    g = ap.add_argument_group("generation")
    g.add_argument("--steps", type=int, default=20, help="diffusion sampling steps")
    g.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    g.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="diffusion sampler")
    g.add_argument("--rerank", type=int, default=1, metavar="K", help="also draw each scene K times and keep the "
                   "drawing the model itself captions likeliest (rows 'best of --rerank'; 1: off)")
    g.add_argument("--read-guidance", type=float, default=0.0, metavar="S", help="also draw each scene under "
                   "reading guidance of step S (0.3 measured, EXPERIMENTS.md; rows 'read-guided'; 0: off)")
    g.add_argument("--read-window", default="300,900", metavar="LO,HI",
                   help="timesteps (of the training schedule's) where reading guidance acts")
    g.add_argument("--read-iters", type=int, default=4, metavar="N", help="reading-guidance steps per sampling step")
    g.add_argument("--caption-rerank", type=int, default=0, metavar="N", help="also sample N captions of each "
                   "frame and keep, of them and the greedy one, the likeliest read (LLM) and drawn back (UNet) "
                   "(rows 'checked by drawing'; 0: off)")
    g.add_argument("--caption-weight", type=float, default=1.0, metavar="W", help="--caption-rerank's score: "
                   "log p(caption | frame) + W x log p(frame | caption), the UNet's ELBO in nats")
    g.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    g = ap.add_argument_group("output")
    g.add_argument("--out", metavar="FILE", help="metrics JSON (default: <checkpoint>/eval.json)")
    g.add_argument("--save-images", metavar="DIR", help="save captions.png, t2i.png, continuation.png here")
    args = ap.parse_args(argv)
    if args.n < 1 or args.steps < 1 or args.batch_size < 1 or args.rerank < 1:
        ap.error("--n, --steps, --rerank and --batch-size must be >= 1")
    if args.caption_rerank < 0 or not 0 <= args.caption_weight < math.inf:
        ap.error("--caption-rerank and --caption-weight must be >= 0 (and the weight finite)")
    try:
        args.read_window = parse_window(args.read_window)
        check_reading(args.read_guidance, args.read_window, args.read_iters)
    except ValueError as e:
        ap.error(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    dirs = [args.checkpoint] + args.compare
    for d in dirs:  # fail before any work, not after the first checkpoint's evaluation
        if not Path(d).is_dir():
            raise weights.WeightsError(f"{d}: checkpoint directory not found")
    results, stories = [], None
    for d in dirs:
        log(f"== {d}")
        model, tok = MMInterleaved.from_checkpoint(d, device=args.device)
        if stories is None:
            stories = [data.ShapeStories("eval", seed=args.seed, size=model.cfg.image_size)[i] for i in range(args.n)]
        elif model.cfg.image_size != stories[0].images[0].shape[0]:
            raise ValueError(f"{d}: draws {model.cfg.image_size} px frames, {dirs[0]} draws "
                             f"{stories[0].images[0].shape[0]} px: not comparable")
        metrics, outputs = evaluate(model, tok, stories, args)
        results.append({"checkpoint": str(d), "metrics": metrics, "outputs": outputs})
        del model  # one model in memory at a time
    print(table(results))
    settings = {k: getattr(args, k) for k in ("n", "seed", "steps", "guidance", "sampler", "rerank", "batch_size")}
    if args.caption_rerank > 0:
        settings.update(caption_rerank=args.caption_rerank, caption_weight=args.caption_weight,
                        caption_check={"levels": CHECK_LEVELS, "draws": CHECK_DRAWS, "temperature": 1.0})
    if args.read_guidance > 0:
        settings.update(read_guidance=args.read_guidance, read_window=list(args.read_window),
                        read_iters=args.read_iters)
    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval.json"
    weights.atomic_write_text(out, json.dumps(report(settings, results), indent=2, allow_nan=False) + "\n")
    log(f"wrote {out}")
    if args.save_images:
        save_images(args.save_images, stories, results)
        log(f"wrote {args.save_images}/{{captions,t2i,continuation}}.png")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # weights.WeightsError is a ValueError
        sys.exit(f"eval.py: error: {e}")
