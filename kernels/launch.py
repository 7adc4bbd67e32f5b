"""What the Triton launchers share: input checks and how many programs keep a device busy.

Layer 2 helpers of the kernels (flow_matching, lpips_head, cosine, muon); no kernel lives here.

The loss ops are registered with `torch.library.custom_op` (fake implementation and autograd
included), so `torch.compile(fullgraph=True)` traces through them without graph breaks.
`triton_op` would let inductor see the kernels, but its fake mode runs the kernel itself under
the interpreter, which breaks the CPU tests; a loss op at the end of the graph gains nothing from
being visible to inductor. Under TRITON_INTERPRET=1 (the CPU tests) the kernels run with tiny
grids and tiles (`interpreting`).
"""

from __future__ import annotations

import functools
import os

import torch

Tensor = torch.Tensor


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (the CPU tests): grids and tiles are kept tiny there."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """Programs to keep busy: a few waves on a GPU, a handful under the interpreter."""
    if device.type == "cuda" and not interpreting():
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def needs_grad(x: Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def check_float(name: str, tensor: Tensor) -> None:
    if not tensor.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {tensor.dtype}")


def check_pair(op: str, a: Tensor, b: Tensor) -> None:
    check_float(f"{op} {a.dtype}", a)
    check_float(f"{op} {b.dtype}", b)
    if a.shape != b.shape:
        raise ValueError(f"{op}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{op}: devices differ, {a.device} vs {b.device}")
    if a.dim() < 1 or a.shape[0] == 0 or a.numel() == 0:
        raise ValueError(f"{op}: empty input of shape {tuple(a.shape)}")
