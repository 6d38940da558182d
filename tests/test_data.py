"""ShapeStories generator, detector, template language, scoring helpers and the JSONL document format (data.py)."""
import itertools
import json
import math
import re
from collections import deque

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import data as D

SEEDS = st.integers(0, 2**32 - 1)
FRAME_SIZES = st.sampled_from([32, 64])
SPLIT = st.sampled_from(["train", "eval"])
CENTROID_TOL = 1e-9   # detected vs ground-truth pixel centroid on clean frames (the same pixels)
ANCHOR_TOL = 0.51     # pixel centroid vs the generator's exact (1/8 px) centre


def _mask_of(o, size):
    return D._mask(o.shape, D.World(size).half[o.size], *o.anchor, size)


def _check_frame(img, truth, size):
    det = D.detect(img)
    assert len(det) == len(truth)
    pairs = D.match(truth, det, keys=("colour", "shape", "size"))
    assert len(pairs) == len(truth), (truth, det)
    for i, j in pairs:
        t, d = truth[i], det[j]
        assert abs(d.x - t.x) <= CENTROID_TOL and abs(d.y - t.y) <= CENTROID_TOL and d.area == t.area
        assert abs(t.x - t.anchor[0]) <= ANCHOR_TOL and abs(t.y - t.anchor[1]) <= ANCHOR_TOL
    return det


# --- detector ------------------------------------------------------------------------------------------------------

