"""Where a run's numbers go besides metrics.jsonl: TensorBoard and Weights & Biases, both optional.

metrics.jsonl stays the record (prx.plot reads it); a backend receives the same numbers as tagged
scalars, `<kind>/<name>` (`train/loss`, `train/loss_t0.0-0.3`, `val/val_loss_t0.062`,
`metrics/fid`, `eval/shapes_all`), the sample grids the evaluation saves, and the resolved config
once at start. Neither package is needed to train: each is imported only when asked for, and a
missing one stops the run at setup with one line saying what to install or which option turns it off.

W&B offline writes <run_dir>/wandb/offline-run-*/ and contacts nothing (`wandb sync` uploads it
later); its init and finish took about 0.6 s and 0.1 s here (wandb 0.31, CPU). The run id lives in
<run_dir>/wandb_id.txt, so a resumed run logs into the same W&B run instead of starting another.
"""

from __future__ import annotations

import json
import math
import secrets
from pathlib import Path
from typing import Protocol

from prx.config_rules import ConfigError

SKIPPED_KEYS = ("kind", "step")  # what a record says about itself, not a value to plot


class LogBackend(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def image(self, tag: str, step: int, path: Path) -> None: ...

    def config(self, config: dict) -> None: ...

    def close(self) -> None: ...


def record_scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record's numbers, tagged `<kind>/<name>`; None (a window without applied
    steps has loss None), NaN/inf, bools and text left out."""
    kind = record.get("kind", "other")
    return {f"{kind}/{name}": float(value) for name, value in record.items()
            if name not in SKIPPED_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


def read_png(path: Path):
    """A PNG as a uint8 HWC RGB array (grids may be saved as RGBA or grey)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


class TensorBoardBackend:
    """Event files in <run_dir>/tensorboard (`tensorboard --logdir RUN_DIR/tensorboard`)."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def image(self, tag: str, step: int, path: Path) -> None:
        self.writer.add_image(tag, read_png(path), global_step=step, dataformats="HWC")

    def config(self, config: dict) -> None:
        # the text plugin renders markdown with fenced code: the nested config stays readable JSON
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def close(self) -> None:
        self.writer.close()


def wandb_run_id(run_dir: Path) -> str:
    """The W&B id of this run dir, made on first use and kept in <run_dir>/wandb_id.txt."""
    path = Path(run_dir) / "wandb_id.txt"
    if path.exists():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # 8 hex digits; W&B ids are unique within a project
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


class WandbBackend:
    """A W&B run in <run_dir>/wandb; `offline` writes files only, `online` uploads as it goes."""

    def __init__(self, run_dir: Path, mode: str, project: str, run_name: str):
        import wandb

        self.wandb = wandb
        # silent: our own lines are the run's output; console off: W&B would otherwise wrap
        # stdout/stderr (and the progress bar) to upload them, which metrics.jsonl already has
        settings = wandb.Settings(silent=True, console="off")
        self.run = wandb.init(dir=str(run_dir), mode=mode, project=project, name=run_name,
                              id=wandb_run_id(run_dir), resume="allow", settings=settings)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def image(self, tag: str, step: int, path: Path) -> None:
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)  # a resumed run may change e.g. train.steps

    def close(self) -> None:
        self.run.finish()


def open_backends(tensorboard: bool, wandb: str, wandb_project: str, run_dir: Path, config: dict) -> list[LogBackend]:
    """The backends the config asks for (train.tensorboard, train.wandb: off | offline | online),
    opened, with the config logged; ConfigError naming the package and the way out if one is missing."""
    backends: list[LogBackend] = []
    try:
        if tensorboard:
            try:
                backends.append(TensorBoardBackend(run_dir))
            except ImportError:
                raise ConfigError("train.tensorboard=true needs TensorBoard: pip install tensorboard "
                                  "(or turn it off: --set train.tensorboard=false)") from None
        if wandb != "off":
            try:
                backends.append(WandbBackend(run_dir, wandb, wandb_project, Path(run_dir).name))
            except ImportError:
                raise ConfigError(f"train.wandb={wandb} needs Weights & Biases: pip install wandb "
                                  "(or turn it off: --set train.wandb=off)") from None
        for backend in backends:
            backend.config(config)
    except BaseException:
        for backend in backends:  # the run will not start: leave no writer open
            backend.close()
        raise
    return backends
