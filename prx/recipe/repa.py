"""REPA representation alignment (Yu et al. 2024; docs/recipe.md section 4), as explicit calls.

The loop runs the frozen teacher on the clean image (`teacher_targets`), takes the denoiser's
hidden state after block `repa.block`, and adds `repa_loss`:
-weight * mean over tokens of cos(projector(h), teacher token). With TREAD the hidden state holds
only the kept tokens (B, K, C) and `keep_idx` (B, K) picks the same tokens of the teacher.

The projector is an ordinary module with parameters that the denoiser owns (so it shares the
denoiser's data parallelism, optimizer group (Adam) and checkpoints); the teacher (a
`prx.recipe.teachers.FrozenDino`) is kept apart, in none of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from prx.recipe.teachers import FrozenDino, images_to_01, teacher_input_size


class RepaProjector(nn.Module):
    """MLP denoiser hidden -> teacher features: Linear, SiLU, Linear, SiLU, Linear (PRX: 1792 -> 1024 -> 1024 -> 1024).

    Layer names follow the PRX reference (in_layer, hidden_layer, out_layer) so its weights map 1:1.
    Build with RepaProjector(cfg.model.hidden_dim, cfg.repa.projector_dim, teacher.hidden_size).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.hidden_layer = nn.Linear(hidden_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.hidden_layer(F.silu(self.in_layer(x)))))


@torch.no_grad()  # not inference_mode: the loss saves these tokens for its backward
def teacher_targets(teacher: FrozenDino, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Teacher patch tokens (B, rows * cols, D) for the denoiser's token grid (rows, cols), row-major.

    images: the clean batch (B, 3, H, W), uint8 or float in [-1, 1]. It is mapped to [0, 1] and
    resized to `teacher_input_size(grid, teacher.patch_size)`, bilinear with antialiasing (a
    2x or 2.3x downscale at 512 px; the PRX reference uses F.interpolate's default, nearest).
    """
    pixels = images_to_01(images)
    size = teacher_input_size(grid, teacher.patch_size)
    if tuple(pixels.shape[-2:]) != size:
        pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
    return teacher.patch_tokens(pixels)


def repa_loss(aligned: torch.Tensor, teacher_tokens: torch.Tensor, keep_idx: torch.Tensor | None = None,
              weight: float = 0.5) -> torch.Tensor:
    """-weight * mean over tokens and batch of cos(aligned, teacher), fp32 scalar.

    aligned: the projector's output for the hidden state, (B, N, D) dense or (B, K, D) with
    TREAD (the denoiser applies its projector: `PRX(..., repa_projector=...)` with `capture`);
    teacher_tokens: (B, N, D) from `teacher_targets` (dense); keep_idx: (B, K) int64 kept token
    indices (ascending), or None when dense. Gradient to `aligned` only.
    """
    if keep_idx is not None:
        # the tokens come as a strided slice past CLS and registers; the Triton gather wants rows dense
        teacher_tokens = kernels.route_gather(teacher_tokens.contiguous(), keep_idx)
    if aligned.shape[:2] != teacher_tokens.shape[:2]:
        routed = "" if keep_idx is None else f" after gathering {keep_idx.shape[1]} kept tokens"
        raise ValueError(f"repa_loss: aligned {tuple(aligned.shape)} and teacher tokens "
                         f"{tuple(teacher_tokens.shape)}{routed} do not match in (batch, tokens)")
    mean_cos, _ = kernels.cosine_alignment(aligned, teacher_tokens.detach())
    return -weight * mean_cos
