"""Tests for the procedural shapes dataset and its prompt-following scorer."""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prx.data.shapes import (
    ANCHORS,
    COLORS,
    PAIR_GAP,
    POSITION_PHRASES,
    POSITION_WORDS,
    POSITIONS,
    SHAPE_WORDS,
    SHAPES,
    SIZE_WORDS,
    Scene,
    ShapesBatches,
    ShapesDataset,
    collate,
    coverage,
    eval_scenes,
    make_scene,
    render_scene,
)
from prx.eval.shapes_score import ShapesScore, chance_score, score_images

N_STATS = 2000  # training scenes for frequency checks: ~2800 objects, ~400 per color
BALANCE_SIGMAS = 4.5  # per-item count tolerance: a real bias (e.g. +25 %) is ~5 std here
N_EVAL = 300  # eval scenes for scorer checks: ~420 objects, chance-level std ~0.02
GT_MIN = 0.97  # clean renders must be read (almost) perfectly
DEGRADED_MIN = 0.90  # renders with generator-like blur and noise
NOISE_STD = 0.1  # Gaussian noise in [-1, 1] units added to degraded renders
CHANCE_TOL = 0.12  # |noise accuracy - uniform chance|: ~6 std of a 420-object mean
MIN_TEMPLATES = 20  # distinct caption skeletons required over 500 scenes
MAX_CAPTION_WORDS = 20
RENDER_MS_MAX = 1.0  # per 32 px image; measured ~0.05 ms, generous for loaded CI


def uniform_chance(scenes: list[Scene]) -> dict[str, float]:
    """Accuracies expected from uniform random guessing on these scenes.

    color: k/#colors per object (top-k rule); shape: 1/#shapes; position: 1/#positions;
    all_correct: per scene, the chance that all k named colors are the guessed top k
    (1 / C(#colors, k)) times independent shape and position guesses per object.
    """
    n_colors, n_shapes, n_pos = len(COLORS), len(SHAPES), len(POSITIONS)
    color_hits = sum(len(s.objects) ** 2 / n_colors for s in scenes)  # k objects, k/N each
    n_obj = sum(len(s.objects) for s in scenes)
    all_ok = sum(
        1 / float(np.prod([(n_colors - i) / (i + 1) for i in range(len(s.objects))]))
        / (n_shapes * n_pos) ** len(s.objects) for s in scenes)
    return {"color": color_hits / n_obj, "shape": 1 / n_shapes, "position": 1 / n_pos,
            "all_correct": all_ok / len(scenes)}


@pytest.fixture(scope="module")
def train_scenes() -> list[Scene]:
    return [make_scene(0, i) for i in range(N_STATS)]


@pytest.fixture(scope="module")
def eval_set() -> list[Scene]:
    return eval_scenes(0, N_EVAL)


def _renders(scenes: list[Scene], resolution: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([render_scene(s, resolution) for s in scenes]))


