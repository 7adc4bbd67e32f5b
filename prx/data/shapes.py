"""Procedural dataset of captioned shapes for the ``tiny`` preset.

The tiny preset must train end to end on a laptop CPU in minutes, with no download and
no pretrained network anywhere -- including in the evaluation. This module provides
both halves of that: an infinite, deterministic stream of images of one or two flat
shapes on a plain background with varied English captions, and a balanced held-out set
of evaluation scenes. Because every scene is fully described by a small set of discrete
attributes (color, shape, position), ``prx.eval.shapes_score`` can check whether a generated
image follows its prompt with simple pixel statistics.

Design choices (all aimed at a tiny model at 32 px being able to learn, and a scorer
being able to measure, prompt following):

* 7 saturated colors far from the white background and from each other, 3 shapes whose
  silhouettes differ a lot even at ~6 px (circle, square, apex-up triangle), and 5
  positions whose anchors are far apart (left, right, top, bottom, center), so the
  region of an object is unambiguous from its centroid.
* A 2-object scene uses two different colors and two different positions with a gap
  between the objects, so the scorer can separate them by color alone.
* Scenes are a pure function of ``(seed, index)`` through a local numpy Generator, so
  any worker in any process renders the same sample for the same index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from prx.data.stream import BatchSource, ImageBatch, IndexStream

# --- vocabulary -------------------------------------------------------------------

BACKGROUND: tuple[int, int, int] = (255, 255, 255)
"""Fixed white background; not in the palette, far from every palette color."""

COLORS: dict[str, tuple[int, int, int]] = {
    # Saturated and mutually distant (>= ~90 in RGB); all >= ~250 away from white.
    "red": (215, 25, 25),
    "orange": (250, 130, 0),
    "yellow": (240, 220, 0),
    "green": (30, 160, 50),
    "cyan": (0, 190, 230),
    "blue": (30, 60, 220),
    "purple": (140, 40, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")

ANCHOR_OFFSET = 0.28
"""Distance (relative units) from the image center to the side anchors: large enough to
fit a large object beside a small central one, small enough that objects stay inside."""
ANCHORS: dict[str, tuple[float, float]] = {
    "left": (0.5 - ANCHOR_OFFSET, 0.5),
    "right": (0.5 + ANCHOR_OFFSET, 0.5),
    "top": (0.5, 0.5 - ANCHOR_OFFSET),
    "bottom": (0.5, 0.5 + ANCHOR_OFFSET),
    "center": (0.5, 0.5),
}
"""Region anchors (x, y), y pointing down; a region is the Voronoi cell of its anchor."""

JITTER = 0.02  # max per-axis offset from the anchor: variety without leaving the region
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.20, 0.24), "large": (0.28, 0.32)}
"""Bounding-box width (relative) per size class: small is ~6.5 px at 32 px, the least a
triangle needs to stay recognisable; large keeps a side object >= 0.04 from the edge."""
PAIR_GAP = 0.03  # min gap (relative, ~1 px at 32 px) between the boxes of two objects
P_TWO_OBJECTS = 0.4
EVAL_STREAM = 0x5EED_E7A1  # first seed word of the evaluation stream: disjoint from training

SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disk"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "on the left side", "at the left", "to the left"),
    "right": ("on the right", "on the right side", "at the right", "to the right"),
    "top": ("at the top", "near the top", "at the top of the image", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom of the image",
               "in the lower part"),
    "center": ("in the center", "in the middle", "centered", "at the center of the image"),
}
POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("left",), "right": ("right",), "top": ("top", "upper"),
    "bottom": ("bottom", "lower"), "center": ("center", "middle"),
}
"""Words that identify a position in a caption (every phrase contains one, and no phrase
contains a word of another position)."""

# {o} is an object noun phrase with article ("a red circle"), {p} a position phrase.
_SINGLE_TEMPLATES: tuple[str, ...] = (
    "{o} {p}", "{O} {p}.", "a picture of {o} {p}", "an image of {o} {p}",
    "{P}, {o}", "there is {o} {p}", "a drawing of {o} {p}", "{o}, {p}",
    "simple shapes: {o} {p}", "{o} placed {p}", "{P}, there is {o}.",
    "{o} {p} on a white background", "a flat illustration of {o} {p}",
    "a white canvas with {o} {p}", "just {o} {p}", "{O}, {p}.", "one shape: {o} {p}",
)
# {a} and {b} are full "object + position" phrases.
_PAIR_TEMPLATES: tuple[str, ...] = (
    "{a} and {b}", "{A} and {b}.", "two shapes: {a} and {b}", "{a}, {b}",
    "{A}; {b}.", "a picture of {a} and {b}", "there is {a} and {b}", "{a} with {b}",
    "an image with {a} and {b}", "{a}, and {b}", "two objects: {a}, {b}",
)


@dataclass(frozen=True)
class ShapeObject:
    """One flat shape. Geometry is relative to the image side (0..1, y down).

    ``cx, cy`` is the center of the bounding box and ``size`` its width (= height); the
    triangle points up and fills the lower-wide part of its box.
    """

    shape: str
    color: str
    position: str
    cx: float
    cy: float
    size: float

    @property
    def size_name(self) -> str:
        """'small' or 'large' (the size class the object was drawn from)."""
        return "small" if self.size < SIZE_RANGES["large"][0] else "large"


@dataclass(frozen=True)
class Scene:
    """A scene: 1 or 2 objects and the caption that describes all of them."""

    objects: tuple[ShapeObject, ...]
    caption: str


# --- scene sampling -----------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _noun_phrase(rng: np.random.Generator, obj: ShapeObject, size_prob: float) -> str:
    words = [obj.color, str(rng.choice(SHAPE_WORDS[obj.shape]))]
    if rng.random() < size_prob:  # size is optional detail, never needed for scoring
        words.insert(0, str(rng.choice(SIZE_WORDS[obj.size_name])))
    return f"{_article(words[0])} {' '.join(words)}"


def _caption(rng: np.random.Generator, objects: tuple[ShapeObject, ...]) -> str:
    if len(objects) == 1:
        template = str(rng.choice(_SINGLE_TEMPLATES))
        # "Centered, there is ..." reads badly: no "centered" at the front.
        options = [p for p in POSITION_PHRASES[objects[0].position]
                   if not (template.startswith("{P}") and p == "centered")]
        phrase = str(rng.choice(options))
        o = _noun_phrase(rng, objects[0], size_prob=0.35)
        return template.format(o=o, O=_cap(o), p=phrase, P=_cap(phrase))
    # Pairs skip the long "... of the image" phrases: they would repeat and push
    # captions past ~20 words.
    phrases = [str(rng.choice([p for p in POSITION_PHRASES[o.position]
                               if not p.endswith("of the image")])) for o in objects]
    # Fewer size words in pairs keeps captions under ~20 words.
    parts = [f"{_noun_phrase(rng, o, size_prob=0.15)} {p}" for o, p in zip(objects, phrases)]
    if rng.random() < 0.5:  # either object may be mentioned first
        parts.reverse()
    template = str(rng.choice(_PAIR_TEMPLATES))
    return template.format(a=parts[0], A=_cap(parts[0]), b=parts[1])


def _boxes_apart(a: ShapeObject, b: ShapeObject) -> bool:
    """True if the bounding boxes are separated by at least PAIR_GAP along x or y."""
    reach = (a.size + b.size) / 2 + PAIR_GAP
    return abs(a.cx - b.cx) >= reach or abs(a.cy - b.cy) >= reach


def _place(rng: np.random.Generator, attrs: list[tuple[str, str, str]]) -> tuple[ShapeObject, ...]:
    """Draw size class, size and jitter for each (shape, color, position); resample until
    two objects do not overlap (a large object beside a large centered one cannot fit)."""
    for attempt in range(100):
        objects = []
        for shape, color, position in attrs:
            size_name = "small" if attempt >= 50 else str(rng.choice(list(SIZE_RANGES)))
            lo, hi = SIZE_RANGES[size_name]
            ax, ay = ANCHORS[position]
            jx, jy = rng.uniform(-JITTER, JITTER, size=2)
            objects.append(ShapeObject(shape, color, position, float(ax + jx), float(ay + jy),
                                       float(rng.uniform(lo, hi))))
        if len(objects) < 2 or _boxes_apart(objects[0], objects[1]):
            return tuple(objects)
    # Two small objects always fit (0.28 - 2*0.02 - 0.24 >= PAIR_GAP), so unreachable.
    raise RuntimeError("could not place objects")


def make_scene(seed: int, index: int) -> Scene:
    """The training scene number ``index`` of stream ``seed`` (pure function)."""
    rng = np.random.default_rng([seed, index])
    n = 2 if rng.random() < P_TWO_OBJECTS else 1
    colors = rng.choice(list(COLORS), size=n, replace=False)
    positions = rng.choice(POSITIONS, size=n, replace=False)
    shapes = rng.choice(SHAPES, size=n)
    objects = _place(rng, [(str(s), str(c), str(p)) for s, c, p in zip(shapes, colors, positions)])
    return Scene(objects, _caption(rng, objects))


class _Deck:
    """Deals vocabulary items so that every item is dealt equally often (balance),
    reshuffling a fresh copy of the vocabulary whenever the deck runs out."""

    def __init__(self, rng: np.random.Generator, items: tuple[str, ...]) -> None:
        self.rng, self.items, self.cards = rng, items, []

    def deal(self, exclude: str | None = None) -> str:
        if not [c for c in self.cards if c != exclude]:
            self.cards += [str(x) for x in self.rng.permutation(self.items)]
        i = next(i for i, c in enumerate(self.cards) if c != exclude)
        return self.cards.pop(i)


def eval_scenes(seed: int, count: int) -> list[Scene]:
    """A fixed held-out set of ``count`` evaluation scenes.

    Drawn from a seed stream training never uses, and balanced: the 1-vs-2 object mix is
    exactly 3:2 in every block of 5 scenes, and colors, shapes and positions are dealt
    from decks, so each appears equally often (within one deck) over all objects. That
    balance makes every forced-choice accuracy of an image that ignores its prompt equal
    to the uniform chance, whatever the scorer's guessing bias.
    """
    rng = np.random.default_rng([EVAL_STREAM, seed])
    colors, shapes, positions = (_Deck(rng, tuple(COLORS)), _Deck(rng, SHAPES),
                                 _Deck(rng, POSITIONS))
    scenes = []
    for i in range(count):
        attrs: list[tuple[str, str, str]] = []
        for _ in range(2 if i % 5 in (1, 3) else 1):
            prev_c, prev_p = (attrs[0][1], attrs[0][2]) if attrs else (None, None)
            attrs.append((shapes.deal(), colors.deal(exclude=prev_c),
                          positions.deal(exclude=prev_p)))
        objects = _place(rng, attrs)
        scenes.append(Scene(objects, _caption(rng, objects)))
    return scenes


# --- rendering ----------------------------------------------------------------------

SUPERSAMPLE = 4  # 4x4 samples per pixel: smooth edges at the cost of 16x a tiny mask


def coverage(shape: str, cx: float, cy: float, size: float, resolution: int,
             ) -> tuple[np.ndarray, int, int]:
    """Anti-aliased coverage (0..1) of one shape, computed only over its bounding box.

    Returns ``(cov, y0, x0)``: ``cov`` has shape (h, w) and covers pixel rows
    ``y0:y0+h`` and columns ``x0:x0+w`` of the image. Geometry in relative units.
    """
    half = size / 2 * resolution
    px, py = cx * resolution, cy * resolution
    x0, y0 = max(int(np.floor(px - half)), 0), max(int(np.floor(py - half)), 0)
    x1 = min(int(np.ceil(px + half)), resolution)
    y1 = min(int(np.ceil(py + half)), resolution)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((0, 0), np.float32), y0, x0
    s = SUPERSAMPLE
    # Sample positions at sub-pixel centers, relative to the shape center, in pixels.
    xs = x0 + (np.arange((x1 - x0) * s) + 0.5) / s - px
    ys = (y0 + (np.arange((y1 - y0) * s) + 0.5) / s - py)[:, None]
    if shape == "circle":
        inside = xs**2 + ys**2 <= half**2
    elif shape == "square":
        inside = (np.abs(xs) <= half) & (np.abs(ys) <= half)
    elif shape == "triangle":  # apex at the top middle, base along the bottom edge
        inside = (np.abs(ys) <= half) & (np.abs(xs) <= (ys + half) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cov = inside.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3), dtype=np.float32)
    return cov, y0, x0


def render_scene(scene: Scene, resolution: int) -> np.ndarray:
    """Render a scene as a uint8 array of shape (3, resolution, resolution)."""
    img = np.empty((resolution, resolution, 3), np.float32)
    img[:] = BACKGROUND
    for obj in scene.objects:  # objects never overlap, so draw order does not matter
        cov, y0, x0 = coverage(obj.shape, obj.cx, obj.cy, obj.size, resolution)
        h, w = cov.shape
        region = img[y0:y0 + h, x0:x0 + w]
        a = cov[..., None]
        region[:] = region * (1 - a) + np.asarray(COLORS[obj.color], np.float32) * a
    return np.ascontiguousarray(np.rint(img).astype(np.uint8).transpose(2, 0, 1))


class ShapesDataset(Dataset):
    """``length`` training samples of stream ``seed``: (uint8 image (3,H,W), caption, scene)."""

    def __init__(self, seed: int, resolution: int, length: int) -> None:
        self.seed, self.resolution, self.length = seed, resolution, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, Scene]:
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for ShapesDataset of length {self.length}")
        scene = make_scene(self.seed, i % self.length)
        return torch.from_numpy(render_scene(scene, self.resolution)), scene.caption, scene


def collate(batch: list[tuple[torch.Tensor, str, Scene]],
            ) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """DataLoader ``collate_fn`` for ShapesDataset (the default one cannot batch Scene):
    returns (uint8 images (B, 3, H, W), captions, scenes)."""
    images, captions, scenes = zip(*batch)
    return torch.stack(images), list(captions), list(scenes)


class ShapesBatches(BatchSource):
    """The trainer's view of the shapes set (as `prx.data.webdata.ShardBatches` is of shards).
    Batches carry sample ids: the shapes captions are known in advance and embedded once.

    A scene is rendered the first time a batch draws it and kept, when the whole set fits in
    `KEEP_BYTES` of uint8 (the tiny preset's 5,000 scenes at 32 px: 15 MB): its 2,000 steps of
    batch 32 draw each scene ~13 times, and rendering a batch of 32 takes ~10 ms of a ~0.2 s
    step on 2 CPU cores."""

    KEEP_BYTES = 1 << 30

    def __init__(self, seed: int, resolution: int, length: int, batch_size: int, device: torch.device,
                 rank: int = 0, world_size: int = 1):
        self.dataset = ShapesDataset(seed, resolution, length)
        self.order = IndexStream(length, batch_size, seed, rank, world_size)
        self.device = device
        keep = length * 3 * resolution * resolution <= self.KEEP_BYTES
        self.rendered: dict[int, tuple[torch.Tensor, str, Scene]] | None = {} if keep else None

    def _sample(self, i: int) -> tuple[torch.Tensor, str, Scene]:
        if self.rendered is None:
            return self.dataset[i]
        if i not in self.rendered:
            self.rendered[i] = self.dataset[i]
        return self.rendered[i]

    def next_batch(self) -> ImageBatch:
        ids = self.order.next_batch()
        images, captions, _ = collate([self._sample(i) for i in ids])
        return ImageBatch(images.to(self.device, non_blocking=True), captions, ids)
