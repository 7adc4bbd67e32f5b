"""Batched Newton-Schulz kernels against an fp64 evaluation of the same polynomial iteration.

On the CPU the kernels run under the Triton interpreter in fp32 (and fp16 for the Gram
iteration); on a GPU (marked `gpu`) in bf16 at the PRX small shapes.
"""

import dataclasses

import pytest
import torch

import kernels
from bench.muon_numerics import make_input, references
from kernels import muon as ns
from kernels import ref
from kernels.ref import newton_schulz as reference
from prx.config import ConfigError, preset, validate
from prx.optim import JORDAN, NewtonSchulzSchedule, build_optimizer

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


def test_product_of_commuting_symmetric_matrices_is_exactly_symmetric():
    """X Y^T with Y a polynomial in X (the Gram iteration's products): upper tiles computed, the
    lower triangle mirrored, diagonal tiles included (45 rows: two tiles of 32 here)."""
    a = random_bank(2, 45, 45, seed=8)
    x = (a + a.mT) / 4
    y = x @ x * 0.5 - 1.5 * x  # commutes with x
    out = ns.launch_symmetric_product(x, alpha=2.0, c=x, beta=0.5, y=y)
    expected = 2.0 * x.double() @ y.double() + 0.5 * x.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(out, out.mT)
    with pytest.raises(ValueError, match="Y is"):
        ns.launch_symmetric_product(x, y=y[:, :40])


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


@pytest.mark.parametrize("schedule", ["jordan", "polar_express"])
@pytest.mark.parametrize("restarts", [None, (), (2, 4)])  # the default (3,), none, two
def test_gram_iteration_is_the_standard_polynomial_in_fp64(schedule, restarts):
    """Gram-space evaluation (kernels.ref.gram_newton_schulz) = the standard iteration, in fp64:
    measured at most 4e-13 apart (square, Polar Express, no restart), 1e-14 on the others."""
    s = NewtonSchulzSchedule.named(schedule, 5)
    for shape in [(3, 45, 70), (2, 77, 40), (2, 33, 33), (45, 70)]:
        x = random_bank(*shape, seed=9).double()
        gram = ref.gram_newton_schulz(x, list(s.coefficients), s.norm_safety, s.eps, out_scale=0.5, restarts=restarts)
        standard = reference(x, list(s.coefficients), s.norm_safety, s.eps) * 0.5
        assert gram.shape == x.shape and gram.dtype == x.dtype
        torch.testing.assert_close(gram, standard, rtol=0, atol=4e-12)


# Gram kernels (interpreter) against the exact standard iteration, relative Frobenius distance.
# Measured over 3 seeds (CPU, torch 2.13, triton 3.7.1): kernel / reference ratio 0.71 .. 1.14
# (fp32 and fp16, wide, tall and square); distance at most 3.1e-6 (fp32, 3 x 45 x 70) and
# 3.4e-3 (fp16, 2 x 77 x 40). Before the diagonal tiles were mirrored the fp16 kernel was 4.6x
# the reference (0.017 against 0.0037, Polar Express), which the ratio bound catches.
GRAM_CASES = [(torch.float32, (3, 45, 70), 1e-5), (torch.float16, (2, 77, 40), 8e-3)]


@pytest.mark.parametrize("schedule", ["jordan", "polar_express"])
@pytest.mark.parametrize("dtype, shape, tolerance", GRAM_CASES)
def test_gram_kernels_match_the_reference(schedule, dtype, shape, tolerance):
    s = NewtonSchulzSchedule.named(schedule, 5)
    x = random_bank(*shape, seed=4, dtype=dtype)
    exact = reference(x.double(), list(s.coefficients), s.norm_safety, s.eps)
    kernel = ns.newton_schulz(x, list(s.coefficients), s.norm_safety, s.eps, method="gram")
    torch_same_rounding = ref.newton_schulz(x, list(s.coefficients), s.norm_safety, s.eps, method="gram")
    assert kernel.shape == x.shape and kernel.dtype == dtype

    def distance(o):
        return ((o.double() - exact).norm() / exact.norm()).item()

    assert distance(kernel) <= min(tolerance, 2 * distance(torch_same_rounding)), (distance(kernel),
                                                                                     distance(torch_same_rounding))


@pytest.mark.parametrize("schedule", ["jordan", "polar_express"])
def test_gram_in_fp16_stays_near_the_exact_iteration_on_an_ill_conditioned_bank(schedule):
    """bf16 input with singular values log-uniform over 1e-6..1 (bench/muon_numerics.py), 96 x 320:
    measured over 4 seeds (CPU, torch 2.13), distance to the exact iteration 0.013-0.015 (Jordan)
    and 0.029-0.038 (Polar Express) for the default Gram iteration, at most 0.14 of standard
    bf16's 0.17-0.33; without the restart 0.26-0.51 and 1.6-11."""
    s = NewtonSchulzSchedule.named(schedule, 5)
    x = make_input("log-uniform", 96, 320, torch.Generator().manual_seed(0))
    _, exact, _ = references(x)
    gram = ref.newton_schulz(x, list(s.coefficients), s.norm_safety, s.eps, method="gram")
    standard = ref.newton_schulz(x, list(s.coefficients), s.norm_safety, s.eps)

    def distance(o):
        return ((o.double() - exact[schedule]).norm() / exact[schedule].norm()).item()

    assert distance(gram) <= 0.07 and distance(gram) <= 0.25 * distance(standard), (distance(gram), distance(standard))


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