def _degrade(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Float [-1, 1] images with a 3x3 binomial blur (~0.7 px std) and Gaussian noise."""
    x = images.float() / 127.5 - 1
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3)
    g = torch.Generator().manual_seed(seed)
    return (x + NOISE_STD * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def _attrs(score: ShapesScore) -> dict[str, float]:
    return {"color": score.color, "shape": score.shape, "position": score.position}


# --- dataset ------------------------------------------------------------------------


def test_deterministic_per_seed_and_index() -> None:
    for i in range(30):
        a, b = make_scene(7, i), make_scene(7, i)
        assert a == b
        assert render_scene(a, 32).tobytes() == render_scene(b, 32).tobytes()
    captions = {make_scene(7, i).caption for i in range(200)}
    assert len(captions) >= 190  # different indices give different scenes
    differ = sum(make_scene(7, i) != make_scene(8, i) for i in range(50))
    assert differ == 50
    assert eval_scenes(3, 20) == eval_scenes(3, 20)
    assert eval_scenes(3, 20) != eval_scenes(4, 20)


def test_dataset_items() -> None:
    ds = ShapesDataset(seed=1, resolution=32, length=10)
    assert len(ds) == 10
    img, caption, scene = ds[3]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)
    assert caption == scene.caption == make_scene(1, 3).caption
    assert torch.equal(img, torch.from_numpy(render_scene(make_scene(1, 3), 32)))
    with pytest.raises(IndexError):
        ds[10]
    images, captions, scenes = collate([ds[0], ds[1]])
    assert images.shape == (2, 3, 32, 32) and captions == [s.caption for s in scenes]
    for res in (64, 128, 256):
        img = render_scene(make_scene(1, 0), res)
        assert img.shape == (3, res, res) and img.dtype == np.uint8
        assert (img != 255).any()  # something was drawn


@pytest.mark.parametrize("keep", [True, False])
def test_batches_keep_renders(keep: bool, monkeypatch) -> None:
    """Kept renders (a set that fits in KEEP_BYTES) give the batches of rendering every time,
    across epochs; a set over the limit keeps nothing."""
    if not keep:
        monkeypatch.setattr(ShapesBatches, "KEEP_BYTES", 10 * 3 * 16 * 16 - 1)
    source = ShapesBatches(seed=4, resolution=16, length=10, batch_size=4, device=torch.device("cpu"))
    dataset = ShapesDataset(seed=4, resolution=16, length=10)
    for _ in range(8):  # 32 samples: three passes over the 10 scenes
        batch = source.next_batch()
        images, captions, _ = collate([dataset[i] for i in batch.ids])
        assert torch.equal(batch.images, images) and batch.captions == captions
    assert (source.rendered is not None) == keep
    assert source.rendered is None or sorted(source.rendered) == list(range(10))


def test_render_is_fast() -> None:
    scenes = [make_scene(2, i) for i in range(300)]
    start = time.perf_counter()
    for s in scenes:
        render_scene(s, 32)
    per_image_ms = (time.perf_counter() - start) / len(scenes) * 1000
    assert per_image_ms < RENDER_MS_MAX, per_image_ms


def test_captions_name_every_object(train_scenes: list[Scene]) -> None:
    for scene in train_scenes[:1000]:
        text = scene.caption.lower()
        tokens = set(re.findall(r"[a-z]+", text))
        assert len(text.split()) <= MAX_CAPTION_WORDS, scene.caption
        present = {o.position for o in scene.objects}
        for obj in scene.objects:
            assert obj.color in tokens, scene.caption
            assert tokens & set(SHAPE_WORDS[obj.shape]), scene.caption
            assert any(w in text for w in POSITION_WORDS[obj.position]), scene.caption
        # Nothing in the caption may point at an attribute the scene does not have.
        for color in set(COLORS) - {o.color for o in scene.objects}:
            assert color not in tokens, scene.caption
        for shape in set(SHAPES) - {o.shape for o in scene.objects}:
            assert not tokens & set(SHAPE_WORDS[shape]), scene.caption
        for pos in set(POSITIONS) - present:
            assert not any(w in text for w in POSITION_WORDS[pos]), scene.caption


def test_caption_variety(train_scenes: list[Scene]) -> None:
    vocab = [*COLORS, *(w for ws in SHAPE_WORDS.values() for w in ws),
             *(w for ws in SIZE_WORDS.values() for w in ws)]
    phrases = sorted((p for ps in POSITION_PHRASES.values() for p in ps), key=len, reverse=True)
    skeletons = set()
    for scene in train_scenes[:500]:
        text = scene.caption.lower()
        for p in phrases:  # longest first, so "on the left side" is not cut to "... side"
            text = text.replace(p, "<pos>")
        text = re.sub(r"\b(" + "|".join(vocab) + r")\b", "<w>", text)
        text = re.sub(r"\b(a|an)\b", "<art>", text)
        skeletons.add(re.sub(r"(<w> )+<w>", "<obj>", text))
    assert len(skeletons) > MIN_TEMPLATES, sorted(skeletons)


def test_balanced_statistics(train_scenes: list[Scene]) -> None:
    two = sum(len(s.objects) == 2 for s in train_scenes) / len(train_scenes)
    assert 0.36 <= two <= 0.44, two
    objects = [o for s in train_scenes for o in s.objects]
    for field, vocab in (("color", COLORS), ("shape", SHAPES), ("position", POSITIONS)):
        counts = Counter(getattr(o, field) for o in objects)
        assert set(counts) == set(vocab)
        expected = len(objects) / len(vocab)
        tol = BALANCE_SIGMAS * np.sqrt(expected * (1 - 1 / len(vocab)))  # binomial std
        for name, n in counts.items():
            assert abs(n - expected) < tol, (field, name, n, expected)
    sizes = Counter(o.size_name for o in objects)
    assert min(sizes.values()) > 0.3 * len(objects), sizes


def test_geometry(train_scenes: list[Scene]) -> None:
    for scene in train_scenes:
        for o in scene.objects:
            half = o.size / 2
            assert half < o.cx < 1 - half and half < o.cy < 1 - half, o
            nearest = min(POSITIONS, key=lambda p: np.hypot(ANCHORS[p][0] - o.cx,
                                                            ANCHORS[p][1] - o.cy))
            assert nearest == o.position, o
        if len(scene.objects) == 2:
            a, b = scene.objects
            assert a.color != b.color and a.position != b.position
            reach = (a.size + b.size) / 2 + PAIR_GAP - 1e-9
            assert abs(a.cx - b.cx) >= reach or abs(a.cy - b.cy) >= reach, scene
    # Pixel check: the two coverages never share a pixel, even at 32 px.
    for scene in [s for s in train_scenes if len(s.objects) == 2][:200]:
        masks = []
        for o in scene.objects:
            cov, y0, x0 = coverage(o.shape, o.cx, o.cy, o.size, 32)
            m = np.zeros((32, 32), bool)
            m[y0:y0 + cov.shape[0], x0:x0 + cov.shape[1]] = cov > 0
            masks.append(m)
        assert not (masks[0] & masks[1]).any(), scene


def test_eval_scenes_balanced(eval_set: list[Scene]) -> None:
    assert len(eval_set) == N_EVAL
    assert sum(len(s.objects) == 2 for s in eval_set) == N_EVAL * 2 // 5
    objects = [o for s in eval_set for o in s.objects]
    for field, vocab in (("color", COLORS), ("shape", SHAPES), ("position", POSITIONS)):
        counts = Counter(getattr(o, field) for o in objects)
        assert set(counts) == set(vocab)
        assert max(counts.values()) - min(counts.values()) <= 2, (field, counts)
    for s in eval_set:
        if len(s.objects) == 2:
            assert s.objects[0].color != s.objects[1].color
            assert s.objects[0].position != s.objects[1].position
    train_captions = {make_scene(0, i).caption for i in range(N_EVAL)}
    assert sum(s.caption in train_captions for s in eval_set) < N_EVAL // 4


# --- scorer -------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [32, 64])
def test_score_ground_truth(eval_set: list[Scene], resolution: int) -> None:
    images = _renders(eval_set, resolution)
    score = score_images(images, eval_set)
    assert score.count == sum(len(s.objects) for s in eval_set)
    assert min(_attrs(score).values()) >= GT_MIN, score.format()
    assert score.all_correct >= GT_MIN - 0.03, score.format()
    degraded = score_images(_degrade(images), eval_set)
    assert min(_attrs(degraded).values()) >= DEGRADED_MIN, degraded.format()
    # Washed out (70 % contrast) with a per-image color cast of up to +-25 levels.
    g = torch.Generator().manual_seed(1)
    cast = 25 * (2 * torch.rand(len(images), 3, 1, 1, generator=g) - 1)
    washed = (255 - 0.7 * (255 - images.float()) + cast).clamp(0, 255).round()
    washed_score = score_images(washed.to(torch.uint8), eval_set)
    assert min(_attrs(washed_score).values()) >= DEGRADED_MIN, washed_score.format()


def test_float_and_uint8_agree(eval_set: list[Scene]) -> None:
    images = _renders(eval_set[:100], 32)
    a = score_images(images, eval_set[:100])
    b = score_images(images.float() / 127.5 - 1, eval_set[:100])
    assert a == b
    noisy = _degrade(images, seed=3)
    quantised = ((noisy + 1) * 127.5).round().to(torch.uint8)
    assert score_images(noisy, eval_set[:100]) == score_images(quantised, eval_set[:100])


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
def test_noise_scores_chance(eval_set: list[Scene], kind: str) -> None:
    g = torch.Generator().manual_seed(5)
    shape = (len(eval_set), 3, 32, 32)
    if kind == "uniform":
        images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    else:
        images = torch.randn(shape, generator=g).clamp(-1, 1)
    score = score_images(images, eval_set)
    chance = uniform_chance(eval_set)
    for name, value in _attrs(score).items():
        assert abs(value - chance[name]) <= CHANCE_TOL, (name, score.format(), chance)
    assert score.all_correct < 0.05


def test_chance_score(eval_set: list[Scene]) -> None:
    chance = uniform_chance(eval_set)
    assert chance["shape"] == pytest.approx(1 / len(SHAPES))
    assert chance["position"] == pytest.approx(1 / len(POSITIONS))
    assert 1 / len(COLORS) < chance["color"] < 2 / len(COLORS)
    empirical = chance_score(eval_set, 32, seed=0)
    truth = score_images(_renders(eval_set, 32), eval_set)
    for name, value in _attrs(empirical).items():
        assert abs(value - chance[name]) <= CHANCE_TOL, (name, empirical.format(), chance)
        assert getattr(truth, name) - value >= 0.5
    assert empirical.as_dict()["count"] == truth.count


def test_each_attribute_is_judged_on_its_own(eval_set: list[Scene]) -> None:
    """Breaking one attribute of the drawn image must hit that accuracy only."""
    singles = [s for s in eval_set if len(s.objects) == 1]

    def drawn(change: str) -> torch.Tensor:
        out = []
        for s in singles:
            o = s.objects[0]
            if change == "shape":
                o = replace(o, shape=SHAPES[(SHAPES.index(o.shape) + 1) % len(SHAPES)])
            elif change == "position":
                p = POSITIONS[(POSITIONS.index(o.position) + 1) % len(POSITIONS)]
                o = replace(o, position=p, cx=ANCHORS[p][0], cy=ANCHORS[p][1])
            else:
                names = list(COLORS)
                o = replace(o, color=names[(names.index(o.color) + 1) % len(names)])
            out.append(render_scene(Scene((o,), s.caption), 32))
        return torch.from_numpy(np.stack(out))

    wrong_shape = score_images(drawn("shape"), singles)
    assert wrong_shape.shape < 0.05 and wrong_shape.color > 0.97
    assert wrong_shape.position > 0.97
    wrong_pos = score_images(drawn("position"), singles)
    assert wrong_pos.position < 0.05 and wrong_pos.color > 0.97 and wrong_pos.shape > 0.97
    wrong_color = score_images(drawn("color"), singles)
    assert wrong_color.color < 0.05 and wrong_color.all_correct < 0.05


def test_score_api(eval_set: list[Scene]) -> None:
    score = score_images(_renders(eval_set[:5], 32), eval_set[:5])
    assert set(score.as_dict()) == {"color", "shape", "position", "all_correct", "count"}
    assert "color" in score.format() and "\n" not in score.format()
    with pytest.raises(ValueError):
        score_images(_renders(eval_set[:5], 32), eval_set[:4])
