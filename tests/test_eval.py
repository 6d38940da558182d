"""eval.py: scoring is perfect on ground truth and fails on blanks; the tasks are seeded; the CLI writes the JSON."""
import argparse
import dataclasses
import importlib
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import diffusion
from model import MMInterleaved

ev = importlib.import_module("eval")  # `import eval` would shadow the builtin
ROOT = Path(__file__).resolve().parent.parent
FRACTIONS = ["caption_exact", "caption_objects", "caption_colour", "caption_shape", "caption_size", "t2i_objects",
             "t2i_exact", "unmoved_found", "moved_found", "appeared_ok", "gone_ok", "unmoved_shape_found",
             *[f"unmoved_found_{k}" for k in data.EVENT_WEIGHTS], "unmoved_found_shared_colour",
             "unmoved_found_own_colour"]
GAPS = ["cond_gap_t100", "cond_gap_t60", "cond_gap_t30"]
KEYS = set(FRACTIONS) | set(GAPS) | {"t2i_extra", "t2i_objects_other", "unmoved_median_px", "unmoved_count",
                                     "moved_median_px", "moved_count", "cont_extra", "unmoved_found_px",
                                     "moved_found_px", "unmoved_shape_median_px", "unmoved_shape_found_px",
                                     "unmoved_shape_count"}
BEST_FRACTIONS = ["t2i_best_objects", "t2i_best_exact", "t2i_best_plain_kept", "t2i_best_bound"]  # --rerank K > 1
BEST = set(BEST_FRACTIONS) | {"t2i_best_extra", "t2i_best_gain"}
READ = {"t2i_read_objects", "t2i_read_exact", "t2i_read_extra", "t2i_read_gain"}  # --read-guidance S > 0
CHECK_FRACTIONS = ["caption_best_exact", "caption_best_objects", "caption_best_colour", "caption_best_shape",
                   "caption_best_size", "caption_best_greedy_kept", "caption_best_bound"]  # --caption-rerank N > 0
CHECK = set(CHECK_FRACTIONS) | {"caption_best_gain", "caption_best_candidates"}


def _args(**kw):
    base = dict(seed=0, steps=1, guidance=3.0, sampler="ddim", batch_size=32, rerank=1, read_guidance=0.0,
                read_window=(300, 900), read_iters=4, caption_rerank=0, caption_weight=1.0)
    return argparse.Namespace(**{**base, **kw})


def _stories(n, size=32):
    return [data.ShapeStories("eval", seed=0, size=size)[i] for i in range(n)]


class FakeModel(torch.nn.Module):
    """Answers every prompt with the ground truth (or blank frames): drives eval's scoring without a network."""

    def __init__(self, tok, stories, blank=False):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # eval reads the device off the parameters
        # only what eval reads of a config
        self.cfg = argparse.Namespace(num_image_tokens=4, image_size=32, llm=argparse.Namespace(max_seq_len=512),
                                      schedule=diffusion.PRESETS["small"])
        self.tok, self.blank = tok, blank
        k = self.cfg.num_image_tokens
        self.caption = {data.to_tensor(s.images[0]).numpy().tobytes(): s.sentences[0] + " " + s.sentences[1]
                        for s in stories}
        self.frames = {}
        for s in stories:
            self.frames[tuple(tok.encode(s.sentences[0]) + [tok.boi_id])] = s.images[0]
            ids, _ = data.tokenize_document([{"image": s.images[0]}, {"text": s.sentences[0]},
                                             {"text": s.sentences[1]}], tok, k)
            self.frames[tuple(ids[:-1] + [tok.boi_id])] = s.images[1]

    def generate_text(self, tokens, images, max_new_tokens=30, temperature=0.0, **kw):
        """The true scene sentence, then the first event sentence (eval must keep only the first), then </s>."""
        assert tokens.shape[1] == 2 + self.cfg.num_image_tokens and len(images) == tokens.shape[0]
        return [self.tok.encode(self.caption[im.numpy().tobytes()], bos=False) + [self.tok.eos_id] for im in images]

    def generate_images(self, prompts, images, **kw):
        out = torch.stack([data.to_tensor(self.frames[tuple(p)]) for p in prompts])  # (B, 3, S, S)
        return torch.ones_like(out) if self.blank else out

    # the condition check: a different condition per prompt, and a UNet that ignores it
    def prompt_conditions(self, prompts, images):
        return torch.tensor([[[len(p), sum(p)]] for p in prompts], dtype=torch.float32), {}

    def to_diffusion_space(self, frames):
        return frames * 2 - 1

    def unet_forward(self, x, t, cond):
        return torch.zeros_like(x)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return MMInterleaved.from_checkpoint(tiny_checkpoint)


