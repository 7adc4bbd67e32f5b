"""Benchmark the fused losses (kernels/flow_matching.py, lpips_head.py, cosine.py) against their
references, eager and compiled.

    python -m bench.bench_losses                       # GPU: the recipe's shapes, bf16
    python -m bench.bench_losses --smoke --out-dir /tmp/b   # CPU: tiny shapes, interpreter

Ops and shapes (batch 16, docs/recipe.md sections 2, 4, 5):
  flow    x-hat bf16 / x fp32 patches at 512 px (256 x 3072) and 1024 px (1024 x 3072)
  lpips   the five VGG16 LPIPS layers of images downsampled 0.5x (256 px and 512 px inputs:
          relu1_2 ... relu5_3 at full, 1/2, 1/4, 1/8, 1/16 of that), bf16, summed
  cosine  REPA: 256 and 1024 tokens x 1024 dims, bf16, no mask
Providers: torch (eager reference), compile (torch.compile of the reference: the baseline),
triton. Modes: fwd (with inputs that require grad, as in training), bwd (the backward alone),
full. GB/s counts the bytes an op cannot avoid (fwd: read both inputs; bwd: read both, write
the gradient); the triton rows add the ratio to compile and the fraction of the measured copy
bandwidth. Rows go to <out-dir>/losses.csv (default bench/results/).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch._functorch.config as functorch_config

import kernels
from bench.common import append_rows, copy_bandwidth_gbps, environment, format_row, time_ms
from kernels import ref

LPIPS_CHANNELS = (64, 128, 256, 512, 512)


@dataclass
class Case:
    op: str
    shape: str
    dtype: str
    make: Callable[[], tuple[torch.Tensor, tuple]]  # -> (leaf that gets the gradient, other args)
    loss: dict[str, Callable]  # provider -> fn(leaf, *args) -> scalar loss
    fwd_bytes: int
    bwd_bytes: int


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def flow_case(batch: int, tokens: int, dim: int, device, lowp) -> Case:
    def make():
        x = torch.randn(batch, tokens, dim, device=device)
        x_hat = (x + 0.1 * torch.randn_like(x)).to(lowp).requires_grad_(True)
        t = torch.rand(batch, device=device)
        return x_hat, (x, t)

    x_hat, (x, _) = make()
    return Case(
        "flow_loss", f"{batch}x{tokens}x{dim}", f"{lowp}/fp32".replace("torch.", ""), make,
        {"ref": lambda xh, x, t: ref.flow_loss(xh, x, t)[0],
         "triton": lambda xh, x, t: kernels.flow_loss(xh, x, t)[0]},
        _nbytes(x_hat, x), 2 * _nbytes(x_hat) + _nbytes(x),
    )


def lpips_case(batch: int, size: int, device, dtype) -> Case:
    sizes = [size >> i for i in range(5)]

    def make():
        g = torch.Generator(device).manual_seed(0)
        targets = [torch.randn(batch, c, s, s, device=device, generator=g).relu().to(dtype)
                   for c, s in zip(LPIPS_CHANNELS, sizes)]
        preds = [(t.float() + 0.3 * torch.randn(t.shape, device=device, generator=g)).relu().to(dtype)
                 for t in targets]
        weights = [torch.rand(c, device=device, generator=g) for c in LPIPS_CHANNELS]
        leaf = torch.cat([p.reshape(-1) for p in preds]).requires_grad_(True)
        return leaf, (targets, weights)

    def split(leaf, targets):  # the five pred layers as views of one leaf (one gradient)
        out, start = [], 0
        for t in targets:
            out.append(leaf[start:start + t.numel()].view(t.shape))
            start += t.numel()
        return out

    leaf, (targets, _) = make()
    return Case(
        "lpips_5layers", f"{batch}x3x{2 * size}px/2", str(dtype).replace("torch.", ""), make,
        {"ref": lambda leaf, targets, weights: ref.lpips_distance(split(leaf, targets), targets, weights).mean(),
         "triton": lambda leaf, targets, weights: kernels.lpips_distance(split(leaf, targets), targets,
                                                                        weights).mean()},
        2 * _nbytes(leaf), 3 * _nbytes(leaf),
    )


def cosine_case(batch: int, tokens: int, dim: int, device, dtype) -> Case:
    def make():
        b = torch.randn(batch, tokens, dim, device=device, dtype=dtype)
        a = (b.float() + torch.randn(b.shape, device=device)).to(dtype).requires_grad_(True)
        return a, (b,)

    a, (b,) = make()
    return Case(
        "cosine_align", f"{batch}x{tokens}x{dim}", str(dtype).replace("torch.", ""), make,
        {"ref": lambda a, b: -0.5 * ref.cosine_alignment(a, b)[0],
         "triton": lambda a, b: -0.5 * kernels.cosine_alignment(a, b)[0]},
        2 * _nbytes(a), 3 * _nbytes(a),
    )


def cases(smoke: bool, device) -> list[Case]:
    if smoke:  # fp32: bf16 arithmetic is wrong under the interpreter
        f32 = torch.float32
        return [flow_case(2, 4, 48, device, f32), lpips_case(2, 16, device, f32),
                cosine_case(2, 8, 64, device, f32)]
    bf16 = torch.bfloat16
    return [flow_case(16, 256, 3072, device, bf16), flow_case(16, 1024, 3072, device, bf16),
            lpips_case(16, 256, device, bf16), lpips_case(16, 512, device, bf16),
            cosine_case(16, 256, 1024, device, bf16), cosine_case(16, 1024, 1024, device, bf16)]


def measure(case: Case, providers: list[str], modes: list[str], device, reps: int) -> list[dict]:
    leaf, args = case.make()
    fns = {"torch": case.loss["ref"], "triton": case.loss["triton"]}
    if "compile" in providers:
        fns["compile"] = torch.compile(case.loss["ref"], fullgraph=True, dynamic=False)
    rows = []
    for provider in providers:
        with kernels.pinned("triton" if provider == "triton" else "auto"):  # the CPU smoke: the interpreter
            rows += _measure_provider(case, provider, fns[provider], leaf, args, modes, device, reps)
    return rows


def _measure_provider(case: Case, provider: str, fn, leaf, args, modes, device, reps) -> list[dict]:
    """fwd, bwd (on a retained graph of a fresh forward) and full of one provider."""
    loss = fn(leaf, *args)  # warm up (and compile) outside the timing
    torch.autograd.grad(loss, leaf)
    timed = {
        "fwd": lambda: fn(leaf, *args),
        "bwd": lambda: torch.autograd.grad(loss, leaf, retain_graph=True),
        "full": lambda: torch.autograd.grad(fn(leaf, *args), leaf),
    }
    rows = []
    for mode in modes:
        if mode == "bwd":
            loss = fn(leaf, *args)
        ms = time_ms(timed[mode], device, reps)
        nbytes = {"fwd": case.fwd_bytes, "bwd": case.bwd_bytes, "full": case.fwd_bytes + case.bwd_bytes}[mode]
        rows.append({"op": case.op, "shape": case.shape, "dtype": case.dtype, "mode": mode,
                     "provider": provider, "ms": ms, "gbps": nbytes / (ms * 1e-3) / 1e9})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny fp32 shapes (CPU, interpreter)")
    p.add_argument("--ops", default="flow_loss,lpips_5layers,cosine_align")
    p.add_argument("--providers", default="torch,compile,triton")
    p.add_argument("--modes", default="fwd,bwd,full")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out-dir", default=None, help="default bench/results/")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        sys.exit("bench_losses: no CUDA device; use --smoke for a CPU run of tiny shapes")
    # The bwd mode calls backward on a retained graph, which compiled graphs with donated
    # buffers refuse.
    functorch_config.donated_buffer = False
    providers, modes = args.providers.split(","), args.modes.split(",")
    env = environment(device)
    copy = copy_bandwidth_gbps(device, nbytes=1 << (30 if device.type == "cuda" else 24))
    print(f"device: {env['device']}; copy bandwidth {copy:.0f} GB/s; torch {env['torch']}, triton {env['triton']}")
    all_rows = []
    for case in cases(args.smoke, device):
        if case.op not in args.ops.split(","):
            continue
        rows = measure(case, providers, modes, device, args.reps)
        base = {(r["mode"]): r["ms"] for r in rows if r["provider"] == "compile"}
        for row in rows:
            row.update(env)
            if row["provider"] == "triton":
                if row["mode"] in base:
                    row["ratio"] = base[row["mode"]] / row["ms"]
                row["note"] = f"{row['gbps'] / copy:.0%} of copy ({copy:.0f} GB/s)"
            print(format_row(row) + (f"  {row['note']}" if row.get("note") else ""))
        all_rows += rows
        if device.type == "cuda":
            torch.cuda.empty_cache()
    path = append_rows("losses", all_rows, Path(args.out_dir) if args.out_dir else None)
    print(f"wrote {len(all_rows)} rows to {path}")


if __name__ == "__main__":
    main()
