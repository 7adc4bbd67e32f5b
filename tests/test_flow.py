"""x-prediction flow matching: timesteps, noising, the loss, sigmas and the Euler sampler."""

import pytest
import torch

from prx.config import FlowConfig
from prx.recipe.flow import (
    euler_sample,
    flow_loss,
    guided,
    loss_sums_by_t_bin,
    sample_timesteps,
    sampling_sigmas,
    t_bin_index,
)


def test_loss_equals_the_velocity_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, 12, generator=g)
    x_hat = torch.randn(6, 10, 12, generator=g)
    eps = torch.randn(6, 10, 12, generator=g)
    t = torch.tensor([0.001, 0.02, 0.05, 0.3, 0.7, 0.999])
    x_t = (1 - t[:, None, None]) * x + t[:, None, None] * eps
    denom = torch.maximum(t, torch.tensor(0.05))[:, None, None]
    v_hat = (x_t - x_hat) / denom
    v = (x_t - x) / denom
    expected_per_sample = ((v_hat - v) ** 2).mean(dim=(1, 2))
    loss, per_sample = flow_loss(x_hat, x, t)
    torch.testing.assert_close(per_sample, expected_per_sample, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, expected_per_sample.mean(), rtol=1e-5, atol=1e-6)


def test_timestep_statistics_shift3_with_10pct_uniform():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(1_000_000, FlowConfig(timestep_shift=3.0, uniform_fraction=0.1), g)
    assert t.mean().item() == pytest.approx(0.692, abs=0.003)
    assert t.median().item() == pytest.approx(0.737, abs=0.003)
    assert (t > 0.9).float().mean().item() == pytest.approx(0.132, abs=0.003)
    assert t.min() >= 1e-3 and t.max() < 1.0


def test_timesteps_are_reproducible():
    a = sample_timesteps(8, FlowConfig(), torch.Generator().manual_seed(3))
    b = sample_timesteps(8, FlowConfig(), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_sigmas_for_50_steps():
    s = sampling_sigmas(50, 3.0)
    assert len(s) == 51
    assert s[0].item() == 1.0 and s[-1].item() == 0.0
    assert s[1].item() == pytest.approx(0.9932, abs=1e-4)
    assert s[-3].item() == pytest.approx(0.1111, abs=1e-4)
    assert s[-2].item() == pytest.approx(0.0577, abs=1e-4)
    assert torch.all(s[1:] < s[:-1])


def test_euler_with_a_perfect_denoiser_lands_on_the_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 6, generator=g)
    eps = torch.randn(3, 4, 6, generator=g)
    # For a single data point the exact x-prediction is x itself; the ODE is then a straight
    # line and Euler is exact: at every sigma the state equals (1 - sigma) x + sigma eps.
    seen = []

    def oracle(x_t, sigma):
        seen.append((x_t, sigma[0].item()))
        return x

    out = euler_sample(oracle, eps, steps=10, shift=3.0)
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)
    for x_t, sigma in seen:
        torch.testing.assert_close(x_t, (1 - sigma) * x + sigma * eps, rtol=1e-5, atol=1e-5)


def test_guidance_formula():
    cond, uncond = torch.tensor([2.0]), torch.tensor([1.0])
    assert guided(cond, uncond, 3.5).item() == pytest.approx(1.0 + 3.5 * 1.0)
    assert guided(cond, uncond, 1.0).item() == 2.0


def test_loss_bins():
    t = torch.tensor([0.0, 0.29, 0.3, 0.59, 0.6, 1.0])
    assert t_bin_index(t).tolist() == [0, 0, 1, 1, 2, 2]
    sums, counts = loss_sums_by_t_bin(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), t)
    assert sums.tolist() == [3.0, 7.0, 11.0] and counts.tolist() == [2.0, 2.0, 2.0]
