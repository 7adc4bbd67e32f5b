"""Batched Newton-Schulz kernels against an fp64 evaluation of the same polynomial iteration.

On the CPU the kernels run under the Triton interpreter in fp32; on a GPU (marked `gpu`) in
bf16 at the PRX small shapes.
"""

import pytest
import torch

from kernels import muon as ns
from kernels.ref import newton_schulz as reference
from prx.optim import JORDAN, NewtonSchulzSchedule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
JORDAN_5 = [JORDAN] * 5


def random_bank(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)


@pytest.mark.parametrize("shape", [(3, 45, 77), (2, 33, 33), (1, 70, 20)])
def test_symmetric_product_matches_fp64_and_is_exactly_symmetric(shape):
    x = random_bank(*shape)
    out = ns.launch_symmetric_product(x, alpha=0.5)
    expected = 0.5 * x.double() @ x.double().mT
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(out, out.mT)  # lower tiles are the mirrored upper tiles, bit for bit


def test_symmetric_product_with_addend_and_per_matrix_scale():
    x = random_bank(3, 40, 55, seed=1)
    a = ns.launch_symmetric_product(x)  # symmetric, as the addend must be
    scale = torch.tensor([0.5, 2.0, 0.1], device=DEVICE)
    out = ns.launch_symmetric_product(a, alpha=-1.5, c=a, beta=3.0, scale=scale)
    a64 = a.double()
    expected = -1.5 * scale.double()[:, None, None] ** 2 * (a64 @ a64) + 3.0 * a64
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("m, n", [(45, 77), (33, 33), (17, 100)])
def test_polynomial_step_matches_fp64(m, n):
    b = random_bank(2, m, m, seed=2)
    x = random_bank(2, m, n, seed=3)
    scale = torch.tensor([0.25, 3.0], device=DEVICE)
    out = ns.launch_polynomial_step(b, x, a=3.4445, multiplier=0.7, scale=scale)
    expected = 0.7 * scale.double()[:, None, None] * (3.4445 * x.double() + b.double() @ x.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("schedule", ["jordan", "polar_express"])
@pytest.mark.parametrize("shape", [(3, 45, 70), (2, 77, 40)])  # wide, and tall (runs transposed)
def test_newton_schulz_matches_fp64_iteration(schedule, shape):
    s = NewtonSchulzSchedule.named(schedule, 5)
    x = random_bank(*shape, seed=4)
    out = ns.newton_schulz(x, list(s.coefficients), s.norm_safety, s.eps)
    expected = reference(x.double(), list(s.coefficients), s.norm_safety, s.eps)
    assert out.shape == x.shape
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-5)


def scalar_composition(sigma: torch.Tensor, coefficients, norm: float) -> torch.Tensor:
    """What the iteration does to each singular value: s -> a s + b s^3 + c s^5, repeated."""
    s = sigma / norm
    for a, b, c in coefficients:
        s = a * s + b * s**3 + c * s**5
    return s


@pytest.mark.parametrize("schedule", ["jordan", "polar_express"])
def test_singular_values_follow_the_scalar_polynomial_and_land_in_the_band(schedule):
    s = NewtonSchulzSchedule.named(schedule, 5)
    x = random_bank(2, 48, 96, seed=5)
    out = ns.newton_schulz(x, list(s.coefficients), s.norm_safety, s.eps).double().cpu()
    for k in range(x.shape[0]):
        x64 = x[k].double().cpu()
        sigma = torch.linalg.svdvals(x64)
        predicted = scalar_composition(sigma, s.coefficients, torch.linalg.norm(x64).item() * s.norm_safety)
        got = torch.linalg.svdvals(out[k])
        torch.testing.assert_close(got, predicted.sort(descending=True).values, rtol=0, atol=1e-5)
        # Band: the image of [smallest normalised singular value, 1] under the composed
        # polynomial, on a fine grid (Jordan's quintic ends near [0.7, 1.2] on purpose).
        grid = torch.linspace(sigma.min().item(), sigma.max().item(), 20001, dtype=torch.float64)
        band = scalar_composition(grid, s.coefficients, torch.linalg.norm(x64).item() * s.norm_safety)
        assert band.min() - 1e-5 <= got.min() and got.max() <= band.max() + 1e-5
        assert 0.5 < got.min() and got.max() < 1.25


def test_flop_count_of_prx_small_matches_the_recipe():
    """docs/recipe.md section 9: 48 TFLOP of Newton-Schulz work for the 112 block matrices."""
    d, mlp = 1792, 6272
    shapes = [(3 * d, d), (d, d), (2 * d, d), (mlp, d), (mlp, d), (d, mlp), (6 * d, d)]
    nominal = 16 * sum(ns.newton_schulz_flops(r, c, 5) for r, c in shapes)
    assert 47.5e12 < nominal < 48.5e12
    symmetric = 16 * sum(ns.newton_schulz_flops(r, c, 5, symmetric=True) for r, c in shapes)
    assert symmetric / nominal == pytest.approx(0.71, abs=0.01)


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="bank of matrices"):
        ns.newton_schulz(torch.zeros(4, 4), JORDAN_5)
    with pytest.raises(TypeError, match="dtype"):
        ns.newton_schulz(torch.zeros(1, 4, 4, dtype=torch.int32), JORDAN_5)
    with pytest.raises(ValueError, match="B has shape"):
        ns.launch_polynomial_step(torch.zeros(1, 3, 3), torch.zeros(1, 4, 5), 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(16, 1792, 5376), (16, 6272, 1792), (4, 1792, 1792)])
def test_bf16_kernels_at_prx_shapes(shape):
    """|kernel - ref_fp32| <= 2 |torch_bf16 - ref_fp32| + atol, on PRX small bank shapes."""
    x = random_bank(*shape, seed=6, dtype=torch.bfloat16)
    ref32 = reference(x.float(), JORDAN_5)
    torch_bf16 = reference(x, JORDAN_5).float()
    kernel = ns.newton_schulz(x, JORDAN_5).float()
    kernel_err = (kernel - ref32).abs().amax(dim=(-2, -1))
    torch_err = (torch_bf16 - ref32).abs().amax(dim=(-2, -1))
    assert torch.all(kernel_err <= 2 * torch_err + 1e-3), (kernel_err, torch_err)
