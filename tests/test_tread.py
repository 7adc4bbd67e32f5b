"""TREAD routing in the model, its reproducible selection, and self-guided sampling."""

import dataclasses

import pytest
import torch

from prx.config import ModelConfig, TreadConfig, preset
from prx.eval.sampling import generate
from prx.model.denoiser import PRX, KeyPadding
from prx.model.tread import TokenRoute, kept_count, plan_route, route_seeds, self_guided

CFG = ModelConfig(patch_size=4, bottleneck_dim=16, hidden_dim=64, depth=4, num_heads=4, text_dim=24,
                  time_embed_dim=32, attention="math")  # the hand computation below uses "math" too
GRID = (3, 5)  # 15 tokens: odd, non-square
ON = TreadConfig(enabled=True, probability=0.5, route_start=1, route_end=2)


def random_model(seed=0):
    torch.manual_seed(seed)
    model = PRX(CFG)
    for p in model.parameters():  # zero-init modulations would make every block the identity
        torch.nn.init.normal_(p, std=0.1)
    return model


def inputs(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 6, dtype=torch.bool)
    mask[0, 4:] = False
    return (torch.randn(batch, GRID[0] * GRID[1], CFG.patch_dim, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, 6, CFG.text_dim, generator=g), mask)


def test_probability_zero_equals_dense():
    model, (x, t, text, mask) = random_model(), inputs()
    route = plan_route(dataclasses.replace(ON, probability=0.0), CFG.depth, 15, route_seeds(0, 0, [0, 1, 2], "cpu"))
    assert route.keep_idx.shape == (3, 15)
    dense = model(x, t, text, mask, GRID).x_hat
    torch.testing.assert_close(model(x, t, text, mask, GRID, route=route).x_hat, dense, rtol=1e-6, atol=1e-6)


def test_routed_tokens_skip_the_span_unchanged_and_kept_tokens_keep_their_positions():
    model, (x, t, text, mask) = random_model(), inputs()
    route = plan_route(ON, CFG.depth, 15, route_seeds(0, 7, [4, 5, 6], "cpu"))
    k = kept_count(15, 0.5)
    assert route.keep_idx.shape == (3, k) and k == 7
    seen = {}

    def record(name):
        def hook(module, args, output=None):  # returns None: nothing is replaced
            seen[name] = (args[0] if output is None else output).clone()
        return hook

    model.blocks[route.start - 1].register_forward_hook(record("full_before"))  # all tokens
    model.blocks[route.start].register_forward_pre_hook(record("before"))  # the kept tokens only
    model.blocks[route.end + 1].register_forward_pre_hook(record("after"))  # all tokens, rejoined
    out = model(x, t, text, mask, GRID, route=route).x_hat
    routed = torch.ones(3, 15, dtype=torch.bool)
    routed[torch.arange(3)[:, None], route.keep_idx] = False
    full_before = seen["full_before"]
    assert torch.equal(seen["after"][routed], full_before[routed])  # bit-identical
    assert torch.equal(seen["before"], full_before[torch.arange(3)[:, None], route.keep_idx])

    # Independent computation of the span with plain indexing and the kept tokens' own positions.
    img = _dense_state_before(model, x, t, text, mask, route.start)
    idx = route.keep_idx
    cos, sin = model.rope_tables(*GRID, x.device)
    cos_k, sin_k = cos[0][idx], sin[0][idx]
    kept = img[torch.arange(3)[:, None], idx]
    cond = torch.nn.functional.silu(model.time_in(t))
    txt = model.txt_in(text)
    pad = KeyPadding.build(mask, idx.shape[1], "math")
    for i in range(route.start, route.end + 1):
        kept = model.blocks[i](kept, txt, cond, cos_k, sin_k, pad)
    img = img.clone()
    img[torch.arange(3)[:, None], idx] = kept
    pad = KeyPadding.build(mask, 15, "math")
    for i in range(route.end + 1, CFG.depth):
        img = model.blocks[i](img, txt, cond, cos, sin, pad)
    torch.testing.assert_close(out, model.final(img, cond), rtol=1e-5, atol=1e-5)


