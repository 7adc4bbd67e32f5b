"""Prompt-following score for the procedural shapes set, with no pretrained network.

Every prompt of ``prx.data.shapes`` names, for each of its 1 or 2 objects, a color from a
small palette, a shape and a position region. A generated image is judged per object
and per attribute with plain pixel statistics:

1. **Pixel classification.** The renderer draws each color as an alpha blend over the
   white background, so every pixel is projected onto each background->color segment
   in RGB; it takes the color of the closest segment and the blend factor ``alpha`` as
   its weight. Soft, blurred edges therefore count for their own color instead of
   being mistaken for a lighter palette color. Pixels far from every segment
   (``RESIDUAL_MAX``) or barely off the background (``ALPHA_MIN``) weigh nothing.
2. **Color** (forced choice among the palette): an object's color is right if it is
   among the k colors with the most total weight, k = the number of objects in the
   scene. Ties are broken by palette order, a fixed rule independent of the prompt.
3. **Shape** (forced choice among ``SHAPES``): take the pixels of the object's *named*
   color, keep the 8-connected component of largest weight (drops speckle from noise
   and stray edge pixels), normalise its contrast (washed-out samples), then render
   every candidate shape at the component's centroid with about its area, sharp and
   blurred, and pick the shape of the template with the best soft IoU.
4. **Position** (forced choice among ``POSITIONS``): the component's centroid is mapped
   to the nearest region anchor. An empty mask falls back to a fixed guess (first shape,
   "center"), again independent of the prompt.

Why forced choice: every attribute always gets exactly one guess, so an image that
ignores its prompt (pure noise, or another prompt's image) scores the chance level --
1/#shapes, 1/#positions and k/#colors -- on a balanced evaluation set
(``eval_scenes``), whatever the guessing bias, instead of 0; a "pass only if
detected" score would make noise look like 0 and tiny improvements look large.
``chance_score`` measures that floor empirically.

Limits: it only knows the synthetic palette, axis-aligned apex-up shapes and white
background of ``prx.data.shapes``; it does not check size, sharpness, extra objects or
image quality; an object drawn in a wrong but near color (e.g. orange for red) is judged
on the named color's pixels only; very blurry small objects (< ~5 px) may blur circle
vs square. It is a prompt-following metric for the tiny preset, not a general one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from prx.data.shapes import ANCHORS, BACKGROUND, COLORS, POSITIONS, SHAPES, Scene, coverage, render_scene
from prx.eval.grids import to_uint8

RESIDUAL_MAX = 80.0
"""Max RGB distance from a pixel to its color segment: > 4x the typical residual (~18) of
Gaussian noise of std 0.1 in [-1, 1] units (12.75 levels) over the 2 off-segment
directions, and loose enough for a color cast of +-25 levels."""
ALPHA_MIN = 0.3
"""Min blend factor for a pixel to count: ~7 std of such noise projected on a segment,
so near-background noise does not pile up mass for random colors."""
TEMPLATE_BLURS = (0.0, 0.4, 0.8, 1.2)
"""Gaussian blur std (pixels) tried on each shape template: from sharp renders to the
~1 px softness of generated 32 px samples. Chosen on blurred noisy renders: fewer
levels confuse blurred small squares with circles, more gain nothing."""
TEMPLATE_SCALES = (0.9, 1.0, 1.1)
"""Template side relative to the one implied by the blob's area (thresholding and noise
bias that area by ~10 %); cuts circle/square confusions on blurred 32 px renders ~4x."""
PEAK_PERCENTILE = 90
"""Blob weight taken as full coverage: high enough to be an interior pixel even for a
6 px shape (about half its pixels are edge pixels), below the max to ignore outliers."""
_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area / bounding-box area
FALLBACK_SHAPE = SHAPES[0]  # guess when the named color has no pixel at all
FALLBACK_POSITION = "center"

_BG = np.asarray(BACKGROUND, np.float32)
_DIRS = np.asarray([COLORS[c] for c in COLORS], np.float32) - _BG  # (K, 3) segment vectors
_DIR_SQ = (_DIRS**2).sum(axis=1)  # (K,)
_COLOR_INDEX = {c: i for i, c in enumerate(COLORS)}


@dataclass(frozen=True)
class ShapesScore:
    """Accuracies in [0, 1]: per object (color, shape, position) and per scene (all)."""

    color: float
    shape: float
    position: float
    all_correct: float
    count: int  # number of objects judged

    def as_dict(self) -> dict[str, float | int]:
        """Plain dict (for logs / JSON)."""
        return asdict(self)

    def format(self) -> str:
        """One readable line."""
        return (f"color {self.color:.3f}  shape {self.shape:.3f}  position {self.position:.3f}"
                f"  all {self.all_correct:.3f}  (n={self.count} objects)")


@dataclass(frozen=True)
class ObjectJudgement:
    """The scorer's verdict on one object of one image."""

    color_ok: bool
    shape: str  # predicted shape (forced choice)
    position: str  # predicted position (forced choice)


