"""Plots of one or more runs from their metrics.jsonl: `python -m prx.plot RUN_DIR [RUN_DIR ...]`.

Writes into <first RUN_DIR>/plots (or --out), at 120 dpi:
  loss.png        training loss: a centred mean over --smooth log points (at most a fifth of a run's
                  points, so a short run is not flattened; of the logs on a log axis), raw faint beneath
  loss_terms.png  each weighted loss term the runs logged (loss_diffusion, loss_repa, ...), one panel each
  loss_by_t.png   the diffusion loss per timestep bin (loss_t0.0-0.3, ...), one panel each: the bins
                  differ about 30x in scale (low t, little noise, is hardest to predict in velocity)
  validation.png  val_loss and the loss at each fixed timestep, when a run has "val" records
  metrics.png     fid / cmmd / dino_mmd ("metrics" records) and the shapes scores ("eval" records,
                  with the score at chance dashed), when a run has any
Several runs share every panel, one colour per run throughout, named by their folder in the legend.
A y axis is logarithmic where a series spans more than 10x (early loss is ~20x the final one).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from prx.config_rules import ConfigError, OneLineParser
from prx.run.log_names import LOSS_TERMS, T_BIN_NAMES

DPI = 120
PANEL_SIZE = (4.6, 3.4)  # inches per panel: three panels a row make a 1656 px wide image
SINGLE_SIZE = (8.0, 4.5)  # a figure of one panel (loss.png): 960 x 540 px
MAX_COLUMNS = 3
QUALITY_METRICS = ("fid", "cmmd", "dino_mmd")  # lower is better, all three
NOT_SCORES = ("shapes_count",)  # how many objects were scored: a count, not a score

Series = tuple[list[int], list[float]]


class RunDataError(ValueError):
    """A run folder with nothing to plot; the message says which and why."""


def read_records(run_dir: Path) -> list[dict]:
    """The records of <run_dir>/metrics.jsonl; a last line cut short (a run writing now) is left out."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise RunDataError(f"{path}: no such file (is {run_dir} a run folder?)")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise RunDataError(f"{path} is empty: the run has logged nothing yet")
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise RunDataError(f"{path} line {number} is not JSON") from None
    return records


def series(records: list[dict], kind: str, name: str) -> Series:
    """(steps, values) of one number in the records of a kind, by step; None and NaN/inf left out.
    A step logged twice (a resumed run that did not truncate the file) keeps its last value."""
    by_step = {}
    for r in records:
        value = r.get(name)
        if r.get("kind") == kind and "step" in r and isinstance(value, (int, float)) and math.isfinite(value):
            by_step[r["step"]] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def names_of(runs: dict[str, list[dict]], kind: str, keep) -> list[str]:
    """The fields that `keep` accepts in any record of a kind, in order of first appearance."""
    found: dict[str, None] = {}
    for records in runs.values():
        for r in records:
            if r.get("kind") == kind:
                found.update((name, None) for name, value in r.items() if keep(name) and value is not None)
    return list(found)


def smooth_curve(values: list[float], window: int, geometric: bool) -> list[float]:
    """A centred mean over `window` points (an even window counts one more; fewer at the ends):
    a trailing one lags, and drawn over a loss that falls 100x it sat far above the raw curve.
    `geometric` (a log axis) averages the logs, so one early 50 does not outweigh four 0.5s."""
    half = window // 2
    points = [math.log(v) for v in values] if geometric else values
    out = []
    for i in range(len(points)):
        part = points[max(i - half, 0):i + half + 1]
        out.append(sum(part) / len(part))
    return [math.exp(v) for v in out] if geometric else out


def timestep_of(name: str) -> float:
    """0.062 for val_loss_t0.062: validation panels go in order of noise level."""
    return float(name.removeprefix("val_loss_t"))


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Folder names; where two runs share one (runs/a/tiny, runs/b/tiny), the parent too."""
    names = [d.resolve().name for d in run_dirs]
    return [f"{d.resolve().parent.name}/{n}" if names.count(n) > 1 else n for d, n in zip(run_dirs, names)]


class Figure:
    """A grid of panels, one per (kind, name), every run drawn in its own colour."""

    def __init__(self, plt, title: str, panels: list[tuple[str, str, str]]):
        columns = min(len(panels), MAX_COLUMNS)
        rows = math.ceil(len(panels) / columns)
        size = SINGLE_SIZE if len(panels) == 1 else (PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows)
        self.plt = plt
        self.fig, axes = plt.subplots(rows, columns, figsize=size, squeeze=False)
        flat = list(axes.flat)
        for unused in flat[len(panels):]:
            unused.set_visible(False)
        if len(panels) == 1:  # the figure's title is the panel's: one line, not two
            panels = [(panels[0][0], panels[0][1], title)]
        else:
            self.fig.suptitle(title)
        self.panels = list(zip(panels, flat))  # ((kind, name, panel title), axes)
        for (_, _, panel_title), ax in self.panels:
            ax.set_title(panel_title)
            ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)

    def draw(self, runs: dict[str, list[dict]], colors: dict[str, tuple], smooth: int, markers: bool) -> None:
        for (kind, name, _), ax in self.panels:
            curves = {label: series(records, kind, name) for label, records in runs.items()}
            every_value = [v for _, values in curves.values() for v in values]
            log_y = is_wide(every_value)
            for label, (steps, values) in curves.items():
                if not steps:
                    continue
                window = min(smooth, len(values) // 5)  # at most a fifth of the points: a short run stays visible
                if window > 1:
                    ax.plot(steps, values, color=colors[label], alpha=0.3, linewidth=0.8)
                    values = smooth_curve(values, window, geometric=log_y)
                ax.plot(steps, values, color=colors[label], label=label, linewidth=1.6,
                        marker="o" if markers else None, markersize=4)
            if log_y:
                log_scale(ax, every_value)

    def save(self, path: Path) -> Path:
        legend: dict[str, object] = {}  # every run once, even one missing from the first panel
        for _, ax in self.panels:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(label, handle)
        if legend:
            self.panels[0][1].legend(list(legend.values()), list(legend), fontsize="small")
        self.fig.tight_layout()
        self.fig.savefig(path, dpi=DPI)
        self.plt.close(self.fig)
        return path


def is_wide(values: list[float]) -> bool:
    """Whether a panel's values are all positive and span more than 10x: a log y axis then."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > 10


