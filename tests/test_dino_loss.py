"""DINO perceptual loss: a hand computation, 0 for equal images, gradient to x-hat only, bf16 teacher."""

import pytest
import torch
import torch.nn.functional as F

from prx.recipe.dino_loss import dino_perceptual_distance, dino_perceptual_loss
from prx.recipe.teachers import load_dino
from tests.tiny_dino import save_tiny_dino

MEAN = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
RES = 28  # 2 x 2 patches of 14 (the real run: 224, 16 x 16)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("dino") / "v2"
    save_tiny_dino("v2", path)
    return path


@pytest.fixture(scope="module")
def teacher(teacher_path):
    return load_dino(str(teacher_path), "cpu")


def _hand_loss(model, x_hat, x):
    """1 - cos per token, mean over tokens, written without prx code."""
    def features(img):
        img01 = ((img.float() + 1) / 2).clamp(0, 1)
        img01 = F.interpolate(img01, size=(RES, RES), mode="bilinear", align_corners=False)
        return model(pixel_values=(img01 - MEAN) / STD).last_hidden_state[:, 5:]

    return (1 - F.cosine_similarity(features(x_hat), features(x), dim=-1)).mean(1)


def test_loss_matches_a_hand_computation(teacher):
    torch.manual_seed(0)
    x = torch.rand(3, 3, 48, 80) * 2 - 1  # a non-square bucket, resized to square
    x_hat = x + 0.6 * torch.randn_like(x)  # overshoots [-1, 1]: clamped
    loss = dino_perceptual_distance(teacher, x_hat, x, resolution=RES)
    assert loss.shape == (3,) and loss.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(loss, _hand_loss(teacher.model, x_hat, x), rtol=1e-5, atol=1e-6)
    assert (loss > 1e-3).all()
    # uint8 targets are read as [0, 255]
    x_u8 = torch.randint(0, 256, (3, 3, 48, 80), dtype=torch.uint8)
    with torch.no_grad():
        expected = _hand_loss(teacher.model, x_hat, x_u8.float() / 127.5 - 1)
    torch.testing.assert_close(dino_perceptual_distance(teacher, x_hat, x_u8, RES), expected, rtol=1e-5, atol=1e-6)


def test_the_loss_term_is_the_weighted_mean_of_the_distances(teacher):
    torch.manual_seed(5)
    x = torch.rand(3, 3, 40, 56) * 2 - 1
    x_hat = x + 0.3 * torch.randn_like(x)
    distance = dino_perceptual_distance(teacher, x_hat, x, RES)
    assert distance.shape == (3,) and (distance > 0).all()
    torch.testing.assert_close(dino_perceptual_loss(teacher, x_hat, x, 0.01, RES), 0.01 * distance.mean())


def test_loss_of_equal_images_is_zero(teacher):
    x = torch.rand(2, 3, 56, 56) * 2 - 1
    torch.testing.assert_close(dino_perceptual_distance(teacher, x, x.clone(), RES), torch.zeros(2), rtol=0, atol=1e-6)


def test_gradient_reaches_x_hat_only(teacher):
    torch.manual_seed(1)
    x = (torch.rand(2, 3, 56, 56) * 2 - 1).requires_grad_()
    x_hat = (x.detach() + 0.3 * torch.randn_like(x)).requires_grad_()
    dino_perceptual_distance(teacher, x_hat, x, RES).sum().backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0
    assert x.grad is None  # the target branch carries no graph
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())


def test_resolution_must_fit_the_patch(teacher):
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="not a multiple"):
        dino_perceptual_distance(teacher, x, x, resolution=30)


def test_bf16_teacher_gives_fp32_gradients(teacher, teacher_path):
    """The GPU configuration (bf16 teacher weights) on CPU: dtypes and a close value."""
    low = load_dino(str(teacher_path), "cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in low.model.parameters())
    torch.manual_seed(2)
    x = torch.rand(2, 3, 56, 56) * 2 - 1
    x_hat = (x + 0.5 * torch.randn_like(x)).requires_grad_()
    loss = dino_perceptual_distance(low, x_hat, x, RES)
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert x_hat.grad.dtype == torch.float32 and x_hat.grad.abs().sum() > 0
    # the same function as in fp32 up to bf16 rounding: the loss is ~0.2 here, where a bf16 ulp
    # is 2^-10 ~ 1e-3; allow ~5 ulps (measured: 3e-4). A wrong input path moves it by ~0.1.
    with torch.no_grad():
        torch.testing.assert_close(loss, dino_perceptual_distance(teacher, x_hat, x, RES), rtol=0, atol=5e-3)


def test_the_triton_cosine_path_agrees(teacher):
    """On CUDA the cosine is the Triton kernel, fed a strided slice of the encoder output; here it
    runs on the CPU under the Triton interpreter, forward and the gradient to x-hat."""
    pytest.importorskip("triton")
    import kernels

    torch.manual_seed(3)
    x = torch.rand(2, 3, 40, 56) * 2 - 1
    x_hat = (x + 0.4 * torch.randn_like(x)).requires_grad_()
    expected = dino_perceptual_distance(teacher, x_hat, x, RES)
    (grad_expected,) = torch.autograd.grad(expected.sum(), x_hat)
    with kernels.pinned("triton"):
        loss = dino_perceptual_distance(teacher, x_hat, x, RES)
        (grad,) = torch.autograd.grad(loss.sum(), x_hat)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_expected, rtol=1e-4, atol=1e-7)
