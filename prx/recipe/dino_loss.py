"""DINO perceptual loss on the x-prediction (PixelGen; docs/recipe.md section 5), as an explicit call.

Per sample: mean over patch tokens of 1 - cos(f(x-hat), f(x)), f a frozen DINOv2 ViT-B/14 with
registers (`prx.recipe.teachers.load_dino(cfg.perceptual.dino_teacher, ...)`) on the image mapped to
[0, 1] (clamped), resized to resolution x resolution bilinearly, ImageNet-normalised. The target
branch runs under no_grad (half the activation memory, no backward through it); the x-hat
branch keeps its graph, so the gradient reaches x-hat through the frozen encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels
from prx.recipe.teachers import FrozenDino, images_to_01


def _encoder_input(images: torch.Tensor, resolution: int) -> torch.Tensor:
    pixels = images_to_01(images)
    if tuple(pixels.shape[-2:]) != (resolution, resolution):
        # square for every aspect bucket, as the PRX reference does; both sides see the same
        # distortion. No antialiasing, as the reference (F.interpolate bilinear).
        pixels = F.interpolate(pixels, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return pixels


def dino_perceptual_distance(teacher: FrozenDino, x_hat: torch.Tensor, x: torch.Tensor,
                             resolution: int = 224) -> torch.Tensor:
    """(B,) fp32: per sample, the mean over patch tokens of 1 - cos(f(x_hat), f(x)).

    x_hat: the prediction (B, 3, H, W) in [-1, 1], any float dtype; x: the clean image, uint8 or
    float in [-1, 1]. resolution must be a multiple of the teacher's patch (224 = 16 x 14).
    """
    if resolution % teacher.patch_size:
        raise ValueError(f"dino_perceptual_loss: resolution {resolution} is not a multiple of "
                         f"the teacher's patch {teacher.patch_size}")
    with torch.no_grad():
        target = teacher.patch_tokens(_encoder_input(x, resolution))
    pred = teacher.patch_tokens(_encoder_input(x_hat, resolution))
    _, cos_per_sample = kernels.cosine_alignment(pred, target)
    return 1.0 - cos_per_sample


def dino_perceptual_loss(teacher: FrozenDino, x_hat: torch.Tensor, x: torch.Tensor, weight: float,
                         resolution: int = 224) -> torch.Tensor:
    """The weighted term of the training loss: weight * mean over samples of the distance (PRX: 0.01)."""
    return weight * dino_perceptual_distance(teacher, x_hat, x, resolution).mean()
