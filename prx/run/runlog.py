"""What a run tells its user: a progress bar on a terminal, a fixed-format line, metrics JSONL.

Only rank 0 writes. Every `log_every` steps the averaged metrics go to <run_dir>/metrics.jsonl
(one JSON object per line) and to stdout as one line of fixed layout, e.g.

    step    500/1500 | loss 0.4210 | t<.3 1.920 .3-.6 0.310 >.6 0.105 | gnorm 0.84 | lr 1.0e-03 | 141 img/s

Every record's numbers, and the sample grids the evaluation saves, also go to the optional
backends (TensorBoard, W&B: prx/run/log_backends.py) the caller opened.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from prx.run.log_backends import LogBackend, record_scalars
from prx.run.log_names import LOSS_TERMS, T_BIN_NAMES


class RunLog:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool, *,
                 backends: list[LogBackend] | None = None):
        self.enabled = enabled
        self.backends = list(backends or []) if enabled else []
        self.total_steps = total_steps
        self.metrics_path = Path(run_dir) / "metrics.jsonl"
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._last_time = time.perf_counter()
        self._last_step = start_step

    def print(self, message: str) -> None:
        """A line of text that does not break the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def wrap_progress(self, description: str):
        """A function that wraps an iterable in a progress bar when one is shown."""
        show = self.enabled and sys.stderr.isatty()
        return lambda items: tqdm(items, desc=description, leave=False) if show else items

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def restart_clock(self, step: int) -> None:
        """Exclude what just happened (setup, evaluation, saving) from the next throughput."""
        self._last_time, self._last_step = time.perf_counter(), step

    def throughput(self, step: int, images_per_step: int) -> tuple[float, float]:
        """(seconds per step, images per second) since the previous call."""
        now = time.perf_counter()
        steps = max(step - self._last_step, 1)
        sec_per_step = (now - self._last_time) / steps
        self._last_time, self._last_step = now, step
        return sec_per_step, images_per_step / sec_per_step

    def write(self, record: dict) -> None:
        """Append one JSON record and send its numbers to the backends; print a formatted line
        for training records."""
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.backends and (values := record_scalars(record)):
            step = record.get("step", 0)  # the chance score has no step: it is the baseline, at 0
            for backend in self.backends:
                backend.scalars(step, values)
        if record.get("kind") == "train":
            self.print(format_train_line(record, self.total_steps))
            if self.bar is not None and record["loss"] is not None:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)

    def image(self, tag: str, step: int, path: Path) -> None:
        """A saved sample grid (PNG), to the backends; metrics.jsonl has none."""
        for backend in self.backends:
            backend.image(tag, step, path)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for backend in self.backends:
            backend.close()
        self.backends = []  # closing twice (an error path after the end) does nothing


def utilization(r: dict) -> str:
    """' | MFU 41.2% | peak 61.3 GiB' where the record has them (GPU runs; MFU needs a peak)."""
    mfu = f" | MFU {r['mfu']:.1%}" if r.get("mfu") is not None else ""
    return mfu + (f" | peak {r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") is not None else "")


def format_train_line(r: dict, total_steps: int) -> str:
    bins = " ".join(
        f"{label} {r[name]:.3f}" if r.get(name) is not None else f"{label} -"
        for label, name in zip(("t<.3", ".3-.6", ">.6"), (f"loss_{n}" for n in T_BIN_NAMES))
    )
    skipped = f" | skipped {r['skipped']} (NaN/inf)" if r.get("skipped") else ""
    if r["loss"] is None:  # no step of the window was applied
        return (f"step {r['step']:>7}/{total_steps} | every step since the last line was skipped "
                f"({r['skipped']}, NaN/inf gradient) | lr {r['lr']:.1e}")
    # the weighted terms of the recipe's loss, when there is more than the diffusion term
    terms = [(name, r[f"loss_{name}"]) for name in LOSS_TERMS if r.get(f"loss_{name}") is not None]
    parts = f" ({' '.join(f'{name} {value:.4f}' for name, value in terms)})" if len(terms) > 1 else ""
    return (
        f"step {r['step']:>7}/{total_steps} | loss {r['loss']:.4f}{parts} | {bins} | "
        f"gnorm {r['grad_norm']:.2f} | lr {r['lr']:.1e} | {r['img_per_s']:.0f} img/s | "
        f"{r['sec_per_step']:.3f} s/step{utilization(r)}{skipped}"
    )
