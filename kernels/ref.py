"""PyTorch references for every kernel op (same signatures as the kernels).

They define the layouts the whole trainer agrees on, and they run on CPU and in tests.

Patch layout: an image (B, C, H, W) with patch size p becomes (B, L, C*p*p) with
L = (H/p) * (W/p) tokens in row-major order (token index = row * (W/p) + column), each
patch flattened in (channel, row in patch, column in patch) order. This is the order of the
PRX reference implementation, so its released weights load unchanged.
"""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p) * (W/p), C * p * p)."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"patchify: image size {h}x{w} is not a multiple of the patch {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(patches: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """(B, L, C * p * p) -> (B, C, H, W); the inverse of `patchify`."""
    b, length, dim = patches.shape
    p = patch_size
    gh, gw = height // p, width // p
    if gh * gw != length or dim % (p * p):
        raise ValueError(
            f"unpatchify: {length} tokens of width {dim} do not tile {height}x{width} with patch {p}"
        )
    c = dim // (p * p)
    x = patches.reshape(b, gh, gw, c, p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


# ----------------------------------------------------------------------------- Newton-Schulz (Muon)


def newton_schulz(x: torch.Tensor, coefficients: list[tuple[float, float, float]],
                  norm_safety: float = 1.0, eps: float = 1e-7) -> torch.Tensor:
    """Approximate the orthogonal polar factor U V^T of x (..., R, C), in x's dtype.

    The plain iteration of Muon (Jordan et al. 2024) and Polar Express (arXiv 2505.16932):
    X0 = x / (||x||_F * norm_safety + eps), on the wide orientation (transposed when R > C, so
    the Gram matrix is the small side); then per step (a, b, c):
    A = X X^T, B = b A + c A A, X <- a X + B X, which maps each singular value s to
    a s + b s^3 + c s^5. Works on one matrix or a batch of same-shape matrices.
    """
    tall = x.shape[-2] > x.shape[-1]
    X = x.mT if tall else x
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True,
                                    dtype=torch.promote_types(X.dtype, torch.float32))
    X = X / (norm * norm_safety + eps).to(X.dtype)
    for a, b, c in coefficients:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X