def test_scoring_ground_truth_is_perfect(loaded):
    _, tok = loaded
    stories = _stories(24)
    assert {s.events[1].kind for s in stories} == {"move", "appear", "disappear", "turn"}  # every check applies
    metrics, outputs = ev.evaluate(FakeModel(tok, stories), tok, stories, _args(batch_size=5))
    assert outputs["captions"] == [s.sentences[0] for s in stories]
    assert set(metrics) == KEYS
    for k in FRACTIONS:
        assert metrics[k] == 1.0, k
    assert metrics["unmoved_median_px"] == 0.0 and metrics["moved_median_px"] == 0.0
    assert metrics["unmoved_found_px"] == 0.0 and metrics["moved_found_px"] == 0.0
    assert metrics["unmoved_shape_median_px"] == 0.0
    assert metrics["unmoved_count"] > 0 and metrics["moved_count"] > 0
    assert metrics["t2i_extra"] == 0.0 and metrics["cont_extra"] == 0.0
    # the chance level: another story's objects are in a true frame only by coincidence
    assert 0.0 <= metrics["t2i_objects_other"] < 0.5
    assert all(metrics[k] == 0.0 for k in GAPS)  # this UNet ignores the text: no gap


def test_scoring_blank_frames_fail(loaded):
    _, tok = loaded
    stories = _stories(8)
    metrics, _ = ev.evaluate(FakeModel(tok, stories, blank=True), tok, stories, _args())
    assert metrics["t2i_objects"] == 0.0 and metrics["t2i_exact"] == 0.0 and metrics["t2i_objects_other"] == 0.0
    assert metrics["unmoved_found"] == 0.0 and metrics["unmoved_median_px"] == math.inf
    assert ev.finite(metrics)["unmoved_median_px"] is None  # JSON has no inf
    assert metrics["unmoved_found_px"] is None  # nothing found: no error to take a median of
    assert metrics["unmoved_shape_found"] == 0.0 and metrics["unmoved_shape_median_px"] == math.inf
    assert metrics["caption_exact"] == 1.0  # the text side still answered with the truth


def test_found_median_leaves_out_the_missing(monkeypatch):
    # two stories' continuation scores, built by hand: 2 of 5 unmoved objects found, at 1 and 3 px; no moved object
    scores = iter([{"unmoved_err": [1.0, math.inf, math.inf], "moved_err": [], "appeared_ok": None, "gone_ok": None,
                    "extra": 0, "unmoved_shape_err": [1.0, 0.5, math.inf]},
                   {"unmoved_err": [3.0, math.inf], "moved_err": [], "appeared_ok": None, "gone_ok": None,
                    "extra": 1, "unmoved_shape_err": [3.0, 2.0]}])
    monkeypatch.setattr(data, "score_continuation", lambda *a: next(scores))
    m = ev.score_continuations(_stories(2), [None, None])
    assert m["unmoved_found"] == pytest.approx(2 / 5) and m["unmoved_median_px"] == math.inf
    assert m["unmoved_found_px"] == 2.0  # the median of 1 and 3: the missing ones are left out, not counted as inf
    assert m["moved_found_px"] is None and m["moved_median_px"] is None and m["moved_found"] is None
    # matched on shape alone, 4 of the 5 are there: the median of 0.5, 1, 2, 3, inf
    assert m["unmoved_shape_found"] == pytest.approx(4 / 5) and m["unmoved_shape_median_px"] == 2.0
    # per kind of event: each story's found / unmoved under its own event's kind; kinds no story had are None
    kinds = [s.events[1].kind for s in _stories(2)]
    want = {k: [0, 0] for k in kinds}
    for k, (found, n) in zip(kinds, [(1, 3), (1, 2)]):
        want[k][0] += found
        want[k][1] += n
    for k in data.EVENT_WEIGHTS:
        got = m[f"unmoved_found_{k}"]
        assert got is None if k not in want else got == pytest.approx(want[k][0] / want[k][1]), k


