"""The log line's means (prx.run.train_metrics): over applied steps, per term and per t bin."""

import pytest
import torch

from prx.run.train_metrics import TrainMetrics


def test_means_over_steps_terms_and_bins_then_a_fresh_start():
    metrics = TrainMetrics(torch.device("cpu"), ("diffusion", "lpips"))
    metrics.add(torch.tensor([1.0, 0.0, 0.5, 0.0]), torch.tensor(2.0), torch.tensor([1.0, 3.0]),
                torch.tensor([0.1, 0.7]))
    metrics.add(torch.tensor([3.0, 0.0, 1.5, 0.0]), torch.tensor(4.0), torch.tensor([5.0, 7.0]),
                torch.tensor([0.2, 0.2]))
    means = metrics.reduce()
    assert means["loss"] == pytest.approx((1.5 + 4.5) / 2) and means["grad_norm"] == pytest.approx(3.0)
    assert means["loss_diffusion"] == pytest.approx(2.0) and means["loss_lpips"] == pytest.approx(1.0)
    assert "loss_repa" not in means and "loss_dino" not in means  # off: not logged
    assert means["loss_t0.0-0.3"] == pytest.approx((1 + 5 + 7) / 3)  # three samples fell there
    assert means["loss_t0.3-0.6"] is None and means["loss_t0.6-1.0"] == pytest.approx(3.0)
    metrics.add(torch.tensor([2.0, 0.0, 0.0, 0.0]), torch.tensor(1.0), torch.tensor([2.0]), torch.tensor([0.5]))
    again = metrics.reduce()
    assert again["loss"] == pytest.approx(2.0) and again["loss_t0.3-0.6"] == pytest.approx(2.0)
    assert again["loss_t0.0-0.3"] is None


def test_a_window_without_applied_steps_has_no_means_and_says_so():
    """Every step of the window skipped (NaN/inf): None, never a loss of 0.0000."""
    from prx.run.runlog import format_train_line

    means = TrainMetrics(torch.device("cpu"), ("diffusion",)).reduce()
    assert means["loss"] is None and means["grad_norm"] is None and means["loss_diffusion"] is None
    line = format_train_line({"step": 40, **means, "lr": 1e-3, "skipped": 10, "img_per_s": 0.0,
                              "sec_per_step": 0.1}, 100)
    assert line == "step      40/100 | every step since the last line was skipped (10, NaN/inf gradient) | lr 1.0e-03"
