"""How well a run uses its GPU: peak memory and MFU, for the log line (and bench/, which shares them).

MFU = achieved matmul FLOP/s / the GPU's peak. The FLOPs are `training_flops_per_image` (the
one count bench/bench_step.py uses too), with TREAD's routed blocks at their kept tokens, so a
routed step gets no credit for work it skipped. The peak is `train.peak_tflops`, or else a bf16
8192^3 matmul measured once at start (~1 s): the ceiling this GPU, clock and driver reach,
rather than a datasheet number (the H100 SXM sheet says 989 TFLOP/s dense; cuBLAS reaches less).
A CPU run shows no MFU unless a peak is configured.
"""

from __future__ import annotations

import statistics
import time

import torch

from prx.config import Config
from prx.model.denoiser import training_flops_per_image
from prx.model.tread import kept_count


def time_ms(fn, device: torch.device, reps: int = 50) -> float:
    """Median milliseconds of `fn()`: triton's do_bench on a GPU, wall clock on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=max(reps, 20), return_mode="median"))
    fn()  # warm up (first-call compilation, allocator)
    times = []
    for _ in range(max(3, min(reps, 10))):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def matmul_tflops(device: torch.device, n: int = 8192) -> float:
    """bf16 n^3 matmul throughput: the matmul-bound ceiling."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def step_flops(cfg: Config, image_tokens: int, text_tokens: int, batch_size: int) -> float:
    """Matmul FLOPs of one training step of `batch_size` images (all ranks), TREAD included."""
    routed = 0
    kept = None
    if cfg.tread.enabled:
        first, last = cfg.tread.blocks(cfg.model.depth)
        routed, kept = last - first + 1, kept_count(image_tokens, cfg.tread.probability)
    return batch_size * training_flops_per_image(cfg.model, image_tokens, text_tokens, routed, kept)


class Utilization:
    """Peak memory since the last log line and MFU of the steps in it; `peak_tflops` per GPU
    (None: no MFU)."""

    def __init__(self, cfg: Config, device: torch.device, world_size: int):
        self.cfg, self.device, self.world_size = cfg, device, world_size
        self.peak_tflops = cfg.train.peak_tflops or (matmul_tflops(device) if device.type == "cuda" else None)
        self.flops, self.steps = 0.0, 0  # since the last log line

    def describe(self) -> str:
        if self.peak_tflops is None:
            return "MFU: not shown on the CPU (set train.peak_tflops to see it)"
        source = "configured" if self.cfg.train.peak_tflops else "measured, bf16 8192^3 matmul"
        return f"MFU against {self.peak_tflops:.0f} TFLOP/s per GPU ({source})"

    def add_step(self, image_tokens: int, text_tokens: int) -> None:
        self.flops += step_flops(self.cfg, image_tokens, text_tokens, self.cfg.train.batch_size)
        self.steps += 1

    def take(self, sec_per_step: float) -> dict:
        """{"peak_mem_gib", "mfu"} of the steps since the last call (their mean FLOPs over the
        log's `sec_per_step`); starts the next window."""
        record = {"peak_mem_gib": None, "mfu": None}
        if self.device.type == "cuda":
            record["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.peak_tflops and self.steps and sec_per_step > 0:
            achieved = self.flops / self.steps / sec_per_step / 1e12 / self.world_size  # per GPU
            record["mfu"] = round(achieved / self.peak_tflops, 4)
        self.flops, self.steps = 0.0, 0
        return record
