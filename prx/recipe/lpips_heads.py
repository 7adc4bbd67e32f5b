"""The learned linear heads of LPIPS (Zhang et al. 2018), read from the `lpips` package's files.

The package (PyPI lpips==0.1.4) ships, for the VGG16 backbone, weights/v0.1/vgg.pth: five 1x1
convolutions `lin{i}.model.1.weight` of shape (1, C, 1, 1), C = 64, 128, 256, 512, 512, without
bias and non-negative. We read that file with `torch.load(weights_only=True)` and never import
`lpips` itself (it imports torchvision). Install it without its dependencies:
`pip install --no-deps lpips==0.1.4`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

LPIPS_VGG_CHANNELS = (64, 128, 256, 512, 512)
_INSTALL = "pip install --no-deps lpips==0.1.4"


def lpips_weights_path(backbone: str = "vgg", version: str = "0.1") -> Path:
    """Where the installed `lpips` package keeps its heads (found without importing it)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the `lpips` package is not installed, so weights/v{version}/{backbone}.pth "
                                f"cannot be found; install it with `{_INSTALL}`")
    return Path(next(iter(spec.submodule_search_locations))) / "weights" / f"v{version}" / f"{backbone}.pth"


def load_lpips_heads(path: str | Path | None = None) -> list[torch.Tensor]:
    """The five VGG16 LPIPS head weights as fp32 (C,) tensors, checked for shape and sign.

    path: a vgg.pth file in the lpips layout; default: the one inside the installed package.
    """
    path = Path(path) if path is not None else lpips_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS head weights not found: {path}; install them with `{_INSTALL}`")
    state = torch.load(path, map_location="cpu", weights_only=True)
    heads = []
    for i, channels in enumerate(LPIPS_VGG_CHANNELS):
        key = f"lin{i}.model.1.weight"
        if key not in state:
            raise KeyError(f"{path}: no {key} (found {sorted(state)})")
        weight = state[key]
        if tuple(weight.shape) != (1, channels, 1, 1):
            raise ValueError(f"{path}: {key} has shape {tuple(weight.shape)}, expected (1, {channels}, 1, 1)")
        weight = weight.reshape(channels).float()
        if not torch.isfinite(weight).all() or (weight < 0).any():
            raise ValueError(f"{path}: {key} has negative or non-finite values (LPIPS heads are non-negative)")
        heads.append(weight)
    return heads