def classify_pixels(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 -> (label (H, W) palette index, weight (H, W) in [0, 1]).

    The weight is the blend factor along the pixel's closest background->color segment,
    zeroed where the pixel is off every segment or nearly background.
    """
    p = image.reshape(-1, 3).astype(np.float32) - _BG  # (N, 3)
    proj = p @ _DIRS.T  # (N, K)
    alpha = np.clip(proj / _DIR_SQ, 0.0, 1.0)
    resid_sq = (p**2).sum(axis=1, keepdims=True) - 2 * alpha * proj + alpha**2 * _DIR_SQ
    label = resid_sq.argmin(axis=1)
    rows = np.arange(len(p))
    a = alpha[rows, label]
    ok = (resid_sq[rows, label] <= RESIDUAL_MAX**2) & (a >= ALPHA_MIN)
    h, w = image.shape[:2]
    return label.reshape(h, w), np.where(ok, a, 0.0).astype(np.float32).reshape(h, w)


def largest_component(weight: np.ndarray) -> np.ndarray:
    """Weights restricted to the 8-connected component of ``weight > 0`` with the
    largest total weight (all zeros if there is none).

    Labels by min-propagation over the 8 neighbours plus pointer jumping, in numpy.
    """
    mask = weight > 0
    if not mask.any():
        return np.zeros_like(weight)
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        pad = np.pad(lab, 1, constant_values=big)
        nbr = lab.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                np.minimum(nbr, pad[dy:dy + h, dx:dx + w], out=nbr)
        new = np.where(mask, nbr, big)
        flat = new.ravel()
        inside = flat < big
        flat[inside] = flat[flat[inside]]  # jump to the label's own label: fast merging
        if np.array_equal(new, lab):
            break
        lab = new
    mass = np.bincount(lab[mask], weights=weight[mask], minlength=big)
    return np.where(lab == mass.argmax(), weight, 0.0).astype(np.float32)


@lru_cache(maxsize=64)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix M such that M @ X blurs the columns of X with a Gaussian of std
    ``sigma`` pixels (zero padding)."""
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    k = np.exp(-0.5 * (d / sigma) ** 2) / (np.sqrt(2 * np.pi) * sigma)
    # Cut the tails: beyond 4 sigma they are denormal floats that make matmul crawl.
    return np.where(np.abs(d) <= 4 * sigma, k, 0.0).astype(np.float32)


def _centroid(component: np.ndarray) -> tuple[float, float, float]:
    """(area in pixels, centroid x, centroid y in relative units) of a weight blob."""
    area = float(component.sum())
    res = component.shape[0]
    ys, xs = np.indices(component.shape)
    gx = float((component * (xs + 0.5)).sum()) / area / res
    gy = float((component * (ys + 0.5)).sum()) / area / res
    return area, gx, gy


def classify_shape(component: np.ndarray) -> str:
    """Forced-choice shape of a (H, W) weight blob: the candidate shape whose template,
    rendered at the blob's centroid with about the blob's area, best overlaps it (soft
    IoU = sum of minima / sum of maxima).

    Templates are tried at a few scales (``TEMPLATE_SCALES``; noise and blur bias the
    area estimate) and blurs (``TEMPLATE_BLURS``, cut at ``ALPHA_MIN`` like the blob):
    blur rounds a small square's corners until a sharp circle fits it better than a
    sharp square, but a blurred square still fits it best. Work is done in a window
    around the blob so the cost does not grow with the resolution.
    """
    if component.sum() <= 0:
        return FALLBACK_SHAPE
    res = component.shape[0]
    # Contrast normalisation: a washed-out sample (peak alpha 0.7, say) must not look
    # like a smaller shape; its typical interior weight is taken as full coverage.
    peak = float(np.percentile(component[component > 0], PEAK_PERCENTILE))
    component = np.minimum(component / peak, 1.0)
    cut = ALPHA_MIN / peak  # the blob's own threshold, in normalised units
    area, gx, gy = _centroid(component)
    rows, cols = np.nonzero(component)
    margin = int(np.ceil(3 * max(TEMPLATE_BLURS) + 0.25 * np.sqrt(area))) + 2
    wy0, wx0 = max(rows.min() - margin, 0), max(cols.min() - margin, 0)
    wy1, wx1 = min(rows.max() + margin + 1, res), min(cols.max() + margin + 1, res)
    blob = component[wy0:wy1, wx0:wx1]
    h, w = blob.shape
    best, best_iou = FALLBACK_SHAPE, -1.0
    for shape in SHAPES:
        for scale in TEMPLATE_SCALES:
            side = np.sqrt(area / _FILL[shape]) / res * scale
            # The apex-up triangle's centroid lies side/6 below its box center.
            cy = gy - side / 6 if shape == "triangle" else gy
            cov, y0, x0 = coverage(shape, gx, cy, side, res)
            sharp = np.zeros_like(blob)  # paste the template's box into the window
            ty0, tx0 = max(y0, wy0), max(x0, wx0)
            ty1, tx1 = min(y0 + cov.shape[0], wy1), min(x0 + cov.shape[1], wx1)
            if ty1 > ty0 and tx1 > tx0:
                sharp[ty0 - wy0:ty1 - wy0, tx0 - wx0:tx1 - wx0] = \
                    cov[ty0 - y0:ty1 - y0, tx0 - x0:tx1 - x0]
            for sigma in TEMPLATE_BLURS:
                template = sharp
                if sigma > 0:
                    template = _blur_matrix(h, sigma) @ sharp @ _blur_matrix(w, sigma).T
                    template = np.where(template >= cut, template, 0.0)
                union = float(np.maximum(blob, template).sum())
                iou = float(np.minimum(blob, template).sum()) / union if union > 0 else 0.0
                if iou > best_iou:
                    best, best_iou = shape, iou
    return best


def classify_position(component: np.ndarray) -> str:
    """Forced-choice position: the region anchor nearest to the blob's centroid."""
    if component.sum() <= 0:
        return FALLBACK_POSITION
    _, gx, gy = _centroid(component)
    return min(POSITIONS, key=lambda p: (ANCHORS[p][0] - gx) ** 2 + (ANCHORS[p][1] - gy) ** 2)


def judge_image(image: np.ndarray, scene: Scene) -> list[ObjectJudgement]:
    """Judge one (H, W, 3) uint8 image against its scene, one verdict per object."""
    label, weight = classify_pixels(image)
    mass = np.bincount(label.ravel(), weights=weight.ravel(), minlength=len(COLORS))
    k = len(scene.objects)
    top_k = set(np.argsort(-mass, kind="stable")[:k].tolist())  # ties: palette order
    verdicts = []
    for obj in scene.objects:
        c = _COLOR_INDEX[obj.color]
        blob = largest_component(np.where(label == c, weight, 0.0))
        verdicts.append(ObjectJudgement(c in top_k, classify_shape(blob),
                                        classify_position(blob)))
    return verdicts


def score_images(images: torch.Tensor, scenes: Sequence[Scene]) -> ShapesScore:
    """Score generated images (B, 3, H, W; uint8 or float in [-1, 1]) against the scenes
    they were generated for."""
    arrays = to_uint8(images)
    if len(arrays) != len(scenes):
        raise ValueError(f"{len(arrays)} images for {len(scenes)} scenes")
    if arrays.shape[1] != arrays.shape[2]:
        raise ValueError("images must be square")
    hits = np.zeros(3)
    n_obj = n_all = 0
    for image, scene in zip(arrays, scenes):
        scene_ok = True
        for obj, v in zip(scene.objects, judge_image(image, scene)):
            right = (v.color_ok, v.shape == obj.shape, v.position == obj.position)
            hits += right
            scene_ok &= all(right)
            n_obj += 1
        n_all += scene_ok
    if n_obj == 0:
        raise ValueError("no objects to score")
    return ShapesScore(color=hits[0] / n_obj, shape=hits[1] / n_obj, position=hits[2] / n_obj,
                       all_correct=n_all / len(scenes), count=n_obj)


def chance_score(scenes: Sequence[Scene], resolution: int, seed: int) -> ShapesScore:
    """Empirical chance level: ground-truth renders scored against a random derangement
    of the same scenes (every image shows another prompt's scene)."""
    n = len(scenes)
    if n < 2:
        raise ValueError("need at least 2 scenes to derange")
    order = np.random.default_rng(seed).permutation(n)
    source = np.empty(n, np.int64)
    source[order] = np.roll(order, -1)  # one cycle through a random order: no fixed point
    images = np.stack([render_scene(scenes[j], resolution) for j in source])
    return score_images(torch.from_numpy(images), scenes)
