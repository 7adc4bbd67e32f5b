"""What every kernel benchmark shares: timing, the device's ceilings, and long-format CSV rows.

A row is one measurement: (op, shape, dtype, mode, provider) -> ms and GB/s or TFLOP/s, plus the
machine, library versions and git sha, so rows from different runs never get mixed up. Compare
only rows of the same device from the same run (docs/architecture.md, Tests and benchmarks).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

import kernels
from prx.run.utilization import matmul_tflops, time_ms  # noqa: F401  (the benchmarks import them from here)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FIELDS = ["date", "device", "torch", "triton", "git", "op", "shape", "dtype", "mode", "provider",
          "ms", "gbps", "tflops", "ratio", "note"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_revision() -> str:
    """The checkout's short sha; PRX_GIT_REVISION where git is missing (the GPU machine has none:
    bench/gpu_check.sh passes the sha it was given), else ""."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:  # no git executable
        done = None
    if done is not None and done.returncode == 0:
        return done.stdout.strip()
    return os.environ.get("PRX_GIT_REVISION", "")


def environment(device: torch.device) -> dict:
    """The columns that say where and with what a row was measured."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "git": git_revision(),
    }


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes): the memory-bound ceiling."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def measure(op, shape, dtype, mode, nbytes, providers, device, env, peak_gbps=None):
    """One row per provider (and a `copy` row of the same bytes); ratio = compile ms / ms;
    the note of a triton row gives its share of the copy bandwidth (1 GiB and same bytes)."""
    rows = []
    for provider, fn in providers.items():
        with kernels.pinned("triton" if provider == "triton" else "auto"):  # the CPU smoke: the interpreter
            ms = time_ms(fn, device)
        rows.append({**env, "op": op, "shape": shape, "dtype": dtype, "mode": mode, "provider": provider,
                     "ms": ms, "gbps": nbytes / (ms * 1e-3) / 1e9})
    baseline = next((r["ms"] for r in rows if r["provider"] == "compile"), None)
    copy_gbps = copy_bandwidth_gbps(device, nbytes)
    for row in rows:
        if row["provider"] == "triton":
            row["ratio"] = baseline / row["ms"] if baseline else ""
            share = f"{row['gbps'] / peak_gbps:.0%} of 1 GiB copy, " if peak_gbps else ""
            row["note"] = f"{share}{row['gbps'] / copy_gbps:.0%} of same-bytes copy"
    rows.append({**env, "op": op, "shape": shape, "dtype": dtype, "mode": mode, "provider": "copy",
                 "ms": nbytes / copy_gbps / 1e6, "gbps": copy_gbps, "note": "device copy of the same bytes"})
    return rows


def measure_and_record(name: str, cases, device: torch.device, out_dir: str | None) -> None:
    """The main loop of a memory-bound benchmark: `cases` yields (op, shape, dtype, mode, nbytes,
    providers); each is measured (`measure`), printed, and appended to `<out_dir>/<name>.csv`."""
    env = environment(device)
    peak = None
    if device.type == "cuda":
        peak = copy_bandwidth_gbps(device)
        print(f"device copy bandwidth (1 GiB): {peak:.0f} GB/s")
    rows = []
    for op, shape, dtype, mode, nbytes, providers in cases:
        new = measure(op, shape, dtype, mode, nbytes, providers, device, env, peak)
        for row in new:
            print(format_row(row) + (f"  ({row['note']})" if row["provider"] == "triton" else ""))
        rows += new
    print(f"rows appended to {append_rows(name, rows, Path(out_dir) if out_dir else None)}")


def kernel_bench_arguments(description: str) -> argparse.Namespace:
    """The command line every kernel benchmark shares: --smoke, --providers, --out-dir."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="tiny shape (CPU: the Triton interpreter)")
    parser.add_argument("--providers", default="torch,compile,triton")
    parser.add_argument("--out-dir", default=None, help="CSV folder (default bench/results/)")
    return parser.parse_args()


def append_csv(path: Path, fields: list[str], rows: list[dict]) -> Path:
    """Append rows to the CSV at `path`, writing the header once; a file with other columns is
    refused (appending would misalign every row)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), None)
        if header != fields:
            raise SystemExit(f"{path} has the columns {header}, not {fields}; move it aside")
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in fields} for row in rows)
    return path


def append_rows(name: str, rows: list[dict], out_dir: Path | None = None) -> Path:
    """Append kernel-benchmark rows to `<out_dir>/<name>.csv` (default bench/results/)."""
    return append_csv(Path(out_dir or RESULTS) / f"{name}.csv", FIELDS, rows)


def format_row(row: dict) -> str:
    rate = f"{row['gbps']:.0f} GB/s" if row.get("gbps") else f"{row.get('tflops', 0):.1f} TFLOP/s"
    ratio = f"  x{row['ratio']:.2f} vs compile" if row.get("ratio") else ""
    return f"{row['op']:<16}{row['shape']:<26}{row['mode']:<6}{row['provider']:<9}{row['ms']:>9.3f} ms  {rate}{ratio}"
