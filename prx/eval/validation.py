"""The validation loss: the diffusion loss of held-out samples at fixed timesteps and fixed noise.

The training loss of a log window moves with its batches' random timesteps (the velocity loss at
t < 0.3 is ~10x the one at t > 0.6 in the tiny preset's log) and images, so it is a noisy
measure of the model. Here the images (`prx.data.heldout`), the timesteps
(t = (k + 0.5) / n, stratified over (0, 1)) and the noise (keyed by eval.seed, timestep and
sample) are the same at every evaluation: only the weights change between two values. Every
sample is scored at every timestep, without TREAD routing (the model as it samples), and the
sums are averaged over ranks. torchtitan's Flux trainer logs a validation loss at fixed
timesteps the same way; the PRX reference bins it by timestep.
"""

from __future__ import annotations

import time

import torch

import kernels
from prx import precision
from prx.config import Config
from prx.data.heldout import HeldOut
from prx.recipe.flow import flow_loss
from prx.rng import mix_seed
from prx.run.distributed import DistInfo, all_reduce_mean
from prx.run.runlog import RunLog
from prx.text import TextTower


def validation_timesteps(count: int) -> torch.Tensor:
    """(count,) fp32 timesteps (k + 0.5) / count: 8 gives 0.0625, 0.1875, ..., 0.9375."""
    return (torch.arange(count, dtype=torch.float32) + 0.5) / count


def timestep_key(t: float) -> str:
    """The record field of one timestep's loss: 0.0625 -> 'val_loss_t0.062'."""
    return f"val_loss_t{t:.3f}"


class ValidationLoss:
    """Every rank scores its share of the held-out samples; `__call__` logs and returns the record.

    The sample count is rounded down to a multiple of the world size so every rank runs the same
    number of forwards (each one a collective under FSDP)."""

    def __init__(self, cfg: Config, heldout: HeldOut, tower: TextTower, dist: DistInfo, log: RunLog,
                 batch_size: int):
        self.cfg, self.tower, self.dist, self.log, self.batch_size = cfg, tower, dist, log, batch_size
        count = heldout.usable(cfg.eval.val_samples)
        count -= count % dist.world_size
        self.count = count
        self.timesteps = validation_timesteps(cfg.eval.val_timesteps)
        mine = list(range(dist.rank, count, dist.world_size))
        # Fixed for the run: images once (uint8, on the CPU: 1024 at 512 px are 0.8 GB), captions as text
        # (their embeddings, up to 256 x 2304 fp32 each, would be 2.4 GB; encoding them is cheap).
        self.slots = mine
        self.images = heldout.images(mine) if mine else None
        self.captions = heldout.captions(mine)

    def describe(self) -> str:
        return f"validation loss: {self.count} held-out samples x {len(self.timesteps)} timesteps"

    @torch.no_grad()
    def losses(self, model) -> torch.Tensor:
        """(n timesteps,) mean diffusion loss per timestep over every rank's samples."""
        cfg, device = self.cfg, next(model.parameters()).device
        autocast = precision.autocast(cfg.train.precision, device)
        p = cfg.model.patch_size
        grid = (cfg.data.resolution // p, cfg.data.resolution // p)
        sums = torch.zeros(len(self.timesteps), device=device, dtype=torch.float64)
        for start in range(0, len(self.slots), self.batch_size):
            slots = self.slots[start:start + self.batch_size]
            images = self.images[start:start + len(slots)].to(device)
            text, mask = self.tower(self.captions[start:start + len(slots)])
            for k, t_value in enumerate(self.timesteps.tolist()):
                t = torch.full((len(slots),), t_value, device=device)
                seeds = torch.tensor([mix_seed(cfg.eval.seed, k, slot) for slot in slots], device=device)
                x_t, x = kernels.patchify_and_noise(images, t, p, seeds=seeds, noise_scale=cfg.flow.noise_scale)
                with autocast:
                    x_hat = model(x_t, t, text.to(device), mask.to(device), grid).x_hat
                per_sample = flow_loss(x_hat.float(), x, t, cfg.flow.t_floor)[1]
                sums[k] += per_sample.double().sum()
        # the same count on every rank, so the mean of the per-rank means is the mean over all
        return (all_reduce_mean(sums / max(len(self.slots), 1))).float().cpu()

    def __call__(self, model, step: int) -> dict:
        start = time.perf_counter()
        per_t = self.losses(model)
        record = {"kind": "val", "step": step, "val_loss": per_t.mean().item(),
                  **{timestep_key(t): v for t, v in zip(self.timesteps.tolist(), per_t.tolist())}}
        shown = " ".join(f"t{t:.2f} {v:.3f}" for t, v in zip(self.timesteps.tolist(), per_t.tolist()))
        self.log.print(f"val step {step}: loss {record['val_loss']:.4f} | {shown} "
                       f"({time.perf_counter() - start:.1f} s)")
        self.log.write(record)
        return record
