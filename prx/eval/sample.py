"""Generate images from a trained checkpoint, or from a folder `python -m prx.export` wrote.

    python -m prx.eval.sample --checkpoint runs/tiny/checkpoints/step_00002000 \
        --prompt "a red circle on the left" --prompt "a blue square at the top" --out samples/

Writes one PNG per prompt (and per --count) plus a captioned grid. The model and text encoder
are the ones named in the checkpoint's config (an export keeps it in prx_export.json). Every
argument is checked, with the trainer's rules for the same settings (`prx.config.FIELD_RULES`),
before the model or the text encoder loads: a bad one stops with one line, `error: ...`, and
exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prx.config import FIELD_RULES, Config, OneLineParser, from_dict
from prx.config_rules import NAME, ConfigError, check_value, integer
from prx.eval.grids import save_grid, save_images
from prx.eval.sampling import generate
from prx.hub import PretrainedMissing
from prx.model.denoiser import PRX
from prx.run.checkpoint import CheckpointError, latest_checkpoint, load_model_weights, read_meta
from prx.run.distributed import pick_device
from prx.run.init_weights import load_initial_weights
from prx.text import TextTower

USER_ERRORS = (ConfigError, CheckpointError, PretrainedMissing)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m prx.eval.sample", description="Sample images from a PRX checkpoint.")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint directory (runs/NAME/checkpoints/step_*) or a python -m prx.export folder")
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


def check_args(args: argparse.Namespace) -> None:
    """The arguments that need no checkpoint, by the rules of the config fields they stand for."""
    for prompt in args.prompt:
        check_value("--prompt", prompt, NAME)
    check_value("--count", args.count, integer(ge=1))
    if args.steps is not None:
        check_value("--steps", args.steps, FIELD_RULES["eval.sample_steps"])
    if args.guidance is not None:
        check_value("--guidance", args.guidance, FIELD_RULES["eval.guidance"])
    if args.size is not None:
        check_value("--size", args.size, integer(ge=1))
    check_value("--seed", args.seed, FIELD_RULES["eval.seed"])
    check_value("--device", args.device, FIELD_RULES["train.device"])
    check_value("--out", args.out, FIELD_RULES["train.run_dir"])


CHECKPOINT_HINT = "pass a checkpoint directory, RUN/checkpoints/step_N"
EXPORT_RECORD = "prx_export.json"  # what python -m prx.export writes next to the diffusers files


def checkpoint_problem(path: Path, hint: str = CHECKPOINT_HINT, option: str = "--checkpoint") -> str | None:
    """Why `path` is not a checkpoint directory, with the path to pass instead; None if it is one."""
    if (path / "meta.pt").is_file():
        return None
    if not path.exists():
        return f"{option}={path}: no such directory; {hint}"
    if path.is_file():
        return f"{option}={path} is a file; {hint}"
    latest = latest_checkpoint(path) if (path / "checkpoints").is_dir() else None
    if latest is not None:
        return f"{option}={path} is a run directory; pass one of its checkpoints, e.g. {latest}"
    return f"{option}={path} is not a checkpoint (it has no meta.pt); {hint}"


def weights_problem(path: Path, option: str = "--checkpoint") -> str | None:
    """Why `path` (given as `option`) is neither a checkpoint nor an export folder (one line), or None."""
    if (path / EXPORT_RECORD).is_file():
        return None
    diffusers_files = ("model_index.json", "diffusion_pytorch_model.safetensors",
                       "diffusion_pytorch_model.safetensors.index.json")
    if any((path / name).is_file() for name in diffusers_files):
        return (f"{option}={path} is a diffusers folder without {EXPORT_RECORD} (not written by python -m "
                "prx.export, so the run's settings are unknown): sample it with diffusers' PRXPixelPipeline, or "
                "start a run from it with train.py --init-from")
    return checkpoint_problem(path, CHECKPOINT_HINT + ", or a folder written by python -m prx.export", option)


def read_settings(path: Path) -> tuple[Config, int, dict | None]:
    """(the run's config, the step, the export record or None) of a checkpoint or an export folder;
    reads no weights."""
    if (path / EXPORT_RECORD).is_file():
        record = json.loads((path / EXPORT_RECORD).read_text())
        return from_dict(record["config"]), record["step"], record
    meta = read_meta(path)
    return from_dict(meta["config"]), meta["step"], None


def load_weights(path: Path, model: PRX, record: dict | None, ema: bool) -> str:
    """Fill `model` from the checkpoint (EMA weights when saved and `ema`) or from the export folder
    of `record` (its one set of weights); returns a line saying which."""
    if record is None:
        weights = load_model_weights(path, model, ema=ema)
        return f"{path}: step {read_meta(path)['step']}, {'EMA' if weights == 'ema' else 'trained'} weights"
    load_initial_weights(path, model, log=lambda line: None)
    return f"{path}: export of step {record['step']}, {'EMA' if record['weights'] == 'ema' else 'trained'} weights"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    problem = weights_problem(Path(args.checkpoint))
    if problem:
        raise ConfigError(problem)
    cfg, step, record = read_settings(Path(args.checkpoint))
    if args.no_ema and record is not None and record["weights"] == "ema":
        raise ConfigError(f"--no-ema: the export {args.checkpoint} holds only EMA weights; pass the checkpoint "
                          f"it came from ({record['checkpoint']})")
    size = args.size or cfg.data.resolution
    if size % cfg.model.patch_size:
        raise ConfigError(f"--size={size}: must be a multiple of the checkpoint's model.patch_size="
                          f"{cfg.model.patch_size}")
    device = pick_device(args.device, option="--device")
    model = PRX(cfg.model)
    print(load_weights(Path(args.checkpoint), model, record, ema=not args.no_ema))
    model.to(device).eval()
    tower = TextTower(cfg.text, device)
    captions = [p for p in args.prompt for _ in range(args.count)]
    images = generate(model, tower, captions, cfg, resolution=size, steps=args.steps,
                      guidance=args.guidance, seed=args.seed)
    out = Path(args.out)
    paths = save_images(images, out, f"step{step}")
    grid = save_grid(images, captions, out / f"grid_step{step}.png")
    for path, caption in zip(paths, captions):
        print(f"{path}  {caption}")
    print(f"grid: {grid}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`python -m prx.eval.sample`: a user's mistake is one line on stderr (`error: ...`) and exit
    status 2, never a traceback."""
    try:
        return main(argv)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
