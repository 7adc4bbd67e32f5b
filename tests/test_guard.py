"""The bad-step guard (prx.run.guard) judges; the loop steps."""

import pytest
import torch

from prx.run.guard import BadStepGuard, TooManyBadSteps


def test_non_finite_gradients_are_counted_then_abort():
    guard = BadStepGuard(max_in_a_row=2)
    assert guard.finite(torch.tensor(float("nan")), step=1) is False
    assert guard.finite(torch.tensor(1.0), step=2) is True and guard.in_a_row == 0
    assert guard.take_skipped() == 1 and guard.take_skipped() == 0
    assert guard.finite(torch.tensor(float("inf")), step=3) is False
    with pytest.raises(TooManyBadSteps, match="NaN or inf in 2 steps in a row"):
        guard.finite(torch.tensor(float("nan")), step=4)