def _dense_state_before(model, x, t, text, mask, block_index):
    cond = torch.nn.functional.silu(model.time_in(t))
    txt, img = model.txt_in(text), model.img_in(x)
    cos, sin = model.rope_tables(*GRID, x.device)
    pad = KeyPadding.build(mask, img.shape[1], "math")
    for i in range(block_index):
        img = model.blocks[i](img, txt, cond, cos, sin, pad)
    return img


def test_capture_returns_the_kept_tokens_inside_the_span():
    model, (x, t, text, mask) = random_model(), inputs()
    route = plan_route(ON, CFG.depth, 15, route_seeds(0, 0, [0, 1, 2], "cpu"))
    out, hidden = model(x, t, text, mask, GRID, route=route, capture=1)
    assert hidden.shape == (3, route.keep_idx.shape[1], CFG.hidden_dim)
    _, dense_hidden = model(x, t, text, mask, GRID, capture=3)
    assert dense_hidden.shape == (3, 15, CFG.hidden_dim)
    uncaptured = model(x, t, text, mask, GRID, route=route)
    assert type(uncaptured) is type(model(x, t, text, mask, GRID, capture=1)) and uncaptured.captured is None
    torch.testing.assert_close(out, uncaptured.x_hat)


def test_selection_is_keyed_by_seed_step_and_slot():
    a = plan_route(ON, CFG.depth, 77, route_seeds(3, 10, [0, 1, 2, 3], "cpu")).keep_idx
    b = plan_route(ON, CFG.depth, 77, route_seeds(3, 10, [0, 1, 2, 3], "cpu")).keep_idx
    alone = plan_route(ON, CFG.depth, 77, route_seeds(3, 10, [2], "cpu")).keep_idx
    later = plan_route(ON, CFG.depth, 77, route_seeds(3, 11, [0, 1, 2, 3], "cpu")).keep_idx
    assert torch.equal(a, b) and torch.equal(a[2:3], alone)
    assert not torch.equal(a, later) and not torch.equal(a[0], a[1])
    assert torch.all(a[:, 1:] > a[:, :-1])  # ascending: positions stay sorted
    assert plan_route(TreadConfig(enabled=False), CFG.depth, 77, route_seeds(3, 10, [0], "cpu")) is None


def test_spans():
    assert TreadConfig().blocks(16) == (2, 12)
    assert TreadConfig(span="penultimate").blocks(16) == (1, 14)
    assert kept_count(256, 0.5) == 128 and kept_count(77, 0.5) == 39 and kept_count(3, 1.0) == 1


def test_self_guidance_weight_one_is_the_dense_prediction():
    routed, dense = torch.randn(2, 5), torch.randn(2, 5)
    torch.testing.assert_close(self_guided(routed, dense, 1.0), dense)
    torch.testing.assert_close(self_guided(routed, dense, 0.0), routed)


class FakeTower:
    """Deterministic caption embeddings without a text encoder."""

    cfg = preset("tiny").text

    def encode(self, captions):
        return [torch.full((3, CFG.text_dim), float(len(c))) for c in captions]

    def empty(self):
        return torch.zeros(1, CFG.text_dim)


@pytest.mark.parametrize("weight", [1.0, 2.0])
def test_self_guided_sampling(weight):
    """w = 1 samples exactly what the dense model samples without guidance; w = 2 differs."""
    model = random_model()
    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, model=CFG, data=dataclasses.replace(cfg.data, resolution=12),
                              tread=dataclasses.replace(ON, self_guidance=weight))
    captions = ["a red circle", "two blue squares"]
    guided = generate(model, FakeTower(), captions, cfg, steps=4, guidance=3.0)
    plain = generate(model, FakeTower(), captions, dataclasses.replace(cfg, tread=TreadConfig()), steps=4,
                     guidance=1.0)
    if weight == 1.0:
        torch.testing.assert_close(guided, plain, rtol=1e-5, atol=1e-5)
    else:
        assert (guided - plain).abs().max() > 1e-3


def test_route_object_round_trip():
    x = torch.randn(2, 9, 4)
    route = TokenRoute(torch.tensor([[0, 4, 8], [1, 2, 3]]), 0, 0)
    kept = route.gather(x)
    assert torch.equal(kept[1], x[1, 1:4])
    assert torch.equal(route.scatter(kept, x), x)