def log_scale(ax, values: list[float]) -> None:
    """Log y labelled in plain numbers (0.5, 1, 2, 5, 10, not 5x10^-1); 2 and 5 between the
    powers of ten only where the values span under 1000x (more would crowd the axis)."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    between = max(values) / min(values) < 1000

    def minor_label(v: float, _) -> str:
        mantissa = round(v / 10 ** math.floor(math.log10(v)), 6)
        return f"{v:g}" if between and mantissa in (2, 5) else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor_label))


def draw_chance(fig: Figure, runs: dict[str, list[dict]], colors: dict[str, tuple]) -> None:
    """The shapes score of images that ignore their prompt ("chance" record), dashed, per run."""
    for (kind, name, _), ax in fig.panels:
        if kind != "eval":
            continue
        for label, records in runs.items():
            chance = next((r.get(name.removeprefix("shapes_")) for r in records if r.get("kind") == "chance"), None)
            if isinstance(chance, (int, float)):
                ax.axhline(chance, color=colors[label], linestyle="--", linewidth=1, alpha=0.7)
        ax.set_title(f"{ax.get_title()} (dashed: at chance)")


def plot_runs(run_dirs: list[Path], out: Path, smooth: int) -> list[Path]:
    """Every plot the runs' records allow, written into `out`; the paths written."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    runs = {label: read_records(Path(d)) for label, d in zip(run_labels(run_dirs), run_dirs)}
    palette = plt.get_cmap("tab10")
    colors = {label: palette(i % 10) for i, label in enumerate(runs)}
    window = f"mean of up to {smooth} log points, raw faint" if smooth > 1 else "raw"
    terms = [f"loss_{t}" for t in LOSS_TERMS if names_of(runs, "train", lambda n, t=t: n == f"loss_{t}")]
    val = sorted(names_of(runs, "val", lambda n: n.startswith("val_loss_t")), key=timestep_of)
    quality = [m for m in QUALITY_METRICS if names_of(runs, "metrics", lambda n, m=m: n == m)]
    scores = names_of(runs, "eval", lambda n: n.startswith("shapes_") and n not in NOT_SCORES)
    figures = [  # (file, title, panels, smoothed, markers)
        ("loss.png", f"training loss ({window})", [("train", "loss", "loss")], True, False),
        ("loss_terms.png", f"weighted loss terms ({window})", [("train", n, n) for n in terms], True, False),
        ("loss_by_t.png", f"diffusion loss by timestep bin ({window})",
         [("train", f"loss_{b}", f"loss at {b}") for b in T_BIN_NAMES], True, False),
        ("validation.png", "validation loss (held-out data, fixed noise)",
         [("val", n, n) for n in (["val_loss"] if names_of(runs, "val", lambda n: n == "val_loss") else []) + val],
         False, True),
        ("metrics.png", "sample quality (fid, cmmd, dino_mmd: lower is better; shapes: higher is better)",
         [("metrics", m, m) for m in quality] + [("eval", s, s) for s in scores], False, True),
    ]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for file, title, panels, smoothed, markers in figures:
        panels = [p for p in panels if any(series(records, p[0], p[1])[0] for records in runs.values())]
        if not panels:
            continue
        fig = Figure(plt, title, panels)
        fig.draw(runs, colors, smooth if smoothed else 1, markers)
        if panels[-1][0] == "eval":
            draw_chance(fig, runs, colors)
        written.append(fig.save(out / file))
    if not written:
        where = ", ".join(map(str, run_dirs))
        raise RunDataError(f"nothing to plot: no train, val, metrics or eval records in {where}")
    return written


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m prx.plot", description="Plot the metrics.jsonl of one or more runs.")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders, overlaid")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <first RUN_DIR>/plots)")
    p.add_argument("--smooth", type=int, default=5, help="smoothing window of the training curves, in log points "
                   "(1: raw); 5 of train.log_every=50 is 250 steps")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.smooth < 1:
            raise ConfigError(f"--smooth {args.smooth}: must be an integer >= 1")
        paths = plot_runs(args.run_dirs, args.out or args.run_dirs[0] / "plots", args.smooth)
    except (ConfigError, RunDataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
