"""kernels/patchify.py against kernels/ref.py: fused patchify + noise (given and in-kernel noise),
patchify / unpatchify forward and backward, and the torch.library registration.

On the CPU the kernels run under the Triton interpreter in fp32 on small odd shapes; the tests
marked gpu run bf16 at the PRX shapes (512 and 1024 px, batch 16).
"""

import math

import pytest
import torch

from kernels import patchify as kp
from kernels import ref

SEEDS = [7, 2**40 + 3, -12345]  # a 64-bit key and a negative one exercise both key words


def make_images(batch, height, width, dtype, channels=3, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, (batch, channels, height, width), generator=gen, device=device, dtype=dtype)
    return (torch.rand(batch, channels, height, width, generator=gen, device=device) * 2 - 1).to(dtype)


def patch_shape(images, p):
    b, c, h, w = images.shape
    return (b, (h // p) * (w // p), c * p * p)


# ---------------------------------------------------------------- patchify + noise


@pytest.mark.parametrize("dtype, p, height, width, channels_last", [
    (torch.uint8, 32, 96, 160, False),   # 3 images of 96 x 160 px, the PRX patch
    (torch.float32, 5, 15, 10, True),    # odd patch, strided (channels-last) float images
])
def test_patchify_and_noise_with_given_noise_matches_reference(dtype, p, height, width, channels_last):
    images = make_images(3, height, width, dtype)
    if channels_last:
        images = images.to(memory_format=torch.channels_last)
    t = torch.rand(3)
    noise = torch.randn(patch_shape(images, p))
    x_t, x = kp.patchify_and_noise(images, t, p, noise=noise, noise_scale=0.7)
    want_x_t, want_x = ref.patchify_and_noise(images, t, p, noise=noise, noise_scale=0.7)
    assert x_t.dtype == x.dtype == torch.float32
    torch.testing.assert_close(x, want_x)
    torch.testing.assert_close(x_t, want_x_t)


@pytest.mark.parametrize("p, height, width", [(5, 10, 15), (8, 24, 16)])
def test_in_kernel_noise_matches_reference_stream(p, height, width):
    """With t = 1, x_t is the noise itself: the kernel's Philox stream must be the reference's
    (p = 5: p * p = 25 is not a multiple of 4; a 64-bit offset uses both counter words)."""
    images = make_images(3, height, width, torch.uint8)
    seeds = torch.tensor(SEEDS)
    eps, x = kp.patchify_and_noise(images, torch.ones(3), p, seeds=seeds, noise_offset=2**33 + 5)
    want = ref.normal_from_seeds(seeds, 2**33 + 5, (height // p) * (width // p), 3, p)
    torch.testing.assert_close(eps, want)
    torch.testing.assert_close(x, ref.patchify(images.float() / 127.5 - 1, p))


def correlation(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_in_kernel_noise_is_standard_normal_and_independent():
    images = make_images(4, 64, 64, torch.uint8)
    eps, _ = kp.patchify_and_noise(images, torch.ones(4), 16, seeds=torch.tensor([11, 12, 13, 14]))
    z = eps.double().flatten()
    n = z.numel()  # 49152
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(z.pow(4).mean() - 3) < 5 * math.sqrt(96 / n)  # kurtosis of a normal
    inside = 0.6826894921370859  # P(|z| < 1)
    assert abs((z.abs() < 1).double().mean() - inside) < 5 * math.sqrt(inside * (1 - inside) / n)
    # Independence: neighbours in the flat order (lag 1 and 3 inside one Philox call, 2 across its
    # two Box-Muller pairs, 4 across calls), channels, tokens and samples; squares for lag 1
    # (cos and sin of the same Box-Muller radius are uncorrelated but would share it if wrong).
    flat = eps.reshape(4, -1)
    for lag in (1, 2, 3, 4):
        assert abs(correlation(flat[:, :-lag], flat[:, lag:])) < 5 / math.sqrt(flat[:, lag:].numel())
    assert abs(correlation(flat[:, :-1] ** 2, flat[:, 1:] ** 2)) < 5 / math.sqrt(flat[:, 1:].numel())
    channels = eps.reshape(4, 16, 3, 256)
    assert abs(correlation(channels[:, :, 0], channels[:, :, 1])) < 5 / math.sqrt(channels[:, :, 0].numel())
    assert abs(correlation(eps[:, :-1], eps[:, 1:])) < 5 / math.sqrt(eps[:, 1:].numel())
    assert abs(correlation(eps[:-1], eps[1:])) < 5 / math.sqrt(eps[1:].numel())


def test_in_kernel_noise_is_reproducible_and_keyed_by_sample_only():
    images = make_images(3, 8, 24, torch.uint8)
    seeds = torch.tensor(SEEDS)
    t = torch.rand(3)
    first, _ = kp.patchify_and_noise(images, t, 8, seeds=seeds, noise_offset=4)
    again, _ = kp.patchify_and_noise(images, t, 8, seeds=seeds, noise_offset=4)
    assert torch.equal(first, again)
    # The last sample on its own (as on another rank) draws exactly the same noise.
    alone, _ = kp.patchify_and_noise(images[2:], t[2:], 8, seeds=seeds[2:], noise_offset=4)
    assert torch.equal(alone, first[2:])
    # Another offset or another seed: other numbers.
    ones = torch.ones(3)
    eps, _ = kp.patchify_and_noise(images, ones, 8, seeds=seeds, noise_offset=4)
    moved, _ = kp.patchify_and_noise(images, ones, 8, seeds=seeds, noise_offset=4 + 10**6)
    reseeded, _ = kp.patchify_and_noise(images, ones, 8, seeds=seeds + 1, noise_offset=4)
    for other in (moved, reseeded):
        assert abs(correlation(eps, other)) < 5 / math.sqrt(eps.numel())


def test_api_on_cpu_runs_the_reference_with_the_kernel_numbers():
    """kernels.patchify_and_noise / unpatchify pick the reference on CPU tensors; with seeds it
    draws the kernel's noise, so CPU and GPU runs see the same numbers."""
    import kernels

    images, t, seeds = make_images(2, 8, 12, torch.uint8), torch.rand(2), torch.tensor(SEEDS[:2])
    got = kernels.patchify_and_noise(images, t, 4, seeds=seeds, noise_offset=9, noise_scale=0.5)
    want = kp.patchify_and_noise(images, t, 4, seeds=seeds, noise_offset=9, noise_scale=0.5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert torch.equal(kernels.unpatchify(want[1], 4, 8, 12), kp.unpatchify(want[1], 4, 8, 12))  # reference vs kernel


def test_patchify_and_noise_rejects_bad_arguments():
    images = make_images(2, 16, 16, torch.uint8)
    t = torch.rand(2)
    seeds = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="multiple of the patch"):
        kp.patchify_and_noise(images, t, 6, seeds=seeds)
    with pytest.raises(ValueError, match="exactly one"):
        kp.patchify_and_noise(images, t, 8, noise=torch.randn(2, 4, 192), seeds=seeds)
    with pytest.raises(ValueError, match="exactly one"):
        kp.patchify_and_noise(images, t, 8)
    with pytest.raises(ValueError, match="noise must be"):
        kp.patchify_and_noise(images, t, 8, noise=torch.randn(2, 4, 191))
    with pytest.raises(ValueError, match="seeds must be int64"):
        kp.patchify_and_noise(images, t, 8, seeds=seeds.int())


# ---------------------------------------------------------------- patchify / unpatchify


@pytest.mark.parametrize("channels, p, height, width", [(3, 32, 96, 160), (3, 3, 9, 15), (5, 4, 8, 12)])
def test_unpatchify_and_patchify_match_reference_forward_and_backward(channels, p, height, width):
    images = make_images(3, height, width, torch.float32, channels=channels)
    patches = torch.randn(patch_shape(images, p), requires_grad=True)
    out = kp.unpatchify(patches, p, height, width)
    want = ref.unpatchify(patches, p, height, width)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    grad = torch.randn_like(out)
    (got_grad,) = torch.autograd.grad(out, patches, grad)
    (want_grad,) = torch.autograd.grad(want, patches, grad)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0)

    images = images.transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()  # strided input
    tokens = kp.patchify(images, p)
    torch.testing.assert_close(tokens, ref.patchify(images, p), rtol=0, atol=0)
    grad = torch.randn_like(tokens)
    (got_grad,) = torch.autograd.grad(tokens, images, grad)
    (want_grad,) = torch.autograd.grad(ref.patchify(images, p), images, grad)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0)


def test_unpatchify_rejects_bad_shapes():
    with pytest.raises(ValueError, match="do not|patches must"):
        kp.unpatchify(torch.randn(2, 5, 48), 4, 8, 8)
    with pytest.raises(ValueError, match="patches must"):
        kp.unpatchify(torch.randn(2, 4, 47), 4, 8, 8)


# ---------------------------------------------------------------- torch.library registration


def test_ops_trace_under_torch_compile_fullgraph():
    """The Triton interpreter cannot run inside inductor's generated code, so on the CPU the
    compiled graph runs with backend="aot_eager": dynamo (fullgraph: no graph break), fake
    tensors, functionalization and the autograd of each op; the inductor run is the gpu test."""
    images = make_images(2, 8, 12, torch.uint8)
    t, seeds = torch.rand(2), torch.tensor([3, 4])

    def step(images, t, seeds, weight):
        x_t, x = kp.patchify_and_noise(images, t, 4, seeds=seeds)
        image = kp.unpatchify(x_t * weight, 4, 8, 12)
        return (kp.patchify(image, 4) - x).square().sum()

    weight = torch.randn(48, requires_grad=True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(images, t, seeds, weight)
    (grad,) = torch.autograd.grad(loss, weight)
    want_loss = step(images, t, seeds, weight)
    (want_grad,) = torch.autograd.grad(want_loss, weight)
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(grad, want_grad)


@pytest.mark.parametrize("op, args", [
    ("patchify", lambda: (torch.randn(2, 3, 4, 6, requires_grad=True), 2)),
    ("unpatchify", lambda: (torch.randn(2, 6, 12, requires_grad=True), 2, 4, 6)),
    ("patchify_and_noise", lambda: (make_images(2, 4, 4, torch.uint8), torch.rand(2), 2, None,
                                    torch.tensor([1, 2]), 0, 1.0, torch.float32)),
])
def test_op_registration_passes_opcheck(op, args):
    torch.library.opcheck(getattr(torch.ops.prx, op).default, args())


# ---------------------------------------------------------------- GPU, bf16, PRX shapes


def within_lowp_tolerance(got, want_fp32, lowp, atol):
    """|kernel - ref_fp32| <= 2 |torch_lowp - ref_fp32| + atol (docs/architecture.md)."""
    err = (got.float() - want_fp32).abs()
    bound = 2 * (lowp.float() - want_fp32).abs() + atol
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("size", [512, 1024])
def test_gpu_patchify_and_noise_bf16_prx_shapes(size):
    images = make_images(16, size, size, torch.uint8, device="cuda")
    t = torch.rand(16, device="cuda")
    noise = torch.randn(patch_shape(images, 32), device="cuda")
    x_t, x = kp.patchify_and_noise(images, t, 32, noise=noise, out_dtype=torch.bfloat16)
    want_x_t, want_x = ref.patchify_and_noise(images, t, 32, noise=noise)
    lowp_x_t, lowp_x = ref.patchify_and_noise(images, t, 32, noise=noise, out_dtype=torch.bfloat16)
    within_lowp_tolerance(x_t, want_x_t, lowp_x_t, 1e-6)
    within_lowp_tolerance(x, want_x, lowp_x, 1e-6)

    seeds = torch.tensor([2**40 + i for i in range(16)], device="cuda")
    eps, _ = kp.patchify_and_noise(images, torch.ones(16, device="cuda"), 32, seeds=seeds, out_dtype=torch.bfloat16)
    want = ref.normal_from_seeds(seeds, 0, (size // 32) ** 2, 3, 32)
    within_lowp_tolerance(eps, want, want.bfloat16(), 1e-5)
    z = eps.double().flatten()
    assert abs(z.mean()) < 5 / math.sqrt(z.numel()) and abs(z.var() - 1) < 0.01


@pytest.mark.gpu
@pytest.mark.parametrize("size", [512, 1024])
def test_gpu_unpatchify_bf16_prx_shapes(size):
    patches = torch.randn(16, (size // 32) ** 2, 3072, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = kp.unpatchify(patches, 32, size, size)
    assert torch.equal(out, ref.unpatchify(patches, 32, size, size))
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, patches, grad)
    assert torch.equal(got, ref.patchify(grad, 32))


@pytest.mark.gpu
def test_gpu_ops_compile_with_inductor():
    images = make_images(4, 256, 256, torch.uint8, device="cuda")
    t, seeds = torch.rand(4, device="cuda"), torch.arange(4, device="cuda")

    def step(images, t, seeds, weight):
        x_t, x = kp.patchify_and_noise(images, t, 32, seeds=seeds, out_dtype=torch.bfloat16)
        image = kp.unpatchify(x_t * weight, 32, 256, 256).float()
        return (image - kp.unpatchify(x, 32, 256, 256).float()).square().mean()

    weight = torch.randn(3072, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    loss = torch.compile(step, fullgraph=True)(images, t, seeds, weight)
    (grad,) = torch.autograd.grad(loss, weight)
    want = step(images, t, seeds, weight)
    (want_grad,) = torch.autograd.grad(want, weight)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(grad, want_grad)
