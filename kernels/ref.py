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
