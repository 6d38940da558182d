"""Data for MM-Interleaved: the ShapeStories world and the JSONL interleaved-document format.

Read top-down:
  1. the world: palette, template vocabulary, geometry that scales with the frame size (DESIGN §5);
  2. rendering and the story generator (seeded, infinite, train / eval split);
  3. the template language: sentence writers and the parser that reads (generated) text back;
  4. the deterministic detector that reads any frame back into objects;
  5. scoring helpers for eval.py (captions, text-to-image, continuation consistency);
  6. the JSONL document format for real data (reader with line-numbered errors, writer);
  7. tokenisation with image placeholders, packing into fixed-length rows, collation, batch streams;
  8. a small CLI: `python data.py --preview grid.png`, `python data.py --write-jsonl out/stories.jsonl`.

A *document* is a list of segments in reading order, each `{"text": str}` or `{"image": uint8 (H, W, 3)}`;
`Story.segments()` and `read_jsonl` both produce this form, which the tokeniser/packer consumes.

The template language (every sentence ends with "."):
  scene     "there is a big red circle at the top left."   /   "there are A, B and C."  (objects in reading order
            of their place: top-left first); each object is "a <size> <colour> <shape> at the <place>"
  move      "the red circle moves left."        the object shifts by exactly `World.step` pixels
  appear    "a small blue square appears at the bottom right."   (at a place where no object is)
  disappear "the red circle disappears."
  turn      "the red circle turns green."       same pixels, new colour
Within a frame no two objects share (colour, shape), so "the red circle" names one object. A place is a cell of
the 3x3 grid; scene and appear positions are drawn >= 1 px inside their cell, so the place is unambiguous. An
event changes only its object: every other object keeps its exact pixels. Exact positions live only in the pixels.

Positions are multiples of 1/8 px, so the rendering arithmetic is exact and a move by an integer step shifts the
rendered mask by exactly that many pixels (no rounding can make a moved shape differ from the original).
"""
import argparse
import hashlib
import itertools
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# ---------------------------------------------------------------------------------------------------------------
# 1. The world

BACKGROUND = (255, 255, 255)
PALETTE = {  # pairwise RGB distance >= 139, >= 225 from the background
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 220),
    "yellow": (240, 200, 30), "purple": (170, 60, 180), "black": (30, 30, 30),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "big")
PLACES = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
EVENT_WEIGHTS = {"move": 2.0, "appear": 1.0, "disappear": 1.0, "turn": 1.0}  # moves are what MMFS must copy
MAX_OBJECTS = 3
# Every word and punctuation mark the generator can write (a tokenizer is trained on these).
VOCAB = tuple(sorted({"there", "is", "are", "a", "and", "the", "at", "moves", "appears", "disappears", "turns",
                      *COLOURS, *SHAPES, *SIZES, *DIRECTIONS, *" ".join(PLACES).split()})) + (",", ".")


def _q(v):
    """Round to a multiple of 1/8 px (exact in binary floating point)."""
    return round(v * 8) / 8


@dataclass(frozen=True)
class World:
    """Lengths of the ShapeStories world for square frames of `size` pixels (the 32 px values scale linearly)."""
    size: int = 32
    half: dict = field(init=False)      # half width of a shape per size class; a triangle is 2*half tall
    step: int = field(init=False)       # displacement of "moves <direction>" in pixels
    gap: int = field(init=False)        # minimum empty pixels between two objects
    border: int = field(init=False)     # minimum empty pixels between an object and the frame edge
    min_area: int = field(init=False)   # detector: components smaller than this are specks

    def __post_init__(self):
        if not isinstance(self.size, int) or not 32 <= self.size <= 512:
            raise ValueError(f"World size must be an int in [32, 512], got {self.size!r}")
        s = self.size / 32
        set_ = object.__setattr__
        set_(self, "half", {"small": _q(3.5 * s), "big": _q(5.5 * s)})
        set_(self, "step", round(6 * s))
        set_(self, "gap", max(2, round(2 * s)))
        set_(self, "border", max(1, round(s)))
        set_(self, "min_area", max(4, round(0.4 * 2 * self.half["small"] ** 2)))  # 40% of a small triangle


# ---------------------------------------------------------------------------------------------------------------
# 2. Rendering and the generator

@dataclass(frozen=True)
class Obj:
    """One object of a frame: ground truth (with the generator's `anchor`) or a detection (anchor None)."""
    colour: str
    shape: str
    size: str
    x: float                 # centroid of the object's pixels; pixel (row i, column j) has centre (j + .5, i + .5)
    y: float
    area: int = 0
    anchor: tuple = None     # exact centre (multiples of 1/8 px): box centre, or area centroid for a triangle


def _box(shape, a, cx, cy):
    """Continuous bounding box (x0, y0, x1, y1); a triangle points up with its area centroid at (cx, cy)."""
    if shape == "triangle":
        return cx - a, cy - 4 * a / 3, cx + a, cy + 2 * a / 3
    return cx - a, cy - a, cx + a, cy + a


def _mask(shape, a, cx, cy, n):
    """Pixels whose centre lies inside the shape: a (n, n) bool mask."""
    c = np.arange(n) + 0.5
    dx, dy = c[None, :] - cx, c[:, None] - cy  # exact, since cx and cy are multiples of 1/8
    if shape == "circle":
        return dx * dx + dy * dy <= a * a
    if shape == "square":
        return (np.abs(dx) <= a) & (np.abs(dy) <= a)
    return (dy <= 2 * a / 3) & (2 * np.abs(dx) <= dy + 4 * a / 3)


