"""Sampling from a trained denoiser: the Euler sampler with classifier-free or TREAD self-guidance."""

from __future__ import annotations

import torch

from kernels import unpatchify
from prx import precision
from prx.config import Config
from prx.model.denoiser import PRX
from prx.model.tread import plan_route, route_seeds, self_guided
from prx.recipe.flow import euler_sample, guided
from prx.rng import per_sample_normal
from prx.text import TextTower, pad_text


@torch.no_grad()
def generate(
    model: PRX,
    tower: TextTower,
    captions: list[str],
    cfg: Config,
    *,
    resolution: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    noise_slots: list[int] | None = None,
    batch_size: int = 64,
    progress=None,
) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] for `captions`, Euler sampler with classifier-free guidance
    (or TREAD self-guidance when cfg.tread.self_guidance > 0).

    The noise of prompt i depends only on (seed, noise_slots[i]) (default slot: i), so a prompt
    set gives comparable samples at every evaluation, in any batch size and split over ranks.
    """
    resolution = resolution or cfg.data.resolution
    steps = steps or cfg.eval.sample_steps
    guidance = cfg.eval.guidance if guidance is None else guidance
    p = cfg.model.patch_size
    grid = (resolution // p, resolution // p)
    device = next(model.parameters()).device
    autocast = precision.autocast(cfg.train.precision, device)  # the run's precision
    slots = list(range(len(captions))) if noise_slots is None else noise_slots
    shape = (grid[0] * grid[1], cfg.model.patch_dim)
    noise = cfg.flow.noise_scale * per_sample_normal(shape, seed, 0, slots, torch.device("cpu"))
    # TREAD self-guidance replaces CFG when set: routed + w (dense - routed), both with the
    # prompt; each sample's routed pass keeps one selection for all steps (docs/recipe.md section 3).
    self_guidance = cfg.tread.self_guidance if cfg.tread.enabled else 0.0
    use_cfg = guidance != 1.0 and not self_guidance
    images = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        uncond_seqs = [tower.empty()] * len(chunk) if use_cfg else []
        text, mask = pad_text(tower.encode(chunk) + uncond_seqs, tower.cfg.pad_to_multiple)
        if self_guidance:
            seeds = route_seeds(seed, 0, slots[start : start + len(chunk)], device)
            route = plan_route(cfg.tread, cfg.model.depth, grid[0] * grid[1], seeds)

        def denoise(x, sigma):
            with autocast:
                if self_guidance:
                    dense = model(x, sigma, text, mask, grid).x_hat.float()
                    routed = model(x, sigma, text, mask, grid, route=route).x_hat.float()
                    return self_guided(routed, dense, self_guidance)
                if not use_cfg:
                    return model(x, sigma, text, mask, grid).x_hat.float()
                both = model(torch.cat([x, x]), torch.cat([sigma, sigma]), text, mask, grid).x_hat.float()
            cond, uncond = both.chunk(2)
            return guided(cond, uncond, guidance)

        x0 = euler_sample(denoise, noise[start : start + len(chunk)].to(device), steps,
                          cfg.flow.timestep_shift, cfg.flow.t_floor, progress)
        images.append(unpatchify(x0, p, resolution, resolution).clamp(-1, 1).cpu())
    return torch.cat(images)