def test_unmoved_found_split_by_whether_the_named_colour_is_shared(monkeypatch):
    """Stories built by hand: an event naming the red square beside a red circle (shared), the red circle beside a
    blue square (its own), and an appearance (neither); each story's found / unmoved counts go to its side."""
    base = _stories(1)[0]
    obj = lambda c, sh: data.Obj(c, sh, "small", 8.0, 8.0)
    cases = [([obj("red", "circle"), obj("red", "square")], data.Event("move", "red", "square", direction="left")),
             ([obj("red", "circle"), obj("blue", "square")], data.Event("turn", "red", "circle", new_colour="green")),
             ([obj("red", "circle")], data.Event("appear", "red", "square", size="big", place="top"))]
    stories = [dataclasses.replace(base, objects=[objs] + base.objects[1:], events=[None, e] + base.events[2:])
               for objs, e in cases]
    found = [[1.0, math.inf], [2.0, 0.5, 1.0], [math.inf]]  # 1 of 2, 3 of 3, 0 of 1 unmoved objects found
    scores = iter([{"unmoved_err": f, "moved_err": [], "appeared_ok": None, "gone_ok": None, "extra": 0,
                    "unmoved_shape_err": f} for f in found])
    monkeypatch.setattr(data, "score_continuation", lambda *a: next(scores))
    m = ev.score_continuations(stories, [None] * 3)
    assert m["unmoved_found_shared_colour"] == pytest.approx(1 / 2) and m["unmoved_found_own_colour"] == 1.0
    assert m["unmoved_found_appear"] == 0.0 and m["unmoved_found"] == pytest.approx(4 / 6)
    monkeypatch.setattr(data, "score_continuation", lambda *a: found_scores.pop(0))
    found_scores = [{"unmoved_err": [1.0], "moved_err": [], "appeared_ok": None, "gone_ok": None, "extra": 0,
                     "unmoved_shape_err": [1.0]}]
    assert ev.score_continuations(stories[2:], [None])["unmoved_found_shared_colour"] is None  # no such story


def test_tasks_are_seeded(loaded):
    model, tok = loaded
    stories = _stories(1)
    a = ev.t2i_task(model, tok, stories, _args(seed=0))
    assert a[0].dtype == np.uint8 and a[0].shape == (32, 32, 3)
    assert np.array_equal(a[0], ev.t2i_task(model, tok, stories, _args(seed=0))[0])
    assert not np.array_equal(a[0], ev.t2i_task(model, tok, stories, _args(seed=1))[0])


def test_condition_check(loaded):
    """The gap is 0 (up to float noise, ~2e-8 across batches) when every story has the same text; seeded; and on
    real stories well clear of that noise (~1e-5 after two training steps), since the condition reaches the UNet."""
    model, tok = loaded
    stories = _stories(6)
    same = ev.score_condition(None, ev.condition_task(model, tok, [stories[0]] * 4, _args(batch_size=3)))
    assert set(same) == set(GAPS) and all(abs(v) < 1e-6 for v in same.values()), same
    a = ev.condition_task(model, tok, stories, _args(batch_size=4))
    b = ev.condition_task(model, tok, stories, _args(batch_size=4))
    assert a["own"].shape == (6, len(ev.CONDITION_T)) and torch.equal(a["own"], b["own"])
    assert torch.isfinite(a["own"]).all() and torch.isfinite(a["other"]).all()
    gaps = ev.score_condition(stories, a)
    assert all(abs(v) > 1e-6 for v in gaps.values()), gaps


