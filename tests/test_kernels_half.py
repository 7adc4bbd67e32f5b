"""Every Triton kernel with 16-bit tensors, on the CPU: the dtype plumbing of the GPU's bf16 path.

The interpreter's bf16 arithmetic is wrong (docs/architecture.md, Tests), so bf16 itself is
tested on the GPU only; fp16 runs correctly here and goes through the same code: 16-bit loads, fp32 compute, 16-bit
stores, 16-bit gradients. Copies must be exact; arithmetic must stay within twice torch's own
fp16 error against fp64 (the low-precision rule of docs/architecture.md).
"""

import pytest
import torch

import kernels.muon as kns
from kernels import cosine as kc
from kernels import lpips_head as kl
from kernels import patchify as kp
from kernels import ref
from kernels import routing as kr

HALF = torch.float16
JORDAN = [(3.4445, -4.7750, 2.0315)] * 5


def within_twice_torch_error(ours, torch_half, exact, atol):
    bound = 2 * (torch_half.double() - exact).abs().max() + atol
    assert (ours.double() - exact).abs().max() <= bound


def test_routing_moves_half_rows_and_gradients_exactly():
    g = torch.Generator().manual_seed(0)
    idx = ref.select_kept_tokens(torch.tensor([1, 2, 3]), 13, 6)
    x = torch.randn(3, 13, 5, generator=g).to(HALF).requires_grad_()
    kept = torch.randn(3, 6, 5, generator=g).to(HALF).requires_grad_()
    for op, args in ((kr.route_gather, (x, idx)), (kr.route_scatter, (kept, x, idx))):
        ours, want = op(*args), getattr(ref, op.__name__)(*args)
        assert ours.dtype == HALF and torch.equal(ours, want)
        cotangent = torch.randn(ours.shape, generator=g).to(HALF)
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        for got, expected in zip(torch.autograd.grad(ours, leaves, cotangent),
                                 torch.autograd.grad(want, leaves, cotangent)):
            assert got.dtype == HALF and torch.equal(got, expected)


@pytest.mark.parametrize("noise_from", ["tensor", "seeds"])
def test_patchify_writes_half_patches_like_the_reference(noise_from):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8, generator=g)
    t = torch.rand(2, generator=g)
    kwargs = (dict(noise=torch.randn(2, 6, 3072, generator=g)) if noise_from == "tensor"
              else dict(seeds=torch.tensor([11, 12])))
    ours = kp.patchify_and_noise(images, t, 32, out_dtype=HALF, **kwargs)
    want = ref.patchify_and_noise(images, t, 32, out_dtype=HALF, **kwargs)
    exact = ref.patchify_and_noise(images, t.double(), 32, out_dtype=torch.float64, **kwargs)
    for got, half, fp64 in zip(ours, want, exact):
        assert got.dtype == HALF
        within_twice_torch_error(got, half, fp64, atol=1e-6)


def test_unpatchify_half_is_exact_both_ways():
    patches = torch.randn(2, 6, 3072, generator=torch.Generator().manual_seed(2)).to(HALF).requires_grad_()
    ours, want = kp.unpatchify(patches, 32, 64, 96), ref.unpatchify(patches, 32, 64, 96)
    assert ours.dtype == HALF and torch.equal(ours, want)
    cotangent = torch.randn_like(ours)
    (got,), (expected,) = (torch.autograd.grad(o, patches, cotangent) for o in (ours, want))
    assert got.dtype == HALF and torch.equal(got, expected)


@pytest.mark.parametrize("shape", [(2, 24, 40), (2, 40, 24)])  # wide, and tall (run transposed)
def test_newton_schulz_half_bank(shape):
    bank = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(HALF)
    ours = kns.newton_schulz(bank, JORDAN)
    assert ours.dtype == HALF and ours.shape == bank.shape
    within_twice_torch_error(ours, ref.newton_schulz(bank, JORDAN), ref.newton_schulz(bank.double(), JORDAN),
                             atol=1e-3)


def test_lpips_head_and_cosine_alignment_take_half_features():
    g = torch.Generator().manual_seed(4)
    pred = torch.randn(2, 37, 9, 11, generator=g).relu().to(HALF).requires_grad_()
    target = torch.randn(2, 37, 9, 11, generator=g).relu().to(HALF)
    weight = torch.rand(37, generator=g)
    a = torch.randn(3, 77, 40, generator=g).to(HALF).requires_grad_()
    b = torch.randn(3, 77, 40, generator=g).to(HALF)
    for ours_fn, ref_fn, args, leaf in (
            (kl.lpips_head_distance, ref.lpips_head_distance, (pred, target, weight), pred),
            (lambda *x: kc.cosine_alignment(*x)[1], lambda *x: ref.cosine_alignment(*x)[1], (a, b), a)):
        ours, half = ours_fn(*args), ref_fn(*args)
        exact = ref_fn(*[x.double() if x.is_floating_point() else x for x in args])
        within_twice_torch_error(ours, half, exact, atol=1e-6)
        cotangent = torch.randn(ours.shape, generator=g)
        (grad,), (grad_half,) = (torch.autograd.grad(o, leaf, cotangent) for o in (ours, half))
        assert grad.dtype == HALF
        double_leaf = leaf.detach().double().requires_grad_()
        exact_args = [double_leaf if x is leaf else (x.double() if x.is_floating_point() else x) for x in args]
        (grad_exact,) = torch.autograd.grad(ref_fn(*exact_args), double_leaf, cotangent.double())
        within_twice_torch_error(grad, grad_half, grad_exact, atol=1e-6)
