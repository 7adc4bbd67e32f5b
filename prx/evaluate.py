"""Score a trained model: validation loss, FID / CMMD / DINO-MMD on held-out data, the shapes score.

    python -m prx.evaluate runs/prx_small_512/checkpoints/step_00100000 --metrics fid,cmmd,dino_mmd \
        --set data.val_path=/data/val --set eval.inception=/weights/pt_inception-2015-12-05-6726825d.pth
    python -m prx.evaluate runs/tiny/checkpoints/step_00002000 --shapes --no-val --set eval.guidance=2
    torchrun --nproc-per-node 8 -m prx.evaluate EXPORT_FOLDER --samples 10000   # the work split over GPUs

MODEL is a checkpoint directory (its EMA weights when saved) or a folder `python -m prx.export`
wrote. The settings are the run's (its config), with --set on top (held-out data, feature
networks, sampling steps and guidance, TREAD self-guidance); the same code as the trainer's
evaluations (`prx.eval.validation`, `prx.eval.quality`, `prx.eval.periodic.ShapesEvaluation`),
so a number here and one in a run's log compare.
Writes the results as JSON (--out, default MODEL/evaluation.json) and prints them. A bad
argument or a missing feature network is one line, `error: ...`, exit status 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from prx.config import ConfigError, OneLineParser, apply_override, metric_names, validate
from prx.data.heldout import HeldOut
from prx.data.shards import ShardError
from prx.eval.periodic import ShapesEvaluation
from prx.eval.quality import QualityMetrics
from prx.eval.sample import load_weights, read_settings, weights_problem
from prx.eval.validation import ValidationLoss
from prx.hub import PretrainedMissing
from prx.model.denoiser import PRX
from prx.run.checkpoint import CheckpointError
from prx.run.distributed import init_distributed, shutdown
from prx.text import TextTower

USER_ERRORS = (ConfigError, CheckpointError, PretrainedMissing, ShardError)


class _Printer:
    """What the evaluations log through: lines on rank 0, records kept."""

    def __init__(self, enabled: bool):
        self.enabled, self.records = enabled, []

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def write(self, record: dict) -> None:
        self.records.append(record)

    def image(self, tag: str, step: int, path: Path) -> None:
        """Grids stay where they were saved."""


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m prx.evaluate", description="Validation loss and quality metrics of a model.")
    p.add_argument("model", help="a checkpoint directory (RUN/checkpoints/step_N) or a python -m prx.export folder")
    p.add_argument("--metrics", help="comma list of fid, cmmd, dino_mmd (default: the run's eval.metrics)")
    p.add_argument("--samples", type=int, help="images per metric (default: the run's eval.metrics_samples)")
    p.add_argument("--shapes", action="store_true",
                   help="the shapes score of the held-out prompts (a model trained on the shapes set)")
    p.add_argument("--no-val", action="store_true", help="skip the validation loss")
    p.add_argument("--no-ema", action="store_true", help="the trained weights, not their EMA (when saved)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a setting of the run's config (repeatable), e.g. data.val_path=DIR")
    p.add_argument("--out", help="results JSON (default: MODEL/evaluation.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model_path = Path(args.model)
    if problem := weights_problem(model_path, option="MODEL"):
        raise ConfigError(problem)
    cfg, step, record = read_settings(model_path)
    for assignment in args.set:
        cfg = apply_override(cfg, assignment)
    overrides = {"device": args.device}
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **overrides))
    eval_overrides = {}
    if args.metrics is not None:
        eval_overrides["metrics"] = args.metrics
    if args.samples is not None:
        eval_overrides["metrics_samples"] = args.samples
    cfg = validate(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **eval_overrides)))
    if not metric_names(cfg.eval.metrics) and args.no_val and not args.shapes:
        raise ConfigError("nothing to evaluate: --no-val, no --shapes and no --metrics (choose from fid, cmmd, "
                          "dino_mmd)")
    if args.shapes and cfg.data.source != "shapes":
        raise ConfigError(f"--shapes scores a model trained on the shapes set; this one was trained on "
                          f"data.source={cfg.data.source}")

    dist = init_distributed(cfg.train.device)
    out = _Printer(dist.is_main)
    heldout = HeldOut(cfg)
    if not heldout.available:
        raise ConfigError(f"{heldout.describe()}: pass --set data.val_path=SHARDS")
    quality = QualityMetrics(cfg, heldout, dist, dist.device, out.print) if cfg.eval.metrics else None
    model = PRX(cfg.model)
    out.print(load_weights(model_path, model, record, ema=not args.no_ema))
    model.to(dist.device).eval()
    tower = TextTower(cfg.text, dist.device)
    results: dict = {"model": str(model_path), "step": step, "heldout": heldout.describe()}
    if not args.no_val:
        validation = ValidationLoss(cfg, heldout, tower, dist, out, batch_size=64)
        out.print(validation.describe())
        results.update({k: v for k, v in validation(model, step).items() if k not in ("kind", "step")})
    if quality is not None:
        out.print(quality.describe())
        if (metrics := quality(model, tower, step)) is not None:
            results.update({k: v for k, v in metrics.items() if k not in ("kind", "step")})
    path = Path(args.out) if args.out else model_path / "evaluation.json"
    if args.shapes:  # its grid: samples/step_N.png beside the results
        ShapesEvaluation(cfg, tower, dist, path.parent, out)(model, step, last=False)
        results.update({k: v for k, v in out.records[-1].items() if k not in ("kind", "step")})
        results["sampling"] = {"steps": cfg.eval.sample_steps, "guidance": cfg.eval.guidance,
                               "self_guidance": cfg.tread.self_guidance if cfg.tread.enabled else 0.0}
    if dist.is_main:
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results: {path}")
    shutdown()
    return 0


def cli(argv: list[str] | None = None) -> int:
    """A user's mistake is one line on stderr (`error: ...`) and exit status 2, never a traceback."""
    try:
        return main(argv)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