def test_rerank_keeps_the_drawing_the_model_captions_likeliest(loaded):
    """--rerank K: candidate 0 is the plain drawing, candidate j the same prompts drawn with seed + 1000 j; each story
    keeps the candidate whose frame makes its scene sentence likeliest under the model's own captioning."""
    model, tok = loaded
    stories, args = _stories(5), _args(rerank=3, steps=2, batch_size=2)
    first = ev.t2i_task(model, tok, stories, args)
    frames, best, got = ev.rerank_task(model, tok, stories, args, first)
    cands = [first] + [ev.t2i_task(model, tok, stories, _args(seed=1000 * j, steps=2, batch_size=2)) for j in (1, 2)]
    assert all(np.array_equal(a, b) for c, g in zip(cands, got, strict=True) for a, b in zip(c, g, strict=True))
    assert not np.array_equal(cands[0][0], cands[1][0])  # other noise, other frames
    k = model.cfg.num_image_tokens
    texts = [tok.encode(s.sentences[0], bos=False) for s in stories]
    rows = [[tok.bos_id] + tok.image_tokens(k) + t for t in texts]
    scores = torch.stack([model.text_logprob(rows, torch.stack([data.image_tensor(f, 32) for f in c]),
                                             [len(t) for t in texts]) for c in cands])   # (K, n)
    assert torch.isfinite(scores).all() and (scores < 0).all()
    for c, row in zip(cands, scores):  # the caption layout written out above is what caption_logprob builds
        assert torch.equal(model.caption_logprob(torch.stack([data.image_tensor(f, 32) for f in c]), texts), row)
    assert best == scores.argmax(0).tolist() and len(set(scores[:, 0].tolist())) == 3  # the frame moves the score
    assert all(np.array_equal(frames[i], cands[j][i]) for i, j in enumerate(best))


@pytest.mark.parametrize("weight", [0.0, 1.0, 1e9])
def test_caption_rerank_keeps_the_caption_read_and_drawn_likeliest(loaded, monkeypatch, weight):
    """--caption-rerank N: candidate 0 is the greedy caption, then the distinct non-empty sampled first sentences;
    every candidate of a frame is drawn back with that frame's noise (another frame gets other noise); each story
    keeps the candidate with the highest log p(caption | frame) - weight × drawing_nll (at 0 the LLM's pick, at 1e9
    the UNet's). Seeded: the same call gives the same captions."""
    model, tok = loaded
    stories, args = _stories(3), _args(batch_size=3, caption_rerank=2, caption_weight=weight)
    greedy = ev.caption_task(model, tok, stories, args)
    seen = []  # (frame, text, noise, nll) of every candidate drawn back, in order
    real = model.drawing_nll

    def spy(images, texts, levels, noise):
        nll = real(images, texts, levels, noise)
        seen.extend(zip(images, map(tuple, texts), noise, nll.tolist()))
        assert levels.tolist() == [50 + 100 * j for j in range(10)] * 2  # the tiny schedule has 1000 steps
        return nll
    monkeypatch.setattr(model, "drawing_nll", spy)
    caps, best, cands = ev.caption_rerank_task(model, tok, stories, args, greedy)
    assert [c[0] for c in cands] == greedy and all(len(set(c)) == len(c) for c in cands)
    assert sum(map(len, cands)) > len(stories)  # temperature 1 proposes other sentences
    assert caps == [cs[j] for cs, j in zip(cands, best)]
    assert len(seen) == sum(len(cs) for cs in cands)  # the tiny model's sentences are never empty
    it, noise0 = iter(seen), []
    for s, cs, j in zip(stories, cands, best):
        frame = data.image_tensor(s.images[0], 32)
        rows = [next(it) for _ in cs]
        assert all(torch.equal(im, frame) and torch.equal(nz, rows[0][2]) for im, _, nz, _ in rows)
        assert [list(t) for _, t, _, _ in rows] == [tok.encode(c, bos=False) for c in cs]
        noise0.append(rows[0][2])
        read = model.caption_logprob(frame[None].expand(len(cs), -1, -1, -1), [list(t) for _, t, _, _ in rows])
        score = read.double() - weight * torch.tensor([nll for *_, nll in rows], dtype=torch.float64)
        assert j == int(score.argmax()), (score, j)
    assert not torch.equal(noise0[0], noise0[1])
    if weight == 1.0:
        assert ev.caption_rerank_task(model, tok, stories, args, greedy)[0] == caps


