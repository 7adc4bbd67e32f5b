"""REPA: projector shape, the loss as a hand computation, kept tokens only, the resize rule, gradients."""

import pytest
import torch
import torch.nn.functional as F

import kernels
from prx.recipe.repa import RepaProjector, repa_loss, teacher_targets
from prx.recipe.teachers import load_dino
from tests.tiny_dino import save_tiny_dino


@pytest.fixture(scope="module", params=["v2", "v3"])
def teacher(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / request.param
    save_tiny_dino(request.param, path)
    return load_dino(str(path), "cpu")


def test_projector_is_three_linears_with_silu_between():
    full = RepaProjector(1792, 1024, 1024)  # the PRX shapes
    shapes = [tuple(p.shape) for p in full.parameters()]
    assert shapes == [(1024, 1792), (1024,), (1024, 1024), (1024,), (1024, 1024), (1024,)]
    small = RepaProjector(12, 20, 8)
    x = torch.randn(2, 5, 12)
    manual = small.out_layer(F.silu(small.hidden_layer(F.silu(small.in_layer(x)))))
    torch.testing.assert_close(small(x), manual)
    plain = small.out_layer(small.hidden_layer(small.in_layer(x)))  # without the SiLUs
    assert not torch.allclose(small(x), plain, atol=1e-3)


def test_dense_loss_is_minus_half_mean_cosine():
    torch.manual_seed(0)
    hidden, target = torch.randn(3, 7, 16), torch.randn(3, 7, 16)
    expected = -0.5 * F.cosine_similarity(hidden, target, dim=-1).mean()
    torch.testing.assert_close(repa_loss(hidden, target, None), expected)
    torch.testing.assert_close(repa_loss(hidden, target, None, weight=2.0), 4 * expected)
    assert repa_loss(target, 3 * target, None).item() == pytest.approx(-0.5)


def test_routed_loss_sees_only_the_kept_tokens():
    torch.manual_seed(1)
    batch, tokens, kept, dim = 3, 12, 5, 16
    keep_idx = kernels.select_kept_tokens(torch.tensor([11, 12, 13]), tokens, kept)
    hidden, target = torch.randn(batch, kept, dim), torch.randn(batch, tokens, dim)
    gathered = torch.stack([target[b, keep_idx[b]] for b in range(batch)])
    loss = repa_loss(hidden, target, keep_idx)
    torch.testing.assert_close(loss, -0.5 * F.cosine_similarity(hidden, gathered, dim=-1).mean())
    dropped = torch.ones(batch, tokens, dtype=torch.bool)
    dropped[torch.arange(batch)[:, None], keep_idx] = False
    changed = target.clone()
    changed[dropped] = torch.randn(int(dropped.sum()), dim)  # the routed-away tokens: no effect
    assert torch.equal(repa_loss(hidden, changed, keep_idx), loss)
    changed[0, keep_idx[0, 2]] += 1.0  # a kept token: an effect
    assert not torch.equal(repa_loss(hidden, changed, keep_idx), loss)
    with pytest.raises(ValueError, match="do not match"):
        repa_loss(torch.randn(batch, tokens, dim), target, keep_idx)  # dense hidden


def test_teacher_targets_use_the_denoiser_grid(teacher):
    torch.manual_seed(2)
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)  # patch 32 -> grid 2 x 3
    targets = teacher_targets(teacher, images, (2, 3))
    assert targets.shape == (2, 6, 32) and not targets.requires_grad
    p = teacher.patch_size
    resized = F.interpolate(images.float() / 255, size=(2 * p, 3 * p), mode="bilinear", antialias=True)
    torch.testing.assert_close(targets, teacher.patch_tokens(resized), rtol=1e-5, atol=1e-5)
    # the same images in the trainer's [-1, 1] range give the same targets
    unit = (images.float() / 127.5 - 1.0).requires_grad_()
    torch.testing.assert_close(teacher_targets(teacher, unit, (2, 3)), targets, rtol=1e-5, atol=1e-5)
    assert teacher_targets(teacher, images, (3, 2)).shape == (2, 6, 32)  # any grid, resized to it


def test_gradients_reach_the_projector_and_hidden_but_not_the_teacher(teacher):
    torch.manual_seed(3)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    targets = teacher_targets(teacher, images, (2, 2))
    projector = RepaProjector(24, 40, teacher.hidden_size)
    keep_idx = kernels.select_kept_tokens(torch.tensor([5, 6]), 4, 3)
    hidden = torch.randn(2, 3, 24, requires_grad=True)
    repa_loss(projector(hidden), targets, keep_idx).backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    assert all(p.grad is None for p in teacher.model.parameters())


def test_the_triton_path_takes_teacher_tokens_as_they_come(teacher):
    """On CUDA repa_loss runs the Triton gather and cosine kernels, which have their own layout
    rules (teacher tokens are a strided slice past CLS and registers); here they run on the CPU
    under the Triton interpreter and must agree with the reference."""
    pytest.importorskip("triton")

    torch.manual_seed(4)
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    targets = teacher_targets(teacher, images, (2, 3))
    keep_idx = kernels.select_kept_tokens(torch.tensor([8, 9]), 6, 4)
    hidden = torch.randn(2, 4, 24, requires_grad=True)
    projector = RepaProjector(24, 40, teacher.hidden_size)
    expected = repa_loss(projector(hidden), targets, keep_idx)
    (grad_expected,) = torch.autograd.grad(expected, hidden)
    with kernels.pinned("triton"):
        loss = repa_loss(projector(hidden), targets, keep_idx)
        (grad,) = torch.autograd.grad(loss, hidden)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_expected, rtol=1e-4, atol=1e-6)