@settings(deadline=None, max_examples=30)
@given(seed=SEEDS, size=FRAME_SIZES, split=SPLIT)
def test_detector_recovers_ground_truth(seed, size, split):
    story = D.make_story(split, seed % 1000, seed // 1000, size)
    for img, truth in zip(story.images, story.objects):
        _check_frame(img, truth, size)
        # the float (3, H, W) tensor form reads the same
        assert D.detect(D.to_tensor(img)) == D.detect(img)


@pytest.mark.parametrize("size", [32, 64])
def test_detector_every_subpixel_offset(size):
    """Every shape and size class at all 64 sub-pixel offsets (positions are multiples of 1/8 px)."""
    world = D.World(size)
    for shape, sz, fx, fy in itertools.product(D.SHAPES, D.SIZES, range(8), range(8)):
        img, truth = D.render([("purple", shape, sz, size / 2 + fx / 8, size / 2 + fy / 8)], world)
        _check_frame(img, truth, size)


def _blur(img):
    f = np.pad(img.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="edge")
    n = img.shape[0]
    return sum(f[i:i + n, j:j + n] for i in range(3) for j in range(3)) / 9  # 3x3 box blur


def test_detector_tolerates_noise_blur_and_specks():
    rng = np.random.default_rng(0)
    found = total = 0
    for i in range(40):
        story = D.make_story("eval", 5, i, 32)
        img, truth = story.images[-1], story.objects[-1]
        noisy = np.clip(_blur(img) + rng.normal(0, 12, img.shape), 0, 255)
        for _ in range(3):  # specks: 2x2 palette-coloured blots on the background, below the minimum area
            y, x = rng.integers(0, 31, 2)
            if (img[y:y + 2, x:x + 2] == D.BACKGROUND).all() and (img[max(y - 1, 0):y + 3, max(x - 1, 0):x + 3]
                                                                  == D.BACKGROUND).all():
                noisy[y:y + 2, x:x + 2] = D.PALETTE["black"]
        det = D.detect(noisy / 255)
        pairs = D.match(truth, det, keys=("colour", "shape", "size"))
        assert len(det) == len(pairs)  # no specks or fragments reported
        found += len(pairs)
        total += len(truth)
        for a, b in pairs:
            assert math.hypot(truth[a].x - det[b].x, truth[a].y - det[b].y) <= 1.0
    assert found / total >= 0.97


def test_detector_blank_and_bad_input():
    assert D.detect(np.full((32, 32, 3), 255, np.uint8)) == []
    assert D.detect(torch.ones(3, 64, 64)) == []
    with pytest.raises(ValueError, match="RGB"):
        D.detect(np.zeros((32, 32)))
    with pytest.raises(ValueError, match="square"):
        D.detect(np.zeros((32, 40, 3), np.uint8))


def _flood_fill(mask):
    """Oracle: breadth-first flood fill, labels are the smallest flat index of each component."""
    h, w = mask.shape
    lab = np.full((h, w), -1)
    for i, j in zip(*np.nonzero(mask)):
        if lab[i, j] >= 0:
            continue
        queue, lab[i, j] = deque([(i, j)]), i * w + j
        while queue:
            y, x = queue.popleft()
            for v, u in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= v < h and 0 <= u < w and mask[v, u] and lab[v, u] < 0:
                    lab[v, u] = i * w + j
                    queue.append((v, u))
    return lab


@settings(deadline=None, max_examples=30)
@given(seed=SEEDS, h=st.integers(1, 20), w=st.integers(1, 20), p=st.floats(0.1, 0.9))
def test_components_match_flood_fill(seed, h, w, p):
    mask = np.random.default_rng(seed).random((h, w)) < p
    np.testing.assert_array_equal(D.components(mask), _flood_fill(mask))


# --- generator -----------------------------------------------------------------------------------------------------

def _same(a, b):
    return (a.sentences == b.sentences and a.events == b.events and a.objects == b.objects
            and a.image_first == b.image_first and all(np.array_equal(x, y) for x, y in zip(a.images, b.images)))


@settings(deadline=None, max_examples=10)
@given(seed=SEEDS, size=FRAME_SIZES, split=SPLIT)
def test_same_seed_same_story(seed, size, split):
    a, b = D.make_story(split, 7, seed, size), D.ShapeStories(split, seed=7, size=size)[seed]
    assert _same(a, b)
    assert not _same(a, D.make_story(split, 7, seed + 1, size))


def test_train_and_eval_never_share_a_story():
    """Not even a first frame: the split is decided by hashing its pixels (the seed streams differ as well)."""
    train = [D.make_story("train", 0, i) for i in range(300)]
    held = [D.make_story("eval", 0, i) for i in range(200)]
    key = lambda s: (tuple(s.sentences), b"".join(img.tobytes() for img in s.images))
    assert not {key(s) for s in train} & {key(s) for s in held}
    assert not {s.images[0].tobytes() for s in train} & {s.images[0].tobytes() for s in held}
    assert len({key(s) for s in held}) == 200  # the stream is not stuck on a few stories


def test_story_shapes_and_document_order():
    stories = list(itertools.islice(D.ShapeStories("train", seed=3, size=64), 30))
    assert {len(s.images) for s in stories} <= {2, 3, 4, 5} and len({len(s.images) for s in stories}) > 1
    assert any(s.image_first[0] for s in stories) and not all(s.image_first[0] for s in stories)
    for s in stories:
        assert all(img.shape == (64, 64, 3) and img.dtype == np.uint8 for img in s.images)
        assert all(1 <= len(o) <= D.MAX_OBJECTS for o in s.objects)
        doc = s.segments()
        assert len(doc) == 2 * len(s.images)
        for k, first in enumerate(s.image_first):
            img_seg, txt_seg = (doc[2 * k], doc[2 * k + 1]) if first else (doc[2 * k + 1], doc[2 * k])
            assert img_seg["image"] is s.images[k] and txt_seg["text"] == s.sentences[k]
    t = D.to_tensor(stories[0].images[0])
    assert t.shape == (3, 64, 64) and t.dtype == torch.float32 and 0 <= t.min() and t.max() == 1


@settings(deadline=None, max_examples=25)
@given(seed=SEEDS, size=FRAME_SIZES)
def test_event_semantics(seed, size):
    """Each event changes exactly what it says; the rest of the frame keeps its exact pixels."""
    story = D.make_story("train", 11, seed, size)
    step = D.World(size).step
    for k in range(1, len(story.images)):
        ev, before, after = story.events[k], story.objects[k - 1], story.objects[k]
        ident = lambda o: (o.colour, o.shape)
        prev, nxt = {ident(o): o for o in before}, {ident(o): o for o in after}
        assert len(prev) == len(before) and len(nxt) == len(after)  # (colour, shape) names one object
        subject = prev.get((ev.colour, ev.shape))
        changed = (story.images[k - 1] != story.images[k]).any(-1)
        footprint = np.zeros_like(changed)
        for key, o in prev.items():
            if key != (ev.colour, ev.shape):
                assert nxt[key] == o  # untouched: same pixels, same centroid
        if ev.kind == "move":
            ux, uy = D.DIRECTIONS[ev.direction]
            new = nxt[(ev.colour, ev.shape)]
            assert new.x == pytest.approx(subject.x + ux * step, abs=1e-9) and new.area == subject.area
            assert new.y == pytest.approx(subject.y + uy * step, abs=1e-9)
            assert np.array_equal(np.roll(_mask_of(subject, size), (uy * step, ux * step), (0, 1)), _mask_of(new, size))
            footprint = _mask_of(subject, size) | _mask_of(new, size)
        elif ev.kind == "turn":
            new = nxt[(ev.new_colour, ev.shape)]
            assert (new.x, new.y, new.area, new.size) == (subject.x, subject.y, subject.area, subject.size)
            assert (ev.colour, ev.shape) not in nxt
            footprint = _mask_of(subject, size)
        elif ev.kind == "disappear":
            assert (ev.colour, ev.shape) not in nxt and len(after) == len(before) - 1
            footprint = _mask_of(subject, size)
        else:
            assert subject is None and len(after) == len(before) + 1
            new = nxt[(ev.colour, ev.shape)]
            assert new.size == ev.size and D.place_of(new.x, new.y, size) == ev.place
            assert all(D.place_of(*o.anchor, size) != ev.place for o in before)  # at a free place
            footprint = _mask_of(new, size)
        assert not (changed & ~footprint).any()
        # the scoring rule agrees with the generator
        expected = {ident(o): (o, r) for o, r in D.apply_event(before, ev, size)}
        assert {k for k, (o, r) in expected.items() if r != "gone"} == set(nxt)
        subject_key = (ev.new_colour or ev.colour, ev.shape)  # the event's object, named as it is afterwards
        for key, (o, role) in expected.items():
            if role in ("unmoved", "moved"):
                assert (o.x, o.y) == pytest.approx((nxt[key].x, nxt[key].y), abs=1e-9) and o.size == nxt[key].size
            roles = {"move": "moved", "appear": "appeared", "disappear": "gone", "turn": "unmoved"}
            assert role == (roles[ev.kind] if key == subject_key else "unmoved")


def test_frame_geometry_is_well_separated():
    """Objects keep the border and the gap (so the detector can tell them apart), in all frames."""
    for size in (32, 64):
        world = D.World(size)
        for i in range(60):
            for objs in D.make_story("train", 2, i, size).objects:
                masks = [_mask_of(o, size) for o in objs]
                b = world.border
                for m in masks:
                    assert not (m[:b].any() or m[-b:].any() or m[:, :b].any() or m[:, -b:].any())
                for m1, m2 in itertools.combinations(masks, 2):
                    y1, x1 = np.nonzero(m1)
                    y2, x2 = np.nonzero(m2)
                    sep = max(x2.min() - x1.max(), x1.min() - x2.max(), y2.min() - y1.max(), y1.min() - y2.max()) - 1
                    assert sep >= world.gap


# --- template language and scoring ----------------------------------------------------------------------------------

@settings(deadline=None, max_examples=25)
@given(seed=SEEDS, size=FRAME_SIZES)
def test_parser_round_trip(seed, size):
    story = D.make_story("train", 13, seed, size)
    scene = D.parse(story.sentences[0])
    assert scene == [D.Mention(o.size, o.colour, o.shape, D.place_of(*o.anchor, size)) for o in story.objects[0]]
    assert D.describe(story.objects[0], size) == story.sentences[0]
    assert D.scene_sentence(scene) == story.sentences[0]  # parse and the one template invert each other
    for text, ev in zip(story.sentences[1:], story.events[1:]):
        assert D.parse(text) == ev and D.say(ev) == text
        assert D.parse("  " + text.upper().replace(" ", "   ") + " ") == ev
    for text in story.sentences:
        words = re.findall(r"[a-z]+|[,.]", text)
        assert set(words) <= set(D.VOCAB)


def test_vocab_is_small_and_parser_rejects_other_text():
    assert 20 <= len(D.VOCAB) <= 60 and len(set(D.VOCAB)) == len(D.VOCAB)
    for bad in ["", "there is.", "the red circle moves sideways.", "there are a big red circle at the top left.",
                "there is a big red circle at the top left", "a small red circle", "the pink circle disappears."]:
        with pytest.raises(ValueError, match="not a ShapeStories sentence"):
            D.parse(bad)


def test_score_caption():
    truth = ("there are a big red circle at the top left, a small blue square at the centre and "
             "a big black triangle at the right.")
    shuffled = ("there are a small blue square at the centre, a big black triangle at the right and "
                "a big red circle at the top left.")
    all3 = dict(n_colour=3, n_shape=3, n_size=3)
    assert D.score_caption(shuffled, truth) == {"exact": True, "n_true": 3, "n_correct": 3, "n_pred": 3, **all3}
    one_off = truth.replace("small blue", "big blue")
    assert D.score_caption(one_off, truth) == {"exact": False, "n_true": 3, "n_correct": 2, "n_pred": 3,
                                               "n_colour": 3, "n_shape": 3, "n_size": 2}
    # per attribute at each true object's place: a wrong shape at the top left, the centre object at another place
    moved = truth.replace("red circle", "red square").replace("at the centre", "at the bottom")
    assert D.score_caption(moved, truth) == {"exact": False, "n_true": 3, "n_correct": 1, "n_pred": 3,
                                             "n_colour": 2, "n_shape": 1, "n_size": 2}
    assert D.score_caption("there is a big red circle at the top left.", truth) == {
        "exact": False, "n_true": 3, "n_correct": 1, "n_pred": 1, "n_colour": 1, "n_shape": 1, "n_size": 1}
    assert D.score_caption("gibberish", truth) == {"exact": False, "n_true": 3, "n_correct": 0, "n_pred": 0,
                                                   "n_colour": 0, "n_shape": 0, "n_size": 0}
    assert D.score_caption("the red circle moves up.", "the red circle moves up.")["exact"]
    assert not D.score_caption("the red circle moves down.", "the red circle moves up.")["exact"]


def test_score_text_to_image_and_continuation():
    for i in range(20):
        story = D.make_story("eval", 1, i, 32)
        n = len(story.objects[0])
        want = {"n": n, "found": n, "exact": n, "extra": 0}
        assert D.score_text_to_image(story.sentences[0], story.images[0]) == want
        blank = np.full_like(story.images[0], 255)
        assert D.score_text_to_image(story.sentences[0], blank)["found"] == 0
        # a detection passed in is used instead of detecting again: the blank frame's (none) finds nothing,
        # the true frame's finds everything even when scored on the blank frame
        assert D.score_text_to_image(story.sentences[0], story.images[0], D.detect(blank))["found"] == 0
        assert D.score_text_to_image(story.sentences[0], blank, D.detect(story.images[0])) == want
        for k in range(1, len(story.images)):
            ev = story.events[k]
            r = D.score_continuation(story.objects[k - 1], story.sentences[k], story.images[k])
            assert all(e < 1e-9 for e in r["unmoved_err"] + r["moved_err"]) and r["extra"] == 0
            assert len(r["unmoved_shape_err"]) == len(r["unmoved_err"]) and max(r["unmoved_shape_err"], default=0) < 1e-9
            # the true next frame with every colour swapped for the next one of the palette: the unmoved objects
            # are in place but none is found; matched on shape alone they all are, where they should be
            recol = story.images[k].copy()
            for c, new_c in zip(D.COLOURS, D.COLOURS[1:] + D.COLOURS[:1]):
                recol[(story.images[k] == D.PALETTE[c]).all(-1)] = D.PALETTE[new_c]
            rc = D.score_continuation(story.objects[k - 1], ev, recol)
            assert all(e > 1e-9 for e in rc["unmoved_err"])  # none where it should be (inf, or another object)
            assert max(rc["unmoved_shape_err"], default=0) < 1e-9
            assert r["appeared_ok"] is (True if ev.kind == "appear" else None)
            assert r["gone_ok"] is (True if ev.kind == "disappear" else None)
            assert len(r["moved_err"]) == (ev.kind == "move")
            # a model that copies the previous frame unchanged
            stale = D.score_continuation(story.objects[k - 1], ev, story.images[k - 1])
            if ev.kind == "move":
                assert stale["moved_err"] == [pytest.approx(D.World(32).step)]
            if ev.kind == "turn":
                assert math.inf in stale["unmoved_err"]
            if ev.kind == "disappear":
                assert stale["gone_ok"] is False


# --- JSONL documents ------------------------------------------------------------------------------------------------

def test_jsonl_round_trip(tmp_path):
    stories = [D.make_story("train", 0, i) for i in range(5)]
    path = tmp_path / "docs" / "stories.jsonl"
    D.write_jsonl(stories, path)
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and all("image" in seg or "text" in seg for seg in json.loads(lines[0])["segments"])
    docs = list(D.read_jsonl(path))
    for story, doc in zip(stories, docs, strict=True):
        want = story.segments()
        assert [next(iter(s)) for s in doc] == [next(iter(s)) for s in want]
        for got, exp in zip(doc, want):
            if "text" in exp:
                assert got["text"] == exp["text"]
            else:
                np.testing.assert_array_equal(got["image"], exp["image"])
    # documents given as segment lists work too, and blank lines are skipped
    D.write_jsonl([docs[0]], tmp_path / "again.jsonl", image_dir="img")
    (tmp_path / "again.jsonl").write_text("\n" + (tmp_path / "again.jsonl").read_text() + "\n\n")
    assert len(list(D.read_jsonl(tmp_path / "again.jsonl"))) == 1


@pytest.mark.parametrize("line, problem", [
    ('{"segments": [{"text": "hi"}', "invalid JSON"),
    (b'{"segments": [{"text": "\xff"}]}', "invalid JSON (not UTF-8)"),
    ('[1, 2]', "non-empty \"segments\" list"),
    ('{"segments": []}', "non-empty \"segments\" list"),
    ('{"segments": [{"txt": "hi"}]}', "segment 0 must be"),
    ('{"segments": [{"text": "hi", "image": "a.png"}]}', "segment 0 must be"),
    ('{"segments": [{"text": 3}]}', "segment 0 must be"),
    ('{"segments": [{"text": "hi"}, {"image": "missing.png"}]}', "segment 1: image file not found"),
    ('{"segments": [{"image": "broken.png"}]}', "segment 0: cannot decode image"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, problem):
    D.write_jsonl([D.make_story("train", 0, 0)], tmp_path / "good.jsonl")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    path = tmp_path / "bad.jsonl"
    line = line if isinstance(line, bytes) else line.encode()
    path.write_bytes((tmp_path / "good.jsonl").read_bytes() + b"\n" + line + b"\n")
    with pytest.raises(ValueError) as err:
        list(D.read_jsonl(path))
    msg = str(err.value)
    assert msg.startswith(f"{path}:3:") and problem in msg and "\n" not in msg


def test_bad_arguments():
    with pytest.raises(ValueError, match="JSONL file not found"):
        next(D.read_jsonl("/nonexistent/docs.jsonl"))
    with pytest.raises(ValueError, match="split"):
        D.make_story("test")
    with pytest.raises(ValueError, match="World size"):
        D.World(16)
    with pytest.raises(ValueError, match="World size"):
        D.ShapeStories(size=1000)


def test_text_to_image_misses_say_what_the_missed_object_is_drawn_as():
    """A named object not found is sorted by what its cell holds: its colour in another shape (and which), its shape
    in another colour, something else, or nothing; a found object is not a miss."""
    world, said = D.World(32), "there is a big red circle at the top left."
    for drawn, want in ((("red", "square"), ("shape", "square")), (("blue", "circle"), ("colour", None)),
                        (("green", "triangle"), ("other", None)), (("red", "circle"), None)):
        img, _ = D.render([(*drawn, "big", 8.0, 8.0)], world)
        misses = D.text_to_image_misses(said, img)
        assert [(k, s) for _, k, s in misses] == ([want] if want else [])
        assert len(misses) == D.score_text_to_image(said, img)["n"] - D.score_text_to_image(said, img)["found"]
    far, _ = D.render([("red", "square", "big", 24.0, 24.0)], world)  # in another cell: nothing at the top left
    assert [(m.shape, k) for m, k, _ in D.text_to_image_misses(said, far)] == [("circle", "none")]


def test_text_to_image_counts_wrong_and_extra_objects():
    world = D.World(32)
    img, _ = D.render([("red", "circle", "big", 8.0, 8.0), ("red", "circle", "small", 24.0, 24.0)], world)
    s = D.score_text_to_image("there is a big red circle at the top left.", img)
    assert s == {"n": 1, "found": 1, "exact": 1, "extra": 1}  # the top-left one is picked, the other is extra
    s = D.score_text_to_image("there is a big red circle at the bottom right.", img)
    assert s == {"n": 1, "found": 1, "exact": 0, "extra": 1}  # found near the bottom right, but it is small
    s = D.score_text_to_image("there is a big red square at the top left.", img)
    assert s == {"n": 1, "found": 0, "exact": 0, "extra": 2}
