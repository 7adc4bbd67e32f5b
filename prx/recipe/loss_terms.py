"""The training loss of one micro-batch: the recipe's weighted terms, computed in one place.

    loss = diffusion                                     (docs/recipe.md section 2, weight 1)
         + repa.weight * -mean cos(projector(h), teacher) (section 4: 0.5, kept tokens under TREAD)
         + perceptual.lpips_weight * LPIPS                 (section 5: 0.1, at 0.5x)
         + perceptual.dino_weight * (1 - cos) of DINO tokens (section 5: 0.01, at 224 px)

Each term is one call that returns its weighted scalar (the weight read from the config and
applied inside); `micro_batch_loss` makes those calls from the denoiser's output. train.py and
bench/bench_recipe.py both call it, so the benchmark times what trains. A term is on when its
frozen network was loaded (`load_teachers`), which happens before the first step, so a missing
weight file stops the run at start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from prx.config import Config, ConfigError
from prx.model.denoiser import PRXOutput
from prx.model.tread import TokenRoute
from prx.recipe.dino_loss import dino_perceptual_loss
from prx.recipe.flow import flow_loss
from prx.recipe.lpips import LPIPSLoss
from prx.recipe.repa import repa_loss, teacher_targets
from prx.recipe.teachers import FrozenDino, load_dino
from prx.run.log_names import LOSS_TERMS

Tensor = torch.Tensor


@dataclass
class Teachers:
    """The frozen networks of the loss terms; None where a term is off."""

    repa: FrozenDino | None = None
    lpips: LPIPSLoss | None = None
    dino: FrozenDino | None = None

    @property
    def active_terms(self) -> tuple[str, ...]:
        on = {"diffusion": True, "repa": self.repa is not None, "lpips": self.lpips is not None,
              "dino": self.dino is not None}
        return tuple(name for name in LOSS_TERMS if on[name])

    def repa_targets(self, images: Tensor, grid: tuple[int, int]) -> Tensor | None:
        """The REPA teacher's patch tokens of the clean images on the denoiser's grid (None: no REPA)."""
        return teacher_targets(self.repa, images, grid) if self.repa is not None else None


def load_teachers(cfg: Config, device: torch.device, compute_dtype: torch.dtype) -> Teachers:
    """The teachers the config turns on, frozen, on `device` (a missing file raises PretrainedMissing)."""
    repa = load_dino(cfg.repa.teacher, device) if cfg.repa.enabled else None
    if repa is not None and repa.hidden_size != cfg.repa.teacher_dim:
        raise ConfigError(f"REPA teacher {cfg.repa.teacher} is {repa.hidden_size} wide; "
                          f"set --set repa.teacher_dim={repa.hidden_size}")
    dino = (load_dino(cfg.perceptual.dino_teacher, device, what="DINO perceptual teacher",
                      option="perceptual.dino_teacher") if cfg.perceptual.dino_weight else None)
    lpips = (LPIPSLoss.from_config(cfg.perceptual, device, compute_dtype)  # VGG16 + the lpips package's heads
             if cfg.perceptual.lpips_weight else None)
    return Teachers(repa, lpips, dino)


@dataclass
class MicroBatchLoss:
    terms: dict[str, Tensor]  # weighted scalars, in LOSS_TERMS order
    per_sample: Tensor  # the diffusion loss of each sample, unweighted (B,): the per-t-bin log

    @property
    def total(self) -> Tensor:
        """What backward runs on: the sum of the terms."""
        return sum(self.terms.values())

    def detached(self) -> Tensor:
        """The terms as one fp32 vector in LOSS_TERMS order (0 for a term that is off), for the log."""
        zero = self.per_sample.new_zeros(())
        return torch.stack([self.terms[name].detach().float() if name in self.terms else zero
                            for name in LOSS_TERMS])


def micro_batch_loss(cfg: Config, out: PRXOutput, x: Tensor, t: Tensor, image_size: tuple[int, int],
                     teachers: Teachers, repa_targets: Tensor | None, route: TokenRoute | None) -> MicroBatchLoss:
    """The weighted terms of one micro-batch.

    out: the denoiser's output for it (x-hat in patch layout, and the hidden state captured for
    REPA); x: the clean patches; t (B,); image_size: (H, W) of its images in pixels;
    repa_targets: `teachers.repa_targets(...)` rows of this micro-batch; route: its TREAD route.
    """
    diffusion, per_sample = flow_loss(out.x_hat, x, t, cfg.flow.t_floor)
    terms = {"diffusion": diffusion}
    if teachers.repa is not None:  # -0.5 mean cos; with TREAD on the kept tokens only
        terms["repa"] = repa_loss(out.captured, repa_targets, route.keep_idx if route else None, cfg.repa.weight)
    if teachers.lpips is not None or teachers.dino is not None:  # perceptual losses see x-hat as an image
        x_hat_image, x_image = (kernels.unpatchify(patches, cfg.model.patch_size, *image_size)
                                for patches in (out.x_hat, x))
        if teachers.lpips is not None:  # 0.1 x LPIPS-VGG at half resolution
            terms["lpips"] = teachers.lpips(x_hat_image, x_image, t)
        if teachers.dino is not None:  # 0.01 x (1 - cos) of DINOv2-B tokens at 224 px
            terms["dino"] = dino_perceptual_loss(teachers.dino, x_hat_image, x_image, cfg.perceptual.dino_weight,
                                                 cfg.perceptual.dino_resolution)
    return MicroBatchLoss(terms, per_sample)
