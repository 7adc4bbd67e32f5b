"""The PRX denoiser: sizes, zero init, text padding, RoPE, attention backends."""

import dataclasses
import math

import pytest
import torch

from prx.config import ModelConfig, prx_small_512, prx_small_1024, tiny
from prx.model.attention import KeyPadding, apply_rope, attention, grid_positions, rope_angles
from prx.model.denoiser import PRX, count_parameters

SMALL = ModelConfig(patch_size=4, bottleneck_dim=16, hidden_dim=64, depth=2, num_heads=4,
                    mlp_ratio=3.5, text_dim=24, time_embed_dim=32)


def expected_parameters(c: ModelConfig) -> int:
    """docs/recipe.md section 1 counted by hand: weights + biases of every linear, norm scales."""
    h, p, m, d = c.hidden_dim, c.patch_dim, c.mlp_hidden_dim, c.head_dim
    embed = (p * c.bottleneck_dim + c.bottleneck_dim) + (c.bottleneck_dim * h + h)
    time = (c.time_embed_dim * h + h) + (h * h + h)
    text = c.text_dim * h + h
    block = 3 * h * h + h * h + 2 * h * h + 3 * d + 3 * h * m + (h * 6 * h + 6 * h)
    final = (h * 2 * h + 2 * h) + (h * p + p)
    resolution = (256 * h + h) + (h * h + h) if c.resolution_embeds else 0  # 128 + 128 sinusoid -> h -> h
    return embed + time + text + c.depth * block + final + resolution


@pytest.mark.parametrize("make", [prx_small_512, prx_small_1024])
def test_prx_small_has_the_published_parameter_count(make):
    with torch.device("meta"):
        model = PRX(make().model)
    assert count_parameters(model) == 1_177_215_744
    assert expected_parameters(make().model) == 1_177_215_744


def test_other_sizes_match_the_formula():
    for cfg in (tiny().model, SMALL, dataclasses.replace(SMALL, depth=3, mlp_ratio=2.0),
                dataclasses.replace(SMALL, resolution_embeds=True)):
        with torch.device("meta"):
            assert count_parameters(PRX(cfg)) == expected_parameters(cfg)


def inputs(cfg: ModelConfig, b=3, grid=(3, 5), t_len=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, grid[0] * grid[1], cfg.patch_dim, generator=g)
    t = torch.rand(b, generator=g)
    text = torch.randn(b, t_len, cfg.text_dim, generator=g)
    return x, t, text


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1])
    return model


def test_zero_init_predicts_zero():
    model = PRX(SMALL)
    x, t, text = inputs(SMALL)
    out = model(x, t, text, None, (3, 5)).x_hat
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0
    # ...and every block starts as the identity: its gates are zero
    assert all(torch.count_nonzero(b.modulation.weight) == 0 for b in model.blocks)


def test_padded_text_equals_truncated_text():
    model = randomize(PRX(SMALL))
    x, t, text = inputs(SMALL, t_len=9)
    lengths = [9, 4, 1]
    mask = torch.arange(9)[None] < torch.tensor(lengths)[:, None]
    garbage = torch.where(mask[..., None], text, 1e3 * torch.randn_like(text))
    batched = model(x, t, garbage, mask, (3, 5)).x_hat
    for i, n in enumerate(lengths):
        alone = model(x[i:i + 1], t[i:i + 1], text[i:i + 1, :n], None, (3, 5)).x_hat
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-5, atol=1e-5)
    # the mask matters: without it the garbage changes the output
    assert not torch.allclose(model(x, t, garbage, None, (3, 5)).x_hat, batched, atol=1e-3)


def test_grid_must_match_tokens():
    model = PRX(SMALL)
    x, t, text = inputs(SMALL)
    with pytest.raises(ValueError, match="do not fill"):
        model(x, t, text, None, (4, 4))


def test_positions_are_row_major():
    pos = grid_positions(2, 3)
    assert pos.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


