"""Time the Muon optimizer step on the block matrices of PRX small (random gradients).

    python -m bench.bench_muon            # GPU: the 112 matrices of prx_small, bf16 Newton-Schulz
    python -m bench.bench_muon --smoke    # CPU: a 2-block, 64-wide model (kernels under the interpreter)

Providers, all the same math (docs/recipe.md section 6) and measured in the same run:
  reference  per-matrix Newton-Schulz in eager torch (how the reference code runs it: 141 ms on
             an H200, docs/recipe.md section 9)
  compile    matrices batched by shape, torch.compile of the batched reference (97 ms there)
  triton     batched by shape, the symmetric Triton kernels (kernels/muon.py)
Each step is the whole Muon update: momentum, Nesterov, Newton-Schulz, scaled parameter update.
Reports ms per step and the nominal Newton-Schulz TFLOP/s (48 TFLOP per step at PRX small,
counted as full products, as the recipe counts it). Appends rows to bench/results/muon.csv.
"""

from __future__ import annotations

import argparse
import math

import torch

import kernels
from bench.common import append_rows, environment, time_ms
from kernels.muon import newton_schulz_flops
from kernels.ref import newton_schulz
from prx.config import ModelConfig, preset
from prx.model.denoiser import PRX
from prx.optim import MuonAdam, NewtonSchulzSchedule, is_muon_parameter


def block_matrices(cfg: ModelConfig, device: torch.device) -> list[torch.nn.Parameter]:
    """The Muon parameters of a PRX model, with random gradients (built on meta, then allocated)."""
    with torch.device("meta"):
        model = PRX(cfg)
    g = torch.Generator(device=device).manual_seed(0)
    params = []
    for name, p in model.named_parameters():
        if is_muon_parameter(name, p):
            real = torch.nn.Parameter(torch.randn(p.shape, device=device, generator=g) * 0.02)
            real.grad = torch.randn(p.shape, device=device, generator=g)
            params.append(real)
    return params


def per_matrix_step(params, buffers, schedule, lr=1e-4, mu=0.95):
    """The reference: one matrix at a time, eager."""
    with torch.no_grad():
        for p, buf in zip(params, buffers):
            buf.lerp_(p.grad, 1 - mu)
            u = p.grad.lerp(buf, mu)
            o = newton_schulz(u.bfloat16(), list(schedule.coefficients), schedule.norm_safety, schedule.eps)
            p.add_(o, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model: prove the script runs (CPU)")
    parser.add_argument("--schedule", default="jordan", choices=["jordan", "polar_express"])
    parser.add_argument("--providers", default="reference,compile,triton")
    parser.add_argument("--out-dir", default=None, help="CSV folder (default bench/results)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = preset("prx_small_512").model
    label = "prx_small"
    if args.smoke:
        cfg = ModelConfig(patch_size=4, bottleneck_dim=16, hidden_dim=64, depth=2, num_heads=4, text_dim=32,
                          time_embed_dim=32)
        label = "smoke"
    params = block_matrices(cfg, device)
    schedule = NewtonSchulzSchedule.named(args.schedule, 5)
    flops = sum(newton_schulz_flops(*p.shape, len(schedule.coefficients)) for p in params)
    shapes = sorted({tuple(p.shape) for p in params})
    shape = f"{label} {len(params)} matrices {len(shapes)} shapes"
    env = environment(device)
    print(f"{shape}: {flops / 1e12:.2f} TFLOP of Newton-Schulz per step; {env['device']}")

    rows, baseline = [], None
    for provider in args.providers.split(","):
        if provider == "reference":
            buffers = [torch.zeros_like(p) for p in params]
            step = lambda: per_matrix_step(params, buffers, schedule)  # noqa: E731
        else:
            group = dict(params=params, kind="muon", momentum=0.95, nesterov=True, update_scale=0.2,
                         weight_decay=0.0)
            batched = (torch.compile(newton_schulz, dynamic=False) if provider == "compile"
                       else kernels.newton_schulz)  # triton: the trainer's own road
            optimizer = MuonAdam([group], lr=1e-4, schedule=schedule, newton_schulz=batched)
            step = optimizer.step
        with kernels.pinned("triton" if provider == "triton" else "auto"):  # the CPU smoke: the interpreter
            ms = time_ms(step, device, reps=10 if device.type == "cuda" else 3)
        baseline = baseline or (ms if provider == "reference" else None)
        row = {**env, "op": "muon_step", "shape": shape, "dtype": "bf16", "mode": "step", "provider": provider,
               "ms": round(ms, 3), "tflops": round(flops / (ms * 1e-3) / 1e12, 1),
               "ratio": round(baseline / ms, 2) if baseline else "",
               "note": f"{args.schedule}; ratio = reference ms / this ms; nominal NS FLOP"}
        rows.append(row)
        print(f"  {provider:<10}{ms:>10.2f} ms  {row['tflops']:>7} TFLOP/s  "
              f"{'x' + str(row['ratio']) + ' vs per-matrix' if row['ratio'] else ''}")
    path = append_rows("muon", rows, args.out_dir)
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()
