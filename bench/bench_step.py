"""Time one training step of the denoiser: forward, backward, clip, AdamW.

    python bench/bench_step.py --preset tiny --batch-size 64           # CPU
    python bench/bench_step.py --preset prx_small_1024 --batch-size 16  # GPU, bf16 autocast
    python bench/bench_step.py --preset prx_small_1024 --batch-size 16 --compile  # per-block compile

Inputs are random (noisy patches, timesteps, text embeddings with a padding mask), so no data
or text encoder is needed. Reports ms/step (median), images/s, achieved TFLOP/s and, on a GPU,
MFU against the measured bf16 matmul ceiling (RECIPE section 9) and peak memory. Appends one
row to bench/results/step.csv.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prx.config import apply_override, preset  # noqa: E402
from prx.flow import flow_loss  # noqa: E402
from prx.model import PRX, training_flops_per_image  # noqa: E402
from prx.parallel import apply_compile  # noqa: E402


def measure_matmul_tflops(device: torch.device) -> float:
    """bf16 8192^3 matmul throughput: the ceiling MFU is measured against."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--text-tokens", type=int, default=None, help="default: text.max_tokens")
    p.add_argument("--no-mask", action="store_true", help="all text tokens real (no padding)")
    p.add_argument("--compile", action="store_true", help="per-block torch.compile(fullgraph=True)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "step.csv"))
    args = p.parse_args()

    cfg = preset(args.preset)
    for o in args.overrides:
        cfg = apply_override(cfg, o)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = cfg.model
    b, side = args.batch_size, cfg.data.resolution // m.patch_size
    n, t_len = side * side, args.text_tokens or cfg.text.max_tokens

    model = PRX(m).to(device)
    if args.compile:
        apply_compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    x = torch.randn(b, n, m.patch_dim, device=device)
    target = torch.randn(b, n, m.patch_dim, device=device)
    t = torch.rand(b, device=device)
    text = torch.randn(b, t_len, m.text_dim, device=device)
    mask = None if args.no_mask else torch.arange(t_len, device=device)[None] < torch.randint(
        t_len // 4, t_len + 1, (b, 1), device=device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            out = model(x, t, text, mask, (side, side))
        loss, _ = flow_loss(out, target, t)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.2)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    sec = statistics.median(times)
    tflops = training_flops_per_image(m, n, t_len) * b / sec / 1e12
    row = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip(),
        "preset": cfg.preset, "resolution": cfg.data.resolution, "batch": b, "text_tokens": t_len,
        "mask": not args.no_mask, "provider": "compile" if args.compile else "eager",
        "ms_per_step": round(sec * 1e3, 2), "img_per_s": round(b / sec, 1), "tflops": round(tflops, 3),
    }
    if device.type == "cuda":
        ceiling = measure_matmul_tflops(device)
        row.update(mfu=round(tflops / ceiling, 3), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    print(", ".join(f"{k} {v}" for k, v in row.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["date", "device", "torch", "git", "preset", "resolution", "batch", "text_tokens", "mask",
              "provider", "ms_per_step", "img_per_s", "tflops", "mfu", "peak_gib"]
    new = not out.exists()
    with open(out, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow(row)


if __name__ == "__main__":
    main()
