"""Generate images from a trained checkpoint.

    python -m prx.eval.sample --checkpoint runs/tiny/checkpoints/step_00002000 \
        --prompt "a red circle on the left" --prompt "a blue square at the top" --out samples/

Writes one PNG per prompt (and per --count) plus a captioned grid. The model and text encoder
are the ones named in the checkpoint's config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prx.config import from_dict
from prx.eval.grids import save_grid, save_images
from prx.eval.sampling import generate
from prx.hub import PretrainedMissing
from prx.model.denoiser import PRX
from prx.run.checkpoint import CheckpointError, load_model_weights, read_meta
from prx.run.distributed import pick_device
from prx.text import TextTower


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sample images from a PRX checkpoint.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (runs/NAME/checkpoints/step_*)")
    p.add_argument("--prompt", action="append", required=True, help="caption (repeatable)")
    p.add_argument("--count", type=int, default=1, help="images per prompt")
    p.add_argument("--steps", type=int, help="Euler steps (default: the config's eval.sample_steps)")
    p.add_argument("--guidance", type=float,
                   help="classifier-free guidance weight (1 = none; default: the config's eval.guidance)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, help="image side in px, a multiple of the patch size")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", default="samples", help="output directory")
    p.add_argument("--no-ema", action="store_true", help="the trained weights, not their EMA (when saved)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    meta = read_meta(args.checkpoint)
    cfg = from_dict(meta["config"])
    size = args.size or cfg.data.resolution
    if size % cfg.model.patch_size:
        raise SystemExit(f"error: --size {size} is not a multiple of the patch size {cfg.model.patch_size}")
    device = pick_device(args.device)
    model = PRX(cfg.model)
    weights = load_model_weights(args.checkpoint, model, ema=not args.no_ema)
    print(f"{args.checkpoint}: step {meta['step']}, {'EMA' if weights == 'ema' else 'trained'} weights")
    model.to(device).eval()
    tower = TextTower(cfg.text, device)
    captions = [p for p in args.prompt for _ in range(args.count)]
    images = generate(model, tower, captions, cfg, resolution=size, steps=args.steps,
                      guidance=args.guidance, seed=args.seed)
    out = Path(args.out)
    paths = save_images(images, out, f"step{meta['step']}")
    grid = save_grid(images, captions, out / f"grid_step{meta['step']}.png")
    for path, caption in zip(paths, captions):
        print(f"{path}  {caption}")
    print(f"grid: {grid}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (CheckpointError, PretrainedMissing) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
