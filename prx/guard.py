"""Skip optimizer steps whose gradient is not finite, and stop when that keeps happening.

The global gradient norm (after the data-parallel reduction, so every rank sees the same
value) decides: one NaN or inf anywhere makes it non-finite. Checking it costs one scalar
device-to-host copy per step.
"""

from __future__ import annotations

import torch


class TooManyBadSteps(RuntimeError):
    pass


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
