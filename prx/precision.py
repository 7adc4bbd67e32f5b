"""Compute precision of a run (`train.precision`): bf16 autocast on a GPU, fp32 elsewhere.

Weights stay fp32 in every case (docs/recipe.md section 6: bf16-stored weights cost 3.7 FID in
the PRX ablations); bf16 is the dtype the matmuls run in. Training, FSDP2's parameter gathering,
evaluation and `prx.eval.sample` all read it from here, so a model samples in the precision it
trained in.
"""

from __future__ import annotations

import torch


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """bf16 on a CUDA device when `precision` is "bf16"; fp32 otherwise (the CPU always runs fp32)."""
    return torch.bfloat16 if device.type == "cuda" and precision == "bf16" else torch.float32


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """The autocast context of that precision (disabled when it is fp32)."""
    return torch.autocast(device.type, torch.bfloat16, enabled=compute_dtype(precision, device) == torch.bfloat16)
