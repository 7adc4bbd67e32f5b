"""What a log line averages: the sums the loop adds to every step, reduced over ranks at log time.

Kept on the device and added without a host sync; one all-reduce per log line turns them into
the record's means: loss (the weighted sum of the terms), gradient norm, each loss term
(`loss_<term>`), and the diffusion loss per timestep bin (`loss_t0.0-0.3`, ...: a sample counts
in its bin, so a bin's mean is over the samples that fell in it, across ranks). A window in which
no step was applied (every gradient NaN/inf, skipped) has no means: its values are None.
"""

from __future__ import annotations

import torch

from prx.recipe.flow import loss_sums_by_t_bin
from prx.run.distributed import all_reduce_mean
from prx.run.log_names import LOSS_TERMS, T_BIN_NAMES


class TrainMetrics:
    def __init__(self, device: torch.device, active_terms: tuple[str, ...]):
        self.active_terms = active_terms
        self.sums = torch.zeros(3, device=device)  # loss, grad norm, steps since the last log line
        self.bin_sums = torch.zeros(len(T_BIN_NAMES), device=device)
        self.bin_counts = torch.zeros(len(T_BIN_NAMES), device=device)
        self.term_sums = torch.zeros(len(LOSS_TERMS), device=device)

    def add(self, terms: torch.Tensor, grad_norm: torch.Tensor, per_sample: torch.Tensor, t: torch.Tensor) -> None:
        """One applied step: its loss terms (LOSS_TERMS order, averaged over micro-batches), its
        gradient norm, and this rank's per-sample diffusion losses at timesteps t."""
        self.sums += torch.stack([terms.sum(), grad_norm.detach(), torch.ones((), device=self.sums.device)])
        self.term_sums += terms
        bin_sums, bin_counts = loss_sums_by_t_bin(per_sample, t)
        self.bin_sums += bin_sums
        self.bin_counts += bin_counts

    def reduce(self) -> dict:
        """The means since the last call, the same on every rank (a collective); then starts over."""
        parts = (self.sums, self.bin_sums, self.bin_counts, self.term_sums)
        totals = all_reduce_mean(torch.cat(parts)).tolist()  # one collective for the whole line
        n = len(T_BIN_NAMES)
        sums, bin_sums, bin_counts, term_sums = totals[:3], totals[3:3 + n], totals[3 + n:3 + 2 * n], totals[3 + 2 * n:]
        steps = sums[2]
        means = {"loss": sums[0] / steps if steps else None, "grad_norm": sums[1] / steps if steps else None}
        for name, total, count in zip(T_BIN_NAMES, bin_sums, bin_counts):
            means[f"loss_{name}"] = total / count if count else None
        for name, total in zip(LOSS_TERMS, term_sums):
            if name in self.active_terms:
                means[f"loss_{name}"] = total / steps if steps else None
        for part in parts:
            part.zero_()
        return means
