"""x-prediction flow matching (Li & He 2025, "Back to Basics") and its Euler sampler.

docs/recipe.md section 2. Convention: t = 0 is data, t = 1 is noise, x_t = (1 - t) x + t eps.
The network predicts the clean x; the loss is taken on velocities, v = (x_t - x) / max(t, 0.05),
which weights the x error by 1 / max(t, 0.05)^2: low-noise samples count up to 400 times more.
Everything here works on any layout (the trainer uses patches, (B, L, 3*p*p)).
"""

from __future__ import annotations

from typing import Callable

import torch

import kernels
from prx.config import FlowConfig
from prx.run.log_names import T_BIN_EDGES, T_BIN_NAMES


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution shift s*t / (1 + (s - 1)*t): moves mass toward high noise for s > 1."""
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(n: int, cfg: FlowConfig, generator: torch.Generator, device=None) -> torch.Tensor:
    """(n,) training timesteps: shifted logit-normal, with a uniform share left unshifted."""
    device = device or generator.device
    logit_normal = shift_time(torch.sigmoid(torch.randn(n, generator=generator, device=device)),
                              cfg.timestep_shift)
    uniform = cfg.t_min + (1 - cfg.t_min) * torch.rand(n, generator=generator, device=device)
    use_uniform = torch.rand(n, generator=generator, device=device) < cfg.uniform_fraction
    t = torch.where(use_uniform, uniform, logit_normal)
    # [t_min, 1): the float32 value just below 1 keeps x_t from being pure noise.
    return t.clamp(cfg.t_min, 1.0 - 2.0**-24)


def flow_loss(x_hat: torch.Tensor, x: torch.Tensor, t: torch.Tensor, t_floor: float = 0.05,
              weight: torch.Tensor | None = None):
    """Velocity-space loss of an x-prediction: (mean loss, per-sample losses (B,)), fp32.

    v_hat - v = ((x_t - x_hat) - (x_t - x)) / max(t, t_floor) = (x - x_hat) / max(t, t_floor),
    so x_t is not needed. per_sample is unweighted (it feeds the per-t-bin log); the mean is
    mean_b(weight_b * per_sample_b), weight 1 when None. On CUDA tensors the fused Triton kernel
    (`kernels/flow_matching.py`: one pass forward, one backward); elsewhere the reference.
    """
    return kernels.flow_loss(x_hat, x, t, t_floor, weight)


def t_bin_index(t: torch.Tensor) -> torch.Tensor:
    """Bin of each t: 0 for [0, 0.3), 1 for [0.3, 0.6), 2 for [0.6, 1]."""
    return torch.bucketize(t.float(), torch.tensor(T_BIN_EDGES, device=t.device), right=True)


def loss_sums_by_t_bin(per_sample: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of losses, count) per t bin, shape (3,) each: accumulate, then divide for the log."""
    idx = t_bin_index(t)
    sums = torch.zeros(len(T_BIN_NAMES), device=t.device).index_add_(0, idx, per_sample.detach().float())
    counts = torch.zeros(len(T_BIN_NAMES), device=t.device).index_add_(0, idx, torch.ones_like(t.float()))
    return sums, counts


# ----------------------------------------------------------------------------- sampling


def sampling_sigmas(steps: int, shift: float, device=None) -> torch.Tensor:
    """(steps + 1,) noise levels from 1 to 0: linspace(1, 0) with the resolution shift."""
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device), shift).float()


def guided(cond: torch.Tensor, uncond: torch.Tensor, weight: float) -> torch.Tensor:
    """Classifier-free guidance on x-hat: uncond + w * (cond - uncond)."""
    return uncond + weight * (cond - uncond)


Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def euler_sample(
    denoise: Denoiser,
    noise: torch.Tensor,
    steps: int,
    shift: float,
    t_floor: float = 0.05,
    progress: Callable | None = None,
) -> torch.Tensor:
    """Integrate from noise (sigma 1) to data (sigma 0) with Euler steps on the velocity.

    `denoise(x, sigma (B,))` returns x-hat (guidance already applied); at each step
    v = (x - x_hat) / max(sigma, t_floor) and x <- x - (sigma_i - sigma_{i+1}) * v.
    """
    sigmas = sampling_sigmas(steps, shift, noise.device)
    x = noise
    indices = range(steps) if progress is None else progress(range(steps))
    for i in indices:
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x_hat = denoise(x, sigma.expand(x.shape[0]))
        velocity = (x - x_hat.to(x.dtype)) / sigma.clamp_min(t_floor)
        x = x - (sigma - sigma_next) * velocity
    return x
