"""Images out of the trainer: [-1, 1] tensors to uint8, PNG files, captioned sample grids."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] (or already uint8) -> (B, H, W, 3) uint8 numpy, quantised as
    a saved sample is, so a float image and its saved PNG score the same."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) images, got {tuple(images.shape)}")
    x = images.detach().cpu()
    if x.dtype != torch.uint8:
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
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
