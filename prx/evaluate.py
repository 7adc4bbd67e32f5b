"""Sampling from a trained denoiser, sample grids, and the shapes prompt-following score."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from kernels.ref import unpatchify
from prx.config import Config
from prx.flow import euler_sample, guided
from prx.model import PRX
from prx.rng import per_sample_normal
from prx.text import TextTower, pad_text
from prx.tread import plan_route, route_seeds, self_guided


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
    steps = steps or cfg.flow.sample_steps
    guidance = cfg.flow.guidance if guidance is None else guidance
    p = cfg.model.patch_size
    grid = (resolution // p, resolution // p)
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
    slots = list(range(len(captions))) if noise_slots is None else noise_slots
    shape = (grid[0] * grid[1], cfg.model.patch_dim)
    noise = cfg.flow.noise_scale * per_sample_normal(shape, seed, 0, slots, torch.device("cpu"))
    # TREAD self-guidance replaces CFG when set: routed + w (dense - routed), both with the
    # prompt; each sample's routed pass keeps one selection for all steps (RECIPE section 3).
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
                    dense = model(x, sigma, text, mask, grid).float()
                    routed = model(x, sigma, text, mask, grid, route=route).float()
                    return self_guided(routed, dense, self_guidance)
                if not use_cfg:
                    return model(x, sigma, text, mask, grid).float()
                both = model(torch.cat([x, x]), torch.cat([sigma, sigma]), text, mask, grid).float()
            cond, uncond = both.chunk(2)
            return guided(cond, uncond, guidance)

        x0 = euler_sample(denoise, noise[start : start + len(chunk)].to(device), steps,
                          cfg.flow.timestep_shift, cfg.flow.t_floor, progress)
        images.append(unpatchify(x0, p, resolution, resolution).clamp(-1, 1).cpu())
    return torch.cat(images)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def save_grid(images: torch.Tensor, captions: list[str], path: Path, columns: int = 4,
              cell: int = 160) -> Path:
    """A PNG grid: each image upscaled (nearest) to `cell` px with its caption underneath."""
    pixels = to_uint8(images)
    font = ImageFont.load_default()
    text_height = 4 * 12
    rows = -(-len(pixels) // columns)
    sheet = Image.new("RGB", (columns * cell, rows * (cell + text_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, caption) in enumerate(zip(pixels, captions)):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_height)
        sheet.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (x, y))
        lines = textwrap.wrap(caption, width=cell // 6)[:4]
        draw.multiline_text((x + 2, y + cell + 1), "\n".join(lines), fill="black", font=font, spacing=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def save_images(images: torch.Tensor, directory: Path, stem: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(to_uint8(images)):
        path = directory / f"{stem}_{i:03d}.png"
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths
