"""Steps whose gradient is not finite: judged here, skipped by the loop.

`BadStepGuard.finite` looks at the global gradient norm (after the data-parallel reduction, so
every rank sees the same value and takes the same decision); the loop applies the optimizer step
only when it is finite, and the guard stops the run when `max_in_a_row` steps in a row were not.
Judging costs one scalar device-to-host copy per step, which the loop needs anyway for its stop
signal.
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

    def finite(self, grad_norm: torch.Tensor, step: int) -> bool:
        """Whether the step's gradient may be applied. Counts a skip when not; raises
        TooManyBadSteps after `max_in_a_row` of them in a row."""
        if bool(torch.isfinite(grad_norm)):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row >= self.max_in_a_row:
            raise TooManyBadSteps(
                f"step {step}: the gradient was NaN or inf in {self.in_a_row} steps in a row, so the run stopped "
                "(lower optim.lr or check the data)"
            )
        return False

    def take_skipped(self) -> int:
        skipped, self.skipped = self.skipped, 0
        return skipped
