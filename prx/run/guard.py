"""Failures during training: steps whose gradient is not finite, and running out of memory.

`BadStepGuard` skips an optimizer step whose global gradient norm (after the data-parallel
reduction, so every rank sees the same value) is NaN or inf, and stops when that keeps
happening; checking costs one scalar device-to-host copy per step. `out_of_memory_advice`
turns an out-of-memory error into the settings that lower the memory a step needs.
"""

from __future__ import annotations

import torch

from prx.config import Config
from prx.run.parallel import BatchPlan


class TooManyBadSteps(RuntimeError):
    pass


class OutOfMemory(RuntimeError):
    pass


def out_of_memory_advice(err: torch.OutOfMemoryError, cfg: Config, plan: BatchPlan) -> str:
    """What ran out, with this run's micro-batch, and what to set instead (global batch kept)."""
    first_line = (str(err).strip().splitlines() or ["out of memory"])[0]
    tips = []
    smaller = next((m for m in range(plan.micro_batch - 1, 0, -1) if plan.local_batch % m == 0), None)
    if smaller:
        tips.append(f"--set parallel.micro_batch={smaller} (gradient accumulation keeps the global batch "
                    f"of {plan.global_batch})")
    if cfg.parallel.activation_checkpointing != "full":
        tips.append("--set parallel.activation_checkpointing=full (blocks recompute activations in backward)")
    if not cfg.parallel.reshard_after_forward:
        tips.append("--set parallel.reshard_after_forward=true")
    advice = "; or ".join(tips) if tips else "more GPUs, or a smaller train.batch_size"
    return (f"out of device memory with micro-batch {plan.micro_batch} per process at {cfg.data.resolution} px "
            f"({first_line}). Try {advice}")


class BadStepGuard:
    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.skipped = 0  # since the last log line

    def step(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor, step: int) -> bool:
        """Apply the update if the gradient is finite; else drop it. Returns whether it stepped."""
        if bool(torch.isfinite(grad_norm)):
            optimizer.step()
            self.in_a_row = 0
            return True
        optimizer.zero_grad(set_to_none=True)
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row >= self.max_in_a_row:
            raise TooManyBadSteps(
                f"step {step}: the gradient was NaN or inf in {self.in_a_row} steps in a row; stopping. "
                "Lower optim.lr, check the data, or resume from an earlier checkpoint with --resume PATH"
            )
        return False

    def take_skipped(self) -> int:
        skipped, self.skipped = self.skipped, 0
        return skipped