@pytest.mark.parametrize("steps", [1, 3, 4, 5, 7])
def test_gram_flop_count_is_what_the_reference_multiplies(steps, monkeypatch):
    """newton_schulz_flops(method="gram") against the products kernels/ref.py actually runs."""
    counted = []
    product = ref._product

    def counting(x, y, dtype, **kwargs):
        counted.append(2 * x.shape[-2] * x.shape[-1] * y.shape[-1])
        return product(x, y, dtype, **kwargs)

    monkeypatch.setattr(ref, "_product", counting)
    ref.gram_newton_schulz(random_bank(40, 72, seed=10), [JORDAN] * steps)
    assert sum(counted) == ns.newton_schulz_flops(40, 72, steps, method="gram")
    restarts = len(ref.gram_restarts(steps))
    assert len(counted) == 2 + 2 * restarts + 4 * steps - 3 * (restarts + 1)


def test_gram_flops_of_prx_small():
    """README: 21.5 TFLOP a step with symmetric products (34.3 standard), 34.6 as full products (47.9)."""
    d, mlp = 1792, 6272
    shapes = [(3 * d, d), (d, d), (2 * d, d), (mlp, d), (mlp, d), (d, mlp), (6 * d, d)]
    flops = {(method, symmetric): 16 * sum(ns.newton_schulz_flops(r, c, 5, symmetric, method) for r, c in shapes)
             for method in ("standard", "gram") for symmetric in (False, True)}
    assert flops["gram", True] == pytest.approx(21.45e12, rel=1e-3)
    assert flops["standard", True] == pytest.approx(34.30e12, rel=1e-3)
    assert flops["gram", False] == pytest.approx(34.62e12, rel=1e-3)


def test_the_method_comes_from_the_config_and_is_checked():
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 6)])
    cfg = preset("prx_small_512")
    assert cfg.optim.newton_schulz == "gram" and build_optimizer(model, cfg).schedule.method == "gram"
    standard = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, newton_schulz="standard"))
    assert build_optimizer(model, standard).schedule.method == "standard"
    with pytest.raises(ConfigError, match="optim.newton_schulz"):
        validate(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, newton_schulz="fast")))
    for impl in (ns, ref):
        with pytest.raises(ValueError, match="standard, gram"):
            impl.newton_schulz(torch.zeros(1, 4, 6), JORDAN_5, method="fast")
    with kernels.pinned("reference"):  # the dispatcher passes the method and out_scale through
        out = kernels.newton_schulz(random_bank(2, 5, 9), JORDAN_5, 1.0, 1e-7, 0.5, method="gram")
    torch.testing.assert_close(out, ref.gram_newton_schulz(random_bank(2, 5, 9), JORDAN_5, out_scale=0.5))


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


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(16, 1792, 5376), (16, 6272, 1792), (4, 1792, 1792)])
def test_gram_kernels_at_prx_shapes(shape):
    """|kernel - exact| <= 2 |torch, same rounding points - exact| + atol, relative Frobenius per
    matrix, the Gram iteration on bf16 banks (fp16 inside) at PRX small bank shapes."""
    x = random_bank(*shape, seed=6, dtype=torch.bfloat16)
    exact = reference(x.double(), JORDAN_5)
    torch_same_rounding = ref.gram_newton_schulz(x, JORDAN_5).double()
    kernel = ns.newton_schulz(x, JORDAN_5, method="gram").double()

    def distance(o):
        return (o - exact).norm(dim=(-2, -1)) / exact.norm(dim=(-2, -1))

    assert torch.all(distance(kernel) <= 2 * distance(torch_same_rounding) + 1e-3), (distance(kernel),
                                                                                       distance(torch_same_rounding))


def test_gram_reference_in_fp32_mirrors_nothing_and_stays_at_the_exact_iteration():
    """fp32 storage skips the mirror of the half path (rounding-level asymmetry only) and lands
    within fp32 rounding of the fp64 iteration, where fp16 storage is ~1e-3 away."""
    s = NewtonSchulzSchedule.named("jordan", 5)
    x = random_bank(3, 48, 160, seed=11)
    exact = reference(x.double(), list(s.coefficients), s.norm_safety, s.eps)

    def distance(o):
        return ((o.double() - exact).norm() / exact.norm()).item()

    assert distance(ref.newton_schulz(x, list(s.coefficients), method="gram")) < 2e-5
    assert distance(ref.newton_schulz(x.half(), list(s.coefficients), method="gram")) > 1e-4
    half = ref._product(x.half(), x.half().mT, torch.float16)
    assert torch.equal(half, half.mT)  # fp16: mirrored, as the kernels store it