def render(specs, world):
    """Draw (colour, shape, size, cx, cy) specs: uint8 (H, W, 3) image and the ground-truth objects."""
    n = world.size
    img = np.empty((n, n, 3), np.uint8)
    img[:] = BACKGROUND
    objs = []
    for colour, shape, size, cx, cy in specs:
        m = _mask(shape, world.half[size], cx, cy, n)
        img[m] = PALETTE[colour]
        ys, xs = np.nonzero(m)
        objs.append(Obj(colour, shape, size, float(xs.mean()) + 0.5, float(ys.mean()) + 0.5, len(xs), (cx, cy)))
    return img, objs


def place_of(x, y, size):
    """Name of the 3x3 grid cell holding the point (x, y)."""
    col, row = min(int(3 * x / size), 2), min(int(3 * y / size), 2)
    return PLACES[3 * max(row, 0) + max(col, 0)]


def cell_centre(place, size):
    """Centre (x, y) of the grid cell named `place`."""
    row, col = divmod(PLACES.index(place), 3)
    return (col + 0.5) * size / 3, (row + 0.5) * size / 3


def _fits(spec, others, world):
    """The spec lies inside the frame border and at least `gap` empty pixels away from every other spec."""
    x0, y0, x1, y1 = _box(spec[1], world.half[spec[2]], spec[3], spec[4])
    lo, hi = world.border + 0.5, world.size - world.border - 0.5
    if x0 < lo or y0 < lo or x1 > hi or y1 > hi:
        return False
    for o in others:
        u0, v0, u1, v1 = _box(o[1], world.half[o[2]], o[3], o[4])
        # pixel centres are 1 apart, so gap empty pixels need the boxes gap + 1 apart on one axis
        if max(u0 - x1, x0 - u1, v0 - y1, y0 - v1) < world.gap + 1:
            return False
    return True


def _in_cell(rng, colour, shape, size, place, others, world, tries=20):
    """A spec drawn uniformly >= 1 px inside the cell `place`, fitting among `others`; None if none was found."""
    r, c = divmod(PLACES.index(place), 3)
    w = world.size / 3
    xs, ys = rng.uniform(c * w + 1, c * w + w - 1, tries), rng.uniform(r * w + 1, r * w + w - 1, tries)
    for x, y in zip(xs.tolist(), ys.tolist()):
        spec = (colour, shape, size, _q(x), _q(y))
        if _fits(spec, others, world):
            return spec
    return None