def test_rope_rotates_adjacent_pairs_rows_then_columns():
    d = 16
    angles = rope_angles(torch.tensor([[2.0, 5.0]], dtype=torch.float64), d, 10000.0)
    k = torch.arange(4, dtype=torch.float64)
    freqs = 10000.0 ** (-2 * k / 8)  # 1 / 10000^(2k / (d/2))
    torch.testing.assert_close(angles[0], torch.cat([2 * freqs, 5 * freqs]))
    x = torch.randn(1, 1, 1, d, dtype=torch.float64)
    out = apply_rope(x, angles.cos()[None, :, None], angles.sin()[None, :, None])
    z = torch.view_as_complex(x.reshape(1, 1, 1, d // 2, 2).contiguous()) * torch.polar(torch.ones_like(angles), angles)
    torch.testing.assert_close(out, torch.view_as_real(z).reshape(1, 1, 1, d))


def test_rope_scores_depend_on_relative_position_only():
    d = 16
    q, k = torch.randn(2, d, dtype=torch.float64)

    def score(pq, pk):
        aq = rope_angles(torch.tensor([pq], dtype=torch.float64), d, 10000.0)
        ak = rope_angles(torch.tensor([pk], dtype=torch.float64), d, 10000.0)
        rq = apply_rope(q.view(1, 1, 1, d), aq.cos()[:, None, None], aq.sin()[:, None, None])
        rk = apply_rope(k.view(1, 1, 1, d), ak.cos()[:, None, None], ak.sin()[:, None, None])
        return (rq * rk).sum()

    torch.testing.assert_close(score((1.0, 2.0), (3.0, 7.0)), score((5.0, 0.0), (7.0, 5.0)))
    assert not torch.isclose(score((1.0, 2.0), (3.0, 7.0)), score((1.0, 2.0), (7.0, 3.0)))


def test_sdpa_equals_math_attention_with_padding():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 3, 8, generator=g)
    k = torch.randn(2, 9, 3, 8, generator=g)
    v = torch.randn(2, 9, 3, 8, generator=g)
    text_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    out_sdpa = attention(q, k, v, KeyPadding.build(text_mask, 5, "sdpa"))
    out_math = attention(q, k, v, KeyPadding.build(text_mask, 5, "math"))
    torch.testing.assert_close(out_sdpa, out_math, rtol=1e-5, atol=1e-5)
    # padded keys are ignored: changing them changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[0, 2:4], v2[0, 2:4] = 100.0, -100.0
    torch.testing.assert_close(attention(q, k2, v2, KeyPadding.build(text_mask, 5, "sdpa")), out_sdpa)


def test_key_padding_is_built_once_as_a_broadcast_mask():
    pad = KeyPadding.build(torch.ones(4, 6, dtype=torch.bool), 10, "sdpa")
    assert pad.sdpa_mask.shape == (4, 1, 1, 16)  # never (B, heads, L, L)
    assert KeyPadding.build(None, 10, "sdpa").sdpa_mask is None


@pytest.mark.parametrize("resolution_embeds", [False, True])
def test_gradients_reach_every_parameter(resolution_embeds):
    model = randomize(PRX(dataclasses.replace(SMALL, resolution_embeds=resolution_embeds)))
    x, t, text = inputs(SMALL)
    model(x, t, text, None, (3, 5)).x_hat.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_resolution_embeds_tell_the_blocks_the_image_size():
    """The conditioning vector: the timestep's alone without the option; with it, plus an MLP of
    sinusoids of the size in pixels, rows first (as diffusers' PRXResolutionEmbedder)."""
    from prx.model.denoiser import sinusoid

    _, t, _ = inputs(SMALL)
    plain = randomize(PRX(SMALL))
    for grid in ((3, 5), (5, 3)):
        torch.testing.assert_close(plain.conditioning(t, grid), plain.time_in(t), rtol=0, atol=0)
    model = randomize(PRX(dataclasses.replace(SMALL, resolution_embeds=True)))
    wave = torch.cat([sinusoid(torch.tensor([12.0]), 128), sinusoid(torch.tensor([20.0]), 128)], dim=-1)
    expected = model.resolution_in.fc2(torch.nn.functional.silu(model.resolution_in.fc1(wave)))
    torch.testing.assert_close(model.conditioning(t, (3, 5)), model.time_in(t) + expected)  # patch 4: 12 x 20 px
    assert (model.conditioning(t, (3, 5)) - model.conditioning(t, (5, 3))).abs().max() > 1e-3


def test_flop_count_matches_the_recipe():
    from prx.model.denoiser import training_flops_per_image

    flops = training_flops_per_image(prx_small_1024().model, image_tokens=1024, text_tokens=256)
    assert flops / 1e12 == pytest.approx(5.23, abs=0.01)