@pytest.mark.parametrize("flags", [["--caption-rerank", "-1"], ["--caption-weight", "-1"],
                                   ["--caption-weight", "nan"], ["--caption-weight", "inf"]])
def test_bad_caption_rerank_flags_are_refused_in_one_line(flags, capsys):
    with pytest.raises(SystemExit) as e:
        ev.parse_args(flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "--caption-rerank and --caption-weight must be >= 0" in err[-1]


def test_read_guided_t2i_is_the_plain_task_steered_toward_its_own_sentence(loaded):
    """t2i_task(read=True): the same prompts and noise as the plain task, drawn under reading guidance toward each
    story's scene sentence (the ids between <s> and <BoI>); with a window no step falls in, the plain frames."""
    model, tok = loaded
    stories = _stories(3)
    args = _args(steps=3, batch_size=2, read_guidance=0.3, read_iters=1, read_window=(0, 999))
    got = ev.t2i_task(model, tok, stories, args, read=True)
    prompts = [tok.encode(s.sentences[0]) + [tok.boi_id] for s in stories]
    texts = [tok.encode(s.sentences[0], bos=False) for s in stories]
    assert all(p[1:-1] == t for p, t in zip(prompts, texts))
    gen, want = torch.Generator().manual_seed(0), []
    for i in (0, 2):
        x = model.generate_images(prompts[i:i + 2], [torch.zeros(0, 3, 32, 32)] * len(prompts[i:i + 2]), steps=3,
                                  generator=gen, read_texts=texts[i:i + 2], read_scale=0.3, read_window=(0, 999),
                                  read_iters=1)
        want += [ev.to_uint8(f) for f in x]
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    plain = ev.t2i_task(model, tok, stories, args)
    assert not all(np.array_equal(a, b) for a, b in zip(got, plain))
    outside = ev.t2i_task(model, tok, stories, _args(steps=3, batch_size=2, read_guidance=0.3, read_window=(1000, 1000)),
                          read=True)
    assert all(np.array_equal(a, b) for a, b in zip(outside, plain))


def test_t2i_chance_level_scores_each_frame_against_the_previous_story():
    stories = _stories(12)
    frames = [s.images[0] for s in stories]
    kinds = [{(o.colour, o.shape) for o in s.objects[0]} for s in stories]
    # two stories with no (colour, shape) in common: the other story's text finds nothing in the true frame
    a, b = next((i, j) for i in range(12) for j in range(12) if i != j and not kinds[i] & kinds[j])
    assert ev.score_t2i([stories[a], stories[b]], [frames[a], frames[b]])["t2i_objects_other"] == 0.0
    # the same story twice: the "other" text is the frame's own, so every object is found
    assert ev.score_t2i([stories[a]] * 2, [frames[a]] * 2)["t2i_objects_other"] == 1.0


def test_first_sentence():
    assert ev.first_sentence(" there is a red circle at the top. the red circle moves up.") == \
        "there is a red circle at the top."
    assert ev.first_sentence("no full stop") == "no full stop"


def test_cli_compare_writes_json_and_images(tiny_checkpoint, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)  # the default --out lands inside the checkpoint directory
    ev.main(["--checkpoint", str(ckpt), "--compare", str(ckpt), "--n", "4", "--steps", "2", "--batch-size", "4",
             "--device", "cpu", "--rerank", "2", "--read-guidance", "0.3", "--read-iters", "1", "--caption-rerank",
             "2", "--save-images", str(tmp_path / "img")])
    report = json.loads((ckpt / "eval.json").read_text())
    assert report["settings"] == {"n": 4, "seed": 0, "steps": 2, "guidance": 3.0, "sampler": "ddim", "rerank": 2,
                                  "batch_size": 4, "read_guidance": 0.3, "read_window": [300, 900], "read_iters": 1,
                                  "caption_rerank": 2, "caption_weight": 1.0,
                                  "caption_check": {"levels": 10, "draws": 2, "temperature": 1.0}}
    a, b = report["results"]
    assert a["checkpoint"] == b["checkpoint"] == str(ckpt)
    assert set(a["metrics"]) == KEYS | BEST | READ | CHECK
    assert a["metrics"] == b["metrics"]  # same checkpoint, same seed: fresh loads and generators agree
    for k in FRACTIONS + BEST_FRACTIONS + CHECK_FRACTIONS + ["t2i_read_objects", "t2i_read_exact"]:
        v = a["metrics"][k]
        assert v is None or (math.isfinite(v) and 0 <= v <= 1), (k, v)
    m = a["metrics"]  # the gain is the best-of-K rate minus the plain one, over the same objects
    assert m["t2i_best_gain"] == pytest.approx(m["t2i_best_objects"] - m["t2i_objects"], abs=1e-12)
    assert m["t2i_read_gain"] == pytest.approx(m["t2i_read_objects"] - m["t2i_objects"], abs=1e-12)
    assert m["caption_best_gain"] == pytest.approx(m["caption_best_objects"] - m["caption_objects"], abs=1e-12)
    # the best candidate names at least as many objects right as the pick and the greedy caption, story by story
    assert m["caption_best_bound"] >= max(m["caption_best_objects"], m["caption_objects"]) - 1e-12
    assert 1 <= m["caption_best_candidates"] <= 3
    # the detector's pick finds at least what the model's pick and the plain drawing find, story by story
    assert m["t2i_best_bound"] >= max(m["t2i_best_objects"], m["t2i_objects"]) - 1e-12
    for k in ("t2i_extra", "cont_extra", "unmoved_median_px", "moved_median_px", "unmoved_found_px", "moved_found_px",
              "unmoved_shape_median_px"):
        v = a["metrics"][k]
        assert v is None or (math.isfinite(v) and v >= 0), (k, v)
    assert a["metrics"]["unmoved_count"] + a["metrics"]["moved_count"] > 0
    assert set(a["std_errors"]) <= KEYS | BEST | READ | CHECK
    assert all(v is None or v >= 0 for v in a["std_errors"].values())
    assert set(report["difference"]) == set(a["std_errors"])  # same checkpoint twice: no difference, no error
    assert all(d == {"value": 0.0, "std_error": 0.0} for d in report["difference"].values()), report["difference"]
    header, *rows = capsys.readouterr().out.strip().splitlines()
    assert header.split() == [str(ckpt), str(ckpt), "first", "-", "second"] and len(rows) == len(ev.ROWS)
    for row in rows:
        label, first, second, *diff = re.split(r"\s{2,}", row.strip())
        assert first == second and diff in ([], ["+0.0 ± 0.0"], ["+0.00 ± 0.00"]), row
    # the pictures: truth, then each run's frame at 4x; the two runs drew the very same pixels
    n = 32 * 4
    for name, first in (("t2i", 1), ("continuation", 2)):
        img = np.asarray(Image.open(tmp_path / "img" / f"{name}.png"))
        col = [img[:n, c * (n + 4):c * (n + 4) + n] for c in (first, first + 1)]
        assert col[0].std() > 0 and np.array_equal(*col), name
    assert (tmp_path / "img" / "captions.png").stat().st_size > 0


def test_std_error_of_a_rate_is_the_binomial_one():
    """Flags, one per story: the delta-method error is sqrt(p (1 - p) / (n - 1)), in float64; a paired difference
    is the error of the per-story differences' mean; n/a flags count for nothing."""
    rng = np.random.default_rng(0)
    a, b = rng.random(200) < 0.3, rng.random(200) < 0.6
    r = ev.rate(list(a) + [None] * 5)
    p = a.mean()
    assert r == p and math.isclose(ev.std_error(r.influence()[:200]), math.sqrt(p * (1 - p) / 199), rel_tol=1e-12)
    ra, rb = ev.rate(a), ev.rate(b)
    ((d, se),) = ev.differences({"x": ra}, {"x": rb}).values()
    assert math.isclose(d, a.mean() - b.mean(), rel_tol=1e-12)
    assert math.isclose(se, np.std(a.astype(float) - b, ddof=1) / math.sqrt(200), rel_tol=1e-12)
    assert ev.differences({"x": ra}, {"x": ra})["x"] == (0.0, 0.0)
    assert ev.rate([None, None]) is None and math.isnan(ev.std_error(np.zeros(1)))


def test_std_error_of_a_pooled_ratio_matches_a_story_bootstrap():
    """Objects found / objects named, 1-4 objects per story, some stories much easier than others: the
    delta-method error agrees with 4000 story-level bootstrap resamples within 5 %, and is larger than what
    treating the objects as independent would claim (the stories cluster them)."""
    rng = np.random.default_rng(1)
    den = rng.integers(1, 5, 300)
    num = rng.binomial(den, rng.beta(0.5, 0.5, 300))  # each story has its own difficulty
    r = ev.ratio(num, den)
    idx = rng.integers(0, 300, (4000, 300))
    boot = num[idx].sum(1) / den[idx].sum(1)
    se = ev.std_error(r.influence())
    assert abs(se / boot.std() - 1) < 0.05, (se, boot.std())
    assert se > 1.3 * math.sqrt(r * (1 - r) / den.sum())


def test_missing_checkpoint_is_one_line_error(tmp_path):
    missing = tmp_path / "nope"
    proc = subprocess.run([sys.executable, "eval.py", "--checkpoint", str(missing)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip() == f"eval.py: error: {missing}: checkpoint directory not found"
    assert not (missing / "eval.json").exists()


def test_bad_checkpoints_raise_before_work(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="nope: checkpoint directory not found"):
        ev.main(["--checkpoint", str(tiny_checkpoint), "--compare", str(tmp_path / "nope")])
    with pytest.raises(ValueError, match="model.safetensors"):
        ev.main(["--checkpoint", str(tmp_path)])  # a directory, but no checkpoint in it


def test_three_checkpoints_give_two_paired_columns():
    """--compare B C: the table has A, B, C, then A - B and A - C, each the paired difference ± its error over the
    stories; the JSON lists both differences under the compared checkpoints' names."""
    rng = np.random.default_rng(2)
    flags = {name: rng.random((3, 50)) < p for name, p in (("a", 0.7), ("b", 0.5), ("c", 0.2))}  # (row kind, story)

    def metrics(name):
        return {key: ev.rate(flags[name][i % 3]) if pct else float(i) for i, (key, _, pct) in enumerate(ev.ROWS)}
    results = [{"checkpoint": name, "metrics": metrics(name)} for name in "abc"]
    header, *rows = ev.table(results).splitlines()
    assert header.split() == ["a", "b", "c", "first", "-", "second", "first", "-", "third"]
    key, label, _ = next(r for r in ev.ROWS if r[2])
    row = next(r for r in rows if r.startswith(label))
    cells = re.split(r"\s{2,}", row.strip())[1:]
    assert len(cells) == 5
    for col, other in ((3, "b"), (4, "c")):
        d, se = ev.differences(results[0]["metrics"], results["abc".index(other)]["metrics"])[key]
        assert cells[col] == f"{100 * d:+.1f} ± {100 * se:.1f}" and d > 0.1, (cells[col], d)
    rep = ev.report({"n": 50}, results)
    assert "difference" not in rep and [d["checkpoint"] for d in rep["differences"]] == ["b", "c"]
    got = rep["differences"][1]["difference"][key]
    assert got["value"] == pytest.approx(float(results[0]["metrics"][key]) - float(results[2]["metrics"][key]))
    assert json.loads(json.dumps(rep, allow_nan=False)) == rep
    assert "differences" not in ev.report({}, results[:2]) and "difference" in ev.report({}, results[:2])
