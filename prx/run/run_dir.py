"""Who may write in a run directory, and where a run in it starts: decided before any work.

A run directory belongs to one run: its config.json, metrics.jsonl, samples and checkpoints.

- A new run (no `--resume`) in a directory that already holds checkpoints is refused, with
  the two ways on: continue that run with `--resume auto`, or use a fresh `--run-dir`. (Starting
  over there would mix two runs' metrics and, once pruning starts, delete one run's checkpoints.)
- `--resume auto` continues from the newest complete checkpoint (`latest`, or when that pointer
  is missing the most recently written one), or from step 0 when there is none.
- A resumed run must be the same run: the settings that decide the weights' shapes, the data
  order and the random draws are compared with the checkpoint's, and every difference is named.
- metrics.jsonl then describes one history: resuming at step S drops the records of steps after
  S (the steps that will be trained again, identically), and a run that starts at step 0 beside
  an earlier attempt's metrics (which left no checkpoint) keeps that file as metrics.jsonl.1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prx.config import Config, ConfigError, from_dict
from prx.run.checkpoint import checkpoint_dir, latest_checkpoint, verify_checkpoint

# The settings a resumed run must share with its checkpoint: the weights' and the optimizer
# state's shapes (model, text width, REPA projector, EMA, optimizer), the data order (seed, data
# set, batch size) and every per-step draw (seed).
SAME_RUN_FIELDS = (
    "model", "text", "train.seed", "train.batch_size", "optim.name", "ema.enabled",
    "repa.enabled", "repa.projector_dim", "repa.teacher_dim",
    "data.source", "data.path", "data.resolution", "data.shapes_length", "data.buckets", "data.crop",
    "data.caption_key",
)


def check_writable(run_dir: Path) -> None:
    """The run directory exists, or can be made, and takes files; else one line that says why."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"train.run_dir={run_dir} is a file, not a directory; pick another --run-dir")
    probe = run_dir / f".prx_write_test.{os.getpid()}"  # one per process: ranks probe at once
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"train.run_dir={run_dir} cannot be written ({err.strerror or err}); "
                          "pick another --run-dir") from None


def resume_point(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint this run continues from (verified intact), or None to start at step 0."""
    if resume == "auto":
        path = latest_checkpoint(run_dir)
    elif resume:
        path = Path(resume)
    else:
        existing = sorted(p.name for p in checkpoint_dir(run_dir).glob("step_*")) if run_dir.is_dir() else []
        if existing:
            raise ConfigError(f"{run_dir} already holds checkpoints of a run (newest name {existing[-1]}); "
                              "continue that run with --resume auto, or start a new one with a fresh --run-dir")
        return None
    if path is not None:
        verify_checkpoint(path)  # damaged files stop here, before anything is read from them
    return path


def check_same_run(saved: dict, cfg: Config, path: Path) -> None:
    """Every SAME_RUN_FIELDS value of the checkpoint's config against this run's."""
    before, now = from_dict(saved).to_dict(), cfg.to_dict()
    differences = []
    for name in SAME_RUN_FIELDS:
        section, _, key = name.partition(".")
        pairs = [(key, before[section][key], now[section][key])] if key else [
            (field, before[section][field], now[section][field]) for field in now[section]]
        differences += [f"{section}.{field} {old!r} -> {new!r}" for field, old, new in pairs if old != new]
    if differences:
        raise ConfigError(f"checkpoint {path} belongs to a run with other settings ({', '.join(differences)}); "
                          "resume with the checkpoint's values, or start a new run with a fresh --run-dir")


def settle_metrics(run_dir: Path, start_step: int) -> str | None:
    """Make metrics.jsonl the history of this run up to `start_step` (see the module docstring);
    returns a line for the log when something was set aside."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    if start_step == 0:
        number = 1
        while path.with_name(f"metrics.jsonl.{number}").exists():
            number += 1
        aside = path.with_name(f"metrics.jsonl.{number}")
        os.replace(path, aside)
        return f"metrics of an earlier attempt without a checkpoint kept as {aside}"
    lines = path.read_text().splitlines()
    kept = [line for line in lines if _record_step(line) <= start_step]
    if len(kept) != len(lines):
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return None


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return 1 << 62  # a line cut short by a crash (the last one written): dropped