def _scene(rng, world):
    """1-3 objects with distinct (colour, shape) in distinct cells."""
    while True:
        n = int(rng.integers(1, MAX_OBJECTS + 1))
        kinds = rng.permutation(len(COLOURS) * len(SHAPES))[:n]
        cells = rng.permutation(len(PLACES))[:n]
        specs = []
        for k, cell in zip(kinds, cells):
            colour, shape = COLOURS[k // len(SHAPES)], SHAPES[k % len(SHAPES)]
            spec = _in_cell(rng, colour, shape, SIZES[rng.integers(2)], PLACES[cell], specs, world)
            if spec is None:
                break
            specs.append(spec)
        if len(specs) == n:  # objects are ordered by place, the order the scene sentence names them in
            return sorted(specs, key=lambda s: PLACES.index(place_of(s[3], s[4], world.size)))


def _event(rng, specs, world):
    """Draw a feasible event uniformly by kind (weighted) then by option; return (event, next specs)."""
    options = {k: [] for k in EVENT_WEIGHTS}
    for i, (colour, shape, size, cx, cy) in enumerate(specs):
        rest = specs[:i] + specs[i + 1:]
        for d, (ux, uy) in DIRECTIONS.items():
            moved = (colour, shape, size, cx + ux * world.step, cy + uy * world.step)
            if _fits(moved, rest, world):
                options["move"].append((Event("move", colour, shape, direction=d), specs[:i] + [moved] + specs[i + 1:]))
        if len(specs) > 1:
            options["disappear"].append((Event("disappear", colour, shape), rest))
        for new in COLOURS:
            if new != colour and all((new, shape) != s[:2] for s in specs):
                options["turn"].append((Event("turn", colour, shape, new_colour=new),
                                        specs[:i] + [(new, shape, size, cx, cy)] + specs[i + 1:]))
    if len(specs) < MAX_OBJECTS:  # appear in a random empty cell, with a random unused (colour, shape)
        used = {place_of(s[3], s[4], world.size) for s in specs}
        free = [p for p in PLACES if p not in used]
        kinds = [(c, s) for c in COLOURS for s in SHAPES if all((c, s) != t[:2] for t in specs)]
        colour, shape = kinds[rng.integers(len(kinds))]
        size = SIZES[rng.integers(2)]
        for p in rng.permutation(free):
            spec = _in_cell(rng, colour, shape, size, str(p), specs, world)
            if spec is not None:
                options["appear"].append((Event("appear", colour, shape, size=size, place=str(p)), specs + [spec]))
                break
    kinds = [k for k in EVENT_WEIGHTS if options[k]]
    p = np.array([EVENT_WEIGHTS[k] for k in kinds])
    choice = options[kinds[rng.choice(len(kinds), p=p / p.sum())]]
    return choice[rng.integers(len(choice))]


@dataclass
class Story:
    """2-5 frames with their sentences; frame k is described by sentences[k] (a scene, then events)."""
    images: list             # uint8 (H, W, 3) per frame
    objects: list            # list[Obj] per frame (ground truth)
    sentences: list          # str per frame
    events: list             # Event per frame (None for the first, described by a scene)
    image_first: list        # bool per frame: the image goes before its sentence in the document

    def segments(self):
        """The story as a document: text and image segments in reading order."""
        doc = []
        for img, text, first in zip(self.images, self.sentences, self.image_first):
            pair = [{"image": img}, {"text": text}]
            doc += pair if first else pair[::-1]
        return doc


SPLITS = {"train": 0, "eval": 1}
EVAL_BUCKETS = 8  # a story is held out iff the hash of its first frame is 0 mod 8


def make_story(split="train", seed=0, index=0, size=32):
    """Story `index` of a split: seeded by (split, seed, index), independent of every other story.

    The splits draw from disjoint random streams (the split is part of the seed) and, as a guarantee rather than
    a probability, a story belongs to the split its first frame hashes to (1/8 of first frames are held out for
    eval), redrawing otherwise: no eval story starts with the same frame, or scene, as any train story.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    world = World(size)
    for attempt in itertools.count():
        rng = np.random.default_rng([SPLITS[split], seed, index, attempt])
        specs = [_scene(rng, world)]
        pixels = render(specs[0], world)[0].tobytes()  # hash pixels: two nearby anchors can draw the same frame
        if (hashlib.sha256(pixels).digest()[0] % EVAL_BUCKETS == 0) == (split == "eval"):
            break
    events = [None]
    for _ in range(int(rng.integers(2, 6)) - 1):
        ev, nxt = _event(rng, specs[-1], world)
        events.append(ev)
        specs.append(nxt)
    rendered = [render(s, world) for s in specs]
    sentences = [describe(rendered[0][1], size)] + [say(e) for e in events[1:]]
    return Story([r[0] for r in rendered], [r[1] for r in rendered], sentences, events,
                 [bool(b) for b in rng.integers(0, 2, len(specs))])


class ShapeStories:
    """An infinite, indexable stream of stories: `ShapeStories("eval", seed=0)[i]` or `for story in ...`."""

    def __init__(self, split="train", seed=0, size=32):
        World(size)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        self.split, self.seed, self.size = split, seed, size

    def __getitem__(self, index):
        return make_story(self.split, self.seed, index, self.size)

    def __iter__(self):
        return (self[i] for i in itertools.count())


def names_shared_colour(objects, event):
    """Whether `event` names one of `objects` (a move, turn or disappearance) whose colour another of them has: then
    only the shape word says which object is meant (EXPERIMENTS.md, "Two objects of one colour")."""
    return event.kind != "appear" and any(o.colour == event.colour and o.shape != event.shape for o in objects)


def to_tensor(image):
    """uint8 (H, W, 3) -> float (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255  # (3, H, W)


# ---------------------------------------------------------------------------------------------------------------
# 3. The template language

@dataclass(frozen=True)
class Event:
    """What happens between two frames; (colour, shape) names the object (its colour before a turn)."""
    kind: str                # "move" | "appear" | "disappear" | "turn"
    colour: str
    shape: str
    direction: str = None    # move
    new_colour: str = None   # turn
    size: str = None         # appear
    place: str = None        # appear


@dataclass(frozen=True)
class Mention:
    """An object as a scene sentence names it."""
    size: str
    colour: str
    shape: str
    place: str


def describe(objects, size):
    """The scene sentence naming every object (in the order given) with size, colour, shape and place."""
    return scene_sentence([Mention(o.size, o.colour, o.shape, place_of(o.x, o.y, size)) for o in objects])


def scene_sentence(mentions):
    """Mentions (size, colour, shape, place) -> "there is a ... at the ...." / "there are ..., ... and ....": the
    one template every scene sentence is written with (parse() reads it back)."""
    parts = [f"a {m.size} {m.colour} {m.shape} at the {m.place}" for m in mentions]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"there {'is' if len(parts) == 1 else 'are'} {listed}."


def say(event):
    """The event sentence."""
    the = f"the {event.colour} {event.shape}"
    return {"move": f"{the} moves {event.direction}.",
            "appear": f"a {event.size} {event.colour} {event.shape} appears at the {event.place}.",
            "disappear": f"{the} disappears.",
            "turn": f"{the} turns {event.new_colour}."}[event.kind]


def _alt(words):
    return "(" + "|".join(sorted(words, key=len, reverse=True)) + ")"  # longest first: "top left" before "top"


_C, _S, _Z, _P, _D = _alt(COLOURS), _alt(SHAPES), _alt(SIZES), _alt(PLACES), _alt(DIRECTIONS)
_MENTION = re.compile(rf"a {_Z} {_C} {_S} at the {_P}")
_EVENTS = [
    (re.compile(rf"the {_C} {_S} moves {_D}\."), lambda m: Event("move", m[1], m[2], direction=m[3])),
    (re.compile(rf"a {_Z} {_C} {_S} appears at the {_P}\."),
     lambda m: Event("appear", m[2], m[3], size=m[1], place=m[4])),
    (re.compile(rf"the {_C} {_S} disappears\."), lambda m: Event("disappear", m[1], m[2])),
    (re.compile(rf"the {_C} {_S} turns {_C}\."), lambda m: Event("turn", m[1], m[2], new_colour=m[3])),
]


def parse(text):
    """A sentence of the template language -> list[Mention] (scene) or Event; ValueError if it is not one."""
    t = " ".join(text.lower().split())
    m = re.fullmatch(r"there (?:is|are) (.+)\.", t)
    if m:
        parts = re.split(r", | and ", m[1])
        found = [_MENTION.fullmatch(p) for p in parts]
        if all(found) and (len(parts) == 1) == t.startswith("there is"):
            return [Mention(*f.groups()) for f in found]
    for pattern, build in _EVENTS:
        m = pattern.fullmatch(t)
        if m:
            return build(m)
    raise ValueError(f"not a ShapeStories sentence: {text!r}")


# ---------------------------------------------------------------------------------------------------------------
# 4. The detector

_BG = np.array(BACKGROUND, np.float32)
_DIR = np.array(list(PALETTE.values()), np.float32) - _BG  # (K, 3): background -> palette colour
FG_ALPHA = 0.5        # foreground: at least half way from the background to a palette colour
MAX_OFF_LINE = 80.0   # RGB distance from the nearest background-colour line beyond which a pixel is no colour


def _as_hwc(frame):
    """uint8 (H, W, 3), float (H, W, 3) or (3, H, W) in [0, 1], numpy or torch -> float32 (H, W, 3) in [0, 255]."""
    a = frame.detach().cpu().numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)  # (H, W, 3)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"detect: expected an RGB frame (H, W, 3) or (3, H, W), got shape {a.shape}")
    return a.astype(np.float32) if a.dtype == np.uint8 else np.clip(a.astype(np.float32), 0, 1) * 255


def components(mask):
    """4-connected components of a bool (H, W) mask: int labels, -1 off the mask (min-label propagation)."""
    h, w = mask.shape
    n = h * w
    lab = np.where(mask, np.arange(n).reshape(h, w), n)  # background holds the largest label, so min ignores it
    while True:
        new = lab.copy()
        new[1:] = np.minimum(new[1:], lab[:-1])
        new[:-1] = np.minimum(new[:-1], lab[1:])
        new[:, 1:] = np.minimum(new[:, 1:], lab[:, :-1])
        new[:, :-1] = np.minimum(new[:, :-1], lab[:, 1:])
        new = np.where(mask, new, n).ravel()
        new = np.append(new, n)[new].reshape(h, w)  # pointer jumping: take the label of my label
        if np.array_equal(new, lab):
            return np.where(mask, lab, -1)
        lab = new


def _unmix(rgb):
    """Per pixel: nearest palette colour k and its share alpha, the pixel read as background + alpha * (P_k - bg).

    Blurred or anti-aliased edges are such mixtures, so this classifies them by the colour they came from."""
    c = rgb - _BG                                                     # (H, W, 3)
    cd = c @ _DIR.T                                                   # (H, W, K)
    dd = (_DIR * _DIR).sum(1)                                         # (K,)
    alpha = np.clip(cd / dd, 0, 1)                                    # (H, W, K)
    off2 = (c * c).sum(-1, keepdims=True) - 2 * alpha * cd + alpha * alpha * dd  # squared distance to each line
    k = off2.argmin(-1)
    a = np.take_along_axis(alpha, k[..., None], -1)[..., 0]
    return k, np.where(np.take_along_axis(off2, k[..., None], -1)[..., 0] <= MAX_OFF_LINE ** 2, a, 0.0)


def _classify(comp, x, y, world):
    """(shape, size) whose ideal mask, drawn at the component's centroid, overlaps the component best (IoU).

    The anchor of every shape is its area centroid, so the pixel centroid places the template to within 1/2 px."""
    cx, cy = _q(x), _q(y)
    def iou(sz):
        m = _mask(sz[0], world.half[sz[1]], cx, cy, world.size)
        return (m & comp).sum() / (m | comp).sum()
    return max(itertools.product(SHAPES, SIZES), key=iou)


def detect(frame, min_area=None):
    """Read a frame back into objects (in reading order): palette colour, shape, size class, pixel centroid."""
    rgb = _as_hwc(frame)
    if rgb.shape[0] != rgb.shape[1]:
        raise ValueError(f"detect: expected a square frame, got {rgb.shape[0]}x{rgb.shape[1]}")
    world = World(rgb.shape[0])
    min_area = world.min_area if min_area is None else min_area
    colour, alpha = _unmix(rgb)
    labels = components(alpha >= FG_ALPHA)
    out = []
    for lab in np.unique(labels[labels >= 0]):
        comp = labels == lab
        ys, xs = np.nonzero(comp)
        if len(ys) < min_area:
            continue
        votes = np.bincount(colour[ys, xs], weights=alpha[ys, xs], minlength=len(COLOURS))  # majority, by alpha
        x, y = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
        shape, size = _classify(comp, x, y, world)
        out.append(Obj(COLOURS[votes.argmax()], shape, size, x, y, len(ys)))
    return sorted(out, key=lambda o: (o.y, o.x))


# ---------------------------------------------------------------------------------------------------------------
# 5. Scoring (eval.py)

def match(expected, detected, keys=("colour", "shape")):
    """Pairs (i, j) matching expected[i] to detected[j] with equal `keys`; within a key group, nearest (x, y)."""
    pairs = []
    for key in {tuple(getattr(e, k) for k in keys) for e in expected}:
        es = [i for i, e in enumerate(expected) if tuple(getattr(e, k) for k in keys) == key]
        ds = [j for j, d in enumerate(detected) if tuple(getattr(d, k) for k in keys) == key]
        def cost(i, j):
            return math.hypot(expected[i].x - detected[j].x, expected[i].y - detected[j].y)
        if len(ds) > 7:  # brute force is plenty for the few objects of a frame; keep the nearest few otherwise
            ds = sorted(ds, key=lambda j: min(cost(i, j) for i in es))[:7]
        if len(es) <= len(ds):
            cands = [list(zip(es, dj)) for dj in itertools.permutations(ds, len(es))]
        else:
            cands = [list(zip(ei, ds)) for ei in itertools.permutations(es, len(ds))]
        best = min(cands, key=lambda p: sum(cost(i, j) for i, j in p), default=[])
        pairs += best
    return sorted(pairs)


ATTRIBUTES = ("colour", "shape", "size")


def score_caption(generated, truth):
    """Compare a generated sentence with the true one: exact (same meaning) and, for scenes, objects right, and per
    attribute how many true objects the caption gives the right colour / shape / size at their place (a place holds
    one object; an object whose place the caption does not name has every attribute wrong)."""
    want = parse(truth)
    try:
        got = parse(generated)
    except ValueError:
        got = None
    if isinstance(want, Event):
        ok = int(got == want)
        return {"exact": got == want, "n_true": 1, "n_correct": ok, "n_pred": int(got is not None),
                **{f"n_{a}": ok for a in ATTRIBUTES}}
    got = got if isinstance(got, list) else []
    correct = sum((Counter(got) & Counter(want)).values())
    at = {}
    for o in reversed(got):  # the first object the caption names at a place is the one that counts
        at[o.place] = o
    attrs = {f"n_{a}": sum(o.place in at and getattr(at[o.place], a) == getattr(o, a) for o in want)
             for a in ATTRIBUTES}
    return {"exact": Counter(got) == Counter(want), "n_true": len(want), "n_correct": correct, "n_pred": len(got),
            **attrs}


def _text_to_image_pairs(sentence, frame, detected, caller):
    """(named mentions, detected objects, frame side, pairs (i, j) of mention i found as object j by colour and
    shape): the lookup that score_text_to_image and text_to_image_misses share."""
    want = parse(sentence)
    if not isinstance(want, list):
        raise ValueError(f"{caller}: not a scene sentence: {sentence!r}")
    det = detect(frame) if detected is None else detected
    size = _as_hwc(frame).shape[0]
    # a named object is looked for near the centre of its cell when the frame holds several of its kind
    pairs = match([Obj(m.colour, m.shape, m.size, *cell_centre(m.place, size)) for m in want], det)
    return want, det, size, pairs


def score_text_to_image(sentence, frame, detected=None):
    """Each object a scene sentence names, looked up in the generated frame by colour and shape (`detected`:
    detect(frame) if the caller already has it)."""
    want, det, size, pairs = _text_to_image_pairs(sentence, frame, detected, "score_text_to_image")
    exact = sum(det[j].size == want[i].size and place_of(det[j].x, det[j].y, size) == want[i].place for i, j in pairs)
    return {"n": len(want), "found": len(pairs), "exact": exact, "extra": len(det) - len(pairs)}


def text_to_image_misses(sentence, frame, detected=None):
    """What each named object that score_text_to_image does not find is drawn as, by what its cell holds among the
    unmatched objects -> list of (mention, kind, drawn shape or None): kind "shape" (its colour in another shape,
    which is then the drawn shape), "colour" (its shape in another colour), "other" (something else) or "none"."""
    want, det, size, pairs = _text_to_image_pairs(sentence, frame, detected, "text_to_image_misses")
    found, used = {i for i, _ in pairs}, {j for _, j in pairs}
    out = []
    for i, m in enumerate(want):
        if i in found:
            continue
        here = [d for j, d in enumerate(det) if j not in used and place_of(d.x, d.y, size) == m.place]
        same_colour = [d for d in here if d.colour == m.colour]
        if same_colour:
            out.append((m, "shape", same_colour[0].shape))
        else:
            out.append((m, "colour" if any(d.shape == m.shape for d in here) else "other" if here else "none", None))
    return out


def apply_event(objects, event, size):
    """Expected next frame: list of (Obj, role), role in unmoved | moved | appeared (at its cell's centre) | gone."""
    out = []
    for o in objects:
        if (o.colour, o.shape) != (event.colour, event.shape):
            out.append((o, "unmoved"))
        elif event.kind == "move":
            ux, uy = DIRECTIONS[event.direction]
            step = World(size).step
            out.append((Obj(o.colour, o.shape, o.size, o.x + ux * step, o.y + uy * step, o.area), "moved"))
        elif event.kind == "turn":
            out.append((Obj(event.new_colour, o.shape, o.size, o.x, o.y, o.area), "unmoved"))
        else:  # disappears
            out.append((o, "gone"))
    if event.kind == "appear":
        out.append((Obj(event.colour, event.shape, event.size, *cell_centre(event.place, size)), "appeared"))
    return out


def score_continuation(previous, event, frame):
    """Continuation consistency: centroid errors (px; inf if the object is missing) of unmoved and moved objects,
    and of the unmoved ones again with any colour (`unmoved_shape_err`: matched on shape alone), which tells a copy
    drawn in place in the wrong colour from one not drawn at all."""
    event = parse(event) if isinstance(event, str) else event
    size = _as_hwc(frame).shape[0]
    expected = apply_event(previous, event, size)
    det = detect(frame)
    present = [(o, r) for o, r in expected if r != "gone"]
    found = dict(match([o for o, _ in present], det))
    by_shape = dict(match([o for o, _ in present], det, keys=("shape",)))
    res = {"unmoved_err": [], "moved_err": [], "unmoved_shape_err": [], "appeared_ok": None, "gone_ok": None,
           "extra": len(det) - len(found)}
    for i, (o, role) in enumerate(present):
        d = det[found[i]] if i in found else None
        if role == "appeared":
            res["appeared_ok"] = d is not None and d.size == event.size and place_of(d.x, d.y, size) == event.place
        else:
            res[f"{role}_err"].append(math.inf if d is None else math.hypot(d.x - o.x, d.y - o.y))
        if role == "unmoved":
            d = det[by_shape[i]] if i in by_shape else None
            res["unmoved_shape_err"].append(math.inf if d is None else math.hypot(d.x - o.x, d.y - o.y))
    for o, role in expected:
        if role == "gone":
            res["gone_ok"] = all((d.colour, d.shape) != (o.colour, o.shape) for d in det)
    return res


# ---------------------------------------------------------------------------------------------------------------
# 6. JSONL interleaved documents: {"segments": [{"text": "..."}, {"image": "path.png"}, ...]} per line

def read_jsonl(path):
    """Yield documents (segment lists, images loaded as uint8 (H, W, 3)); image paths are relative to the file.

    Blank lines are skipped and top-level keys other than "segments" ignored. Any other problem raises a
    one-line ValueError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: JSONL file not found")
    with open(path, "rb") as f:
        for ln, raw in enumerate(f, 1):
            where = f"{path}:{ln}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{where}: invalid JSON (not UTF-8)") from None
            if not line.strip():
                continue
            try:
                doc = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            segs = doc.get("segments") if isinstance(doc, dict) else None
            if not isinstance(segs, list) or not segs:
                raise ValueError(f"{where}: expected an object with a non-empty \"segments\" list")
            yield [_read_segment(seg, k, path.parent, where) for k, seg in enumerate(segs)]


def _read_segment(seg, k, root, where):
    kind = next(iter(seg)) if isinstance(seg, dict) and len(seg) == 1 else None
    if kind not in ("text", "image") or not isinstance(seg[kind], str):
        raise ValueError(f"{where}: segment {k} must be {{\"text\": str}} or {{\"image\": str}}, got {seg!r:.80}")
    if kind == "text":
        return seg
    p = root / seg["image"]
    if not p.is_file():
        raise ValueError(f"{where}: segment {k}: image file not found: {p}")
    try:
        with Image.open(p) as im:
            return {"image": np.asarray(im.convert("RGB"))}
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise ValueError(f"{where}: segment {k}: cannot decode image {p} ({type(e).__name__})") from None


def write_jsonl(documents, path, image_dir="images"):
    """Write documents (segment lists or Story objects) as JSONL, images as PNGs in `image_dir` beside it."""
    path = Path(path)
    (path.parent / image_dir).mkdir(parents=True, exist_ok=True)
    lines = []
    for d, doc in enumerate(documents):
        segs = []
        for k, seg in enumerate(doc.segments() if isinstance(doc, Story) else doc):
            if "image" in seg:
                rel = f"{image_dir}/{d:06d}_{k:02d}.png"
                Image.fromarray(np.asarray(seg["image"], np.uint8)).save(path.parent / rel)
                seg = {"image": rel}
            segs.append(seg)
        lines.append(json.dumps({"segments": segs}) + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, path)  # atomic: a reader never sees half a file


# ---------------------------------------------------------------------------------------------------------------
# 7. Tokenisation, packing and collation (reference §6.2)
#
# A document becomes `<s>` + its segments + `</s>`: text through sentencepiece (each segment with its own leading
# space, i.e. sentences joined by spaces), each image as `<BoI>` + K `<image>` placeholders. Rows of `seq_len` ids
# hold several documents back to back; self-attention runs across them, MMFS and the image contexts stop at `<s>`.
# A batch is a pure function of (seed, step): `--resume` gets the next batch of the interrupted run for free.

def tokenize_document(doc, tokenizer, k):
    """Segments -> (ids, images): `<s>`, text pieces and `<BoI>` + k `<image>` per image in order, `</s>`."""
    ids, images = [tokenizer.bos_id], []
    for seg in doc:
        if "image" in seg:
            ids += tokenizer.image_tokens(k)
            images.append(seg["image"])
        else:
            ids += tokenizer.encode(seg["text"].strip(), bos=False)
    return ids + [tokenizer.eos_id], images


def split_document(ids, images, seq_len, boi_id, k):
    """Cut a document longer than seq_len into chunks of <= seq_len ids, never inside an image's placeholder run
    (the cut moves back before its `<BoI>`, as the authors' "image" level); later chunks carry no `<s>`."""
    if k + 1 > seq_len:
        raise ValueError(f"seq_len = {seq_len} cannot hold one image (<BoI> + {k} placeholders)")
    chunks, pos, img = [], 0, 0
    while pos < len(ids):
        end = min(pos + seq_len, len(ids))
        if end < len(ids):
            for b in range(max(pos, end - k), end):  # a <BoI> whose run [b, b + k] crosses the cut
                if ids[b] == boi_id and b + k >= end:
                    end = b
                    break
            if end == pos:  # cannot happen with seq_len > k, but never loop forever
                raise ValueError("split_document: no progress")
        n_img = ids[pos:end].count(boi_id)
        chunks.append((ids[pos:end], images[img:img + n_img]))
        pos, img = end, img + n_img
    return chunks


def pack(docs, seq_len, max_images, boi_id, k):
    """Greedy packing of tokenised (ids, images) documents into rows [(ids, images)] of <= seq_len ids and
    <= max_images images; a document that does not fit the current row starts the next one."""
    rows, cur, cur_imgs = [], [], []
    for ids, images in docs:
        for c_ids, c_imgs in split_document(ids, images, seq_len, boi_id, k):
            if len(c_imgs) > max_images:
                raise ValueError(f"a document chunk holds {len(c_imgs)} images, more than the model's "
                                 f"{max_images} per sequence")
            if cur and (len(cur) + len(c_ids) > seq_len or len(cur_imgs) + len(c_imgs) > max_images):
                rows.append((cur, cur_imgs))
                cur, cur_imgs = [], []
            cur, cur_imgs = cur + c_ids, cur_imgs + c_imgs
    if cur:
        rows.append((cur, cur_imgs))
    return rows


def image_tensor(image, size):
    """uint8 (H, W, 3) -> float (3, size, size) in [0, 1]: centre crop to a square, then a bicubic resize."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return to_tensor(image)
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    im = Image.fromarray(np.ascontiguousarray(image[top:top + s, left:left + s]))
    return to_tensor(np.array(im.resize((size, size), Image.BICUBIC)))


def collate(rows, pad_id, size):
    """Rows [(ids, images)] -> dict(tokens (B, L) right-padded with pad_id, images (ΣI, 3, size, size),
    images_per_row [B]); L is the longest row, so short batches cost less."""
    L = max(len(ids) for ids, _ in rows)
    tokens = torch.full((len(rows), L), pad_id, dtype=torch.long)
    for b, (ids, _) in enumerate(rows):
        tokens[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    imgs = [image_tensor(im, size) for _, images in rows for im in images]
    images = torch.stack(imgs) if imgs else torch.zeros(0, 3, size, size)
    return dict(tokens=tokens, images=images, images_per_row=[len(images) for _, images in rows])


class StoryBatches:
    """Training batches of packed ShapeStories: row j of step s packs stories (s·B + j)·R, +1, ... until the next
    one would not fit (it is skipped), so every batch is a pure function of (seed, step), independent of history.

    `prefixes=True` trains on a random prefix of each story (1 to all of its frames, uniform, seeded by the story):
    every prefix is a valid story, and the mix holds ~1.5x more scene frames (what captioning and text-to-image
    learn from) and as many first-event frames, at the cost of the later events (the small recipe's choice).
    `first_frame_prob=P` (with prefixes) makes a document the story's first frame alone with probability P and
    otherwise a uniform prefix of 2 to all frames; None keeps the uniform 1 to all (P = 0.32 on average). A lone
    first frame is a caption (image first: no diffusion loss, so no UNet work) or a text-to-image example.
    `events_text_first=True` puts every event's sentence before its image, so each later frame is a continuation
    (the event told, then drawn) rather than a frame drawn before its event is told; first frames keep the coin,
    so captions and text-to-image are untouched. `shared_colour_prob=P` replaces a story, with probability P (seeded
    by the story), by one of a separate stream whose first event names an object whose colour another object shares
    (`names_shared_colour`: 7-8 % of stories, and the continuations' hardest case). All are choices of the training
    mix, not of the data.

    `balance_window=W` (> 0) trains the same rows in another order: the B·W rows of steps W·w .. W·w + W - 1 are
    sorted by `row_work`, cut into W groups of B alike rows, and the groups trained in the order of their first
    row. DDP ranks that each take a share of a step's rows then have about equal work and wait less for each other
    at the gradient all-reduce (the small recipe's two one-row CPU processes, EXPERIMENTS.md). Every row is still
    trained once per window, and a batch is still a pure function of (seed, step). `unet_passes` is the draws a
    diffused image makes (MMConfig.noise_draws), which `row_work` counts."""

    def __init__(self, tokenizer, k, seq_len, batch_size, max_images, seed=0, size=32, prefixes=False,
                 first_frame_prob=None, events_text_first=False, balance_window=0, unet_passes=1,
                 shared_colour_prob=0.0):
        if first_frame_prob is not None and not (prefixes and 0 <= first_frame_prob <= 1):
            raise ValueError(f"first_frame_prob {first_frame_prob}: a probability in [0, 1], and only with prefixes")
        if not 0 <= shared_colour_prob <= 1:
            raise ValueError(f"shared_colour_prob {shared_colour_prob}: a probability in [0, 1]")
        self.shared_colour_prob = float(shared_colour_prob)
        if balance_window < 0:
            raise ValueError(f"balance_window {balance_window}: 0 (off) or a number of steps")
        self.window, self.unet_passes = int(balance_window), unet_passes
        self._cached = (None, {}, [])  # (window, {row index: row}, its groups): built once for the window's W steps
        self.events_text_first = bool(events_text_first)
        self.stories = ShapeStories("train", seed, size)
        self.tok, self.k, self.seq_len, self.B, self.max_images, self.size = (tokenizer, k, seq_len, batch_size,
                                                                              max_images, size)
        self.seed, self.prefixes, self.first_frame_prob = seed, prefixes, first_frame_prob
        frames = 1 if prefixes else 2  # the shortest document: frames x (<BoI> + k placeholders + a short sentence)
        self.R = max(1, seq_len // (1 + frames * (k + 1 + 6) + 1))  # stories tried per row: >= the most that fit

    SHARED_STREAM = 2 ** 40  # where the stand-ins of shared_colour_prob come from: story indices no run reaches

    def story(self, i):
        """Story i, or with probability shared_colour_prob its stand-in: the first of stories SHARED_STREAM + 64 i,
        +1, ... whose first event names a colour another object has (story i itself if none of 64 does, ~0.6 %)."""
        if self.shared_colour_prob and np.random.default_rng([self.seed, i, 11]).random() < self.shared_colour_prob:
            for j in range(self.SHARED_STREAM + 64 * i, self.SHARED_STREAM + 64 * (i + 1)):
                other = self.stories[j]
                if names_shared_colour(other.objects[0], other.events[1]):
                    return other
        return self.stories[i]

    def document(self, i):
        """Story i (or its stand-in, or a seeded random prefix of either) as segments."""
        story = self.story(i)
        if self.events_text_first:  # the same story, its events told before they are drawn
            story = replace(story, image_first=story.image_first[:1] + [False] * (len(story.images) - 1))
        doc = story.segments()
        if self.prefixes:
            rng, n_max = np.random.default_rng([self.seed, i, 7]), len(story.images)
            if self.first_frame_prob is None:
                n = int(rng.integers(1, n_max + 1))
            else:
                n = 1 if rng.random() < self.first_frame_prob else int(rng.integers(2, n_max + 1))
            doc = doc[:2 * n]  # each frame is two segments: its image and its sentence, in either order
        return doc

    def row_documents(self, index):
        """What row `index` packs: [(segments, ids, images)] of stories index·R, +1, ... until one does not fit."""
        docs, n_ids, n_images = [], 0, 0
        for i in range(index * self.R, (index + 1) * self.R):
            doc = self.document(i)
            d_ids, d_imgs = tokenize_document(doc, self.tok, self.k)
            if n_ids + len(d_ids) > self.seq_len or n_images + len(d_imgs) > self.max_images:
                if not docs:
                    raise ValueError(f"story {i} ({len(d_ids)} ids, {len(d_imgs)} images) does not fit a row of "
                                     f"seq_len = {self.seq_len} and max_images = {self.max_images}")
                break
            docs.append((doc, d_ids, d_imgs))
            n_ids, n_images = n_ids + len(d_ids), n_images + len(d_imgs)
        return docs

    def row(self, index):
        """Row `index` as (ids, images): its documents one after another."""
        docs = self.row_documents(index)
        return [t for _, ids, _ in docs for t in ids], [im for _, _, images in docs for im in images]

    def step_rows(self, step):
        """The row indices of `step`'s global batch: step·B .. step·B + B - 1, or with balance_window its group
        of B alike rows of the window (lightest first)."""
        if not self.window:
            return list(range(step * self.B, (step + 1) * self.B))
        w, k = divmod(step, self.window)
        _, groups = self._window(w)
        return groups[k]

    def _window(self, w):
        """({index: row} of the W·B rows of window w, its W groups in training order), cached: every rank builds
        all the rows to know the groups."""
        if self._cached[0] != w:
            first = w * self.window * self.B
            rows = {i: self.row(i) for i in range(first, first + self.window * self.B)}
            order = sorted(rows, key=lambda i: (row_work(rows[i][0], self.tok, self.unet_passes), i))
            groups = sorted((order[g * self.B:(g + 1) * self.B] for g in range(self.window)), key=min)
            self._cached = (w, rows, groups)
        return self._cached[1:]

    def batch(self, step, rank=0, world=1):
        """This rank's share (rows rank, rank + world, ...) of the global batch of `step`, collated."""
        index = self.step_rows(step)[rank::world]
        built = self._window(step // self.window)[0] if self.window else {}  # the window's rows, built once
        return collate([built[i] if i in built else self.row(i) for i in index], self.tok.pad_id, self.size)


def row_work(ids, tok, unet_passes=1):
    """A packed row's training cost in units of about one image through the UNet (forward and backward): each
    diffused image (one whose <BoI> does not open its document) `unet_passes` of them, each image one more (the
    ViT and its adapter), and one per 64 tokens (the LLM). The units are the small recipe's: a least-squares fit
    of one-row forward and backward times in one thread on the 2-core Intel Xeon gave 43, 37 and 38 ms
    (EXPERIMENTS.md: "The ranks' wait")."""
    boi = [j for j, t in enumerate(ids) if t == tok.boi_id]
    diffused = sum(1 for j in boi if j > 0 and ids[j - 1] != tok.bos_id)
    return unet_passes * diffused + len(boi) + len(ids) / 64


class DocumentBatches:
    """Training batches from a JSONL corpus: packed once, then each epoch visits the rows in a seeded order."""

    def __init__(self, path, tokenizer, k, seq_len, batch_size, max_images, seed=0, size=32):
        docs = [tokenize_document(d, tokenizer, k) for d in read_jsonl(path)]
        if not docs:
            raise ValueError(f"{path}: no documents")
        self.rows = pack(docs, seq_len, max_images, tokenizer.boi_id, k)
        self.tok, self.B, self.seed, self.size = tokenizer, batch_size, seed, size

    def batch(self, step, rank=0, world=1):
        n = len(self.rows)
        picks = []
        for j in range(rank, self.B, world):
            g = step * self.B + j
            epoch, i = divmod(g, n)
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
            picks.append(self.rows[order[i]])
        return collate(picks, self.tok.pad_id, self.size)


def story_corpus(n=2000, seed=0, size=32):
    """Sentences of the first n training stories: the text the --small tokenizer is trained on."""
    return [t for i in range(n) for t in make_story("train", seed, i, size).sentences]


# ---------------------------------------------------------------------------------------------------------------
# 8. CLI

def preview(stories, path, zoom=4):
    """Save a grid: one row per story (its frames), its sentences under it."""
    font = ImageFont.load_default()
    n = stories[0].images[0].shape[0] * zoom
    cols = max(len(s.images) for s in stories)
    row_h = n + 4 + 12 * 5 + 8
    width = max(cols * (n + 4), 7 * max(len(t) for s in stories for t in s.sentences) + 30)
    canvas = Image.new("RGB", (width, row_h * len(stories)), (200, 200, 200))
    draw = ImageDraw.Draw(canvas)
    for r, s in enumerate(stories):
        for c, img in enumerate(s.images):
            canvas.paste(Image.fromarray(img).resize((n, n), Image.NEAREST), (c * (n + 4), r * row_h))
        for k, text in enumerate(s.sentences):
            draw.text((2, r * row_h + n + 4 + 12 * k), f"{k + 1}. {text}", fill=(0, 0, 0), font=font)
    canvas.save(path)


def main():
    ap = argparse.ArgumentParser(description="ShapeStories: preview a few stories or write them as JSONL.")
    ap.add_argument("--preview", metavar="PNG", help="save a grid of stories to this image")
    ap.add_argument("--write-jsonl", metavar="PATH", help="write stories as JSONL (+ PNGs in images/ beside it)")
    ap.add_argument("--n", type=int, default=6, help="number of stories")
    ap.add_argument("--split", default="train", choices=list(SPLITS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=32, help="frame size in pixels")
    args = ap.parse_args()
    if not (args.preview or args.write_jsonl):
        ap.error("give --preview and/or --write-jsonl")
    stories = [make_story(args.split, args.seed, i, args.size) for i in range(args.n)]
    if args.preview:
        preview(stories, args.preview)
    if args.write_jsonl:
        write_jsonl(stories, args.write_jsonl)
    for i, s in enumerate(stories):
        print(f"story {i}: " + " | ".join(s.sentences))


if __name__ == "__main__":
    main()
