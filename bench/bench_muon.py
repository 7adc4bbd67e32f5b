"""Time the Muon optimizer step on the block matrices of PRX small (random gradients), against
what the hardware allows.

    python -m bench.bench_muon            # GPU: the 112 matrices of prx_small, bf16 Newton-Schulz
    python -m bench.bench_muon --smoke    # CPU: a 2-block, 64-wide model (kernels under the interpreter)
    python -m bench.bench_muon --plan     # any machine: the FLOP, bytes and ideal-time table only

Providers, all the same math (docs/recipe.md section 6) and measured in the same run:
  reference  per-matrix Newton-Schulz in eager torch (how the reference code runs it: 141 ms on
             an H200, docs/recipe.md section 9), unfused element-wise ops
  compile    matrices batched by shape, torch.compile of the batched reference (97 ms there)
  triton     batched by shape, the Triton kernels (kernels/muon.py, kernels/muon_update.py)
and methods (`--methods`): "standard" iterates on X, "gram" on X X^T (kernels/muon.py).
Each step is the whole Muon update: momentum, Nesterov, Newton-Schulz, scaled parameter update.
For each it prints the FLOP executed (the Triton kernels skip the lower tiles of symmetric
products) and the element-wise bytes, the ideal time at the matmul and copy ceilings (measured
on a GPU; an H200's from docs/recipe.md elsewhere, so the CPU prints the H200 plan), the
measured time and its ratio to the ideal. TFLOP/s in the CSV is nominal (48 TFLOP a step at PRX
small, full products, as the recipe counts it). Appends rows to bench/results/muon.csv.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch

import kernels
from bench.common import append_rows, copy_bandwidth_gbps, environment, matmul_tflops, time_ms
from kernels.muon import newton_schulz_flops
from kernels.muon_update import muon_update_bytes
from kernels.ref import newton_schulz
from prx.config import ModelConfig, preset
from prx.model.denoiser import PRX
from prx.optim import MuonAdam, NewtonSchulzSchedule, is_muon_parameter


def block_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """The shapes of a PRX model's Muon parameters, in model order (built on meta: no memory)."""
    with torch.device("meta"):
        model = PRX(cfg)
    return [tuple(p.shape) for name, p in model.named_parameters() if is_muon_parameter(name, p)]


def block_matrices(cfg: ModelConfig, device: torch.device) -> list[torch.nn.Parameter]:
    """The Muon parameters of a PRX model, with random gradients."""
    g = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in block_shapes(cfg):
        real = torch.nn.Parameter(torch.randn(shape, device=device, generator=g) * 0.02)
        real.grad = torch.randn(shape, device=device, generator=g)
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


# The H200's measured ceilings (docs/recipe.md section 9: bf16 matmul 8192^3, device copy): the
# ideal times printed on a machine without a GPU.
H200_TFLOPS, H200_GBPS = 769.0, 4210.0


def providers_of(names: list[str], methods: list[str]) -> list[tuple[str, str]]:
    """(provider, method) pairs: the per-matrix reference runs the standard iteration only (that is
    the reference code); compile and triton run every method asked for."""
    return [(p, m) for p in names for m in (["standard"] if p == "reference" else methods)]


def step_cost(shapes, provider: str, method: str, steps: int) -> tuple[float, float]:
    """(executed FLOP, element-wise bytes) of one Muon step. FLOP: the Triton kernels skip the
    lower tiles of symmetric products; torch computes every product in full. Bytes: the
    element-wise passes (momentum, Nesterov, cast into the bank, update; kernels/muon_update.py),
    fused unless per-matrix; the Newton-Schulz operands are not counted (they are compute-bound)."""
    flops = sum(newton_schulz_flops(*shape, steps, symmetric=provider == "triton", method=method)
                for shape in shapes)
    moved = muon_update_bytes(shapes, fused=provider != "reference", nesterov=True, weight_decay=False)["total"]
    return float(flops), float(moved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model: prove the script runs (CPU)")
    parser.add_argument("--schedule", default="jordan", choices=["jordan", "polar_express"])
    parser.add_argument("--providers", default="reference,compile,triton")
    parser.add_argument("--methods", default="standard,gram", help="Newton-Schulz evaluations (kernels/muon.py)")
    parser.add_argument("--out-dir", default=None, help="CSV folder (default bench/results)")
    parser.add_argument("--plan", action="store_true",
                        help="print FLOP, bytes and ideal times only, nothing timed (any machine)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = preset("prx_small_512").model
    label = "prx_small"
    if args.smoke:
        cfg = ModelConfig(patch_size=4, bottleneck_dim=16, hidden_dim=64, depth=2, num_heads=4, text_dim=32,
                          time_embed_dim=32)
        label = "smoke"
    shapes = block_shapes(cfg)
    params = [] if args.plan else block_matrices(cfg, device)
    steps = 5
    nominal = sum(newton_schulz_flops(*shape, steps) for shape in shapes)
    shape = f"{label} {len(shapes)} matrices {len(set(shapes))} shapes"
    env = environment(device)
    if device.type == "cuda" and not args.plan:
        tflops_ceiling, gbps_ceiling = matmul_tflops(device), copy_bandwidth_gbps(device)
        ceilings = f"measured here: {tflops_ceiling:.0f} TFLOP/s, {gbps_ceiling:.0f} GB/s"
    else:
        tflops_ceiling, gbps_ceiling = H200_TFLOPS, H200_GBPS
        ceilings = f"an H200's ({tflops_ceiling:.0f} TFLOP/s, {gbps_ceiling:.0f} GB/s; docs/recipe.md)"
    print(f"{shape}: {nominal / 1e12:.2f} TFLOP of nominal Newton-Schulz a step; {env['device']}; "
          f"ideal times at {ceilings}")
    print(f"{'provider':<10}{'method':<10}{'TFLOP':>8}{'GB':>7}{'ideal ms':>10}{'ms':>11}{'x ideal':>9}{'vs ref':>8}")

    rows, baseline = [], None
    for provider, method in providers_of(args.providers.split(","), args.methods.split(",")):
        schedule = dataclasses.replace(NewtonSchulzSchedule.named(args.schedule, steps), method=method)
        flops, moved = step_cost(shapes, provider, method, steps)
        ideal = (flops / (tflops_ceiling * 1e12) + moved / (gbps_ceiling * 1e9)) * 1e3
        if args.plan:
            print(f"{provider:<10}{method:<10}{flops / 1e12:>8.2f}{moved / 1e9:>7.1f}{ideal:>10.2f}{'-':>11}")
            continue
        if provider == "reference":
            buffers = [torch.zeros_like(p) for p in params]
            step = lambda: per_matrix_step(params, buffers, schedule)  # noqa: E731
        else:
            group = dict(params=params, kind="muon", momentum=0.95, nesterov=True, update_scale=0.2,
                         weight_decay=0.0)
            if provider == "compile":  # a fresh cache a method: 6 bank shapes x 2 methods pass dynamo's
                torch._dynamo.reset()  # limit of 8 graphs a function, after which it would run eagerly
            batched = (torch.compile(newton_schulz, dynamic=False) if provider == "compile"
                       else kernels.newton_schulz)  # triton: the trainer's own road
            optimizer = MuonAdam([group], lr=1e-4, schedule=schedule, newton_schulz=batched)
            step = optimizer.step
        with kernels.pinned("triton" if provider == "triton" else "auto"):  # the CPU smoke: the interpreter
            ms = time_ms(step, device, reps=10 if device.type == "cuda" else 3)
        baseline = baseline or (ms if provider == "reference" else None)
        row = {**env, "op": "muon_step", "shape": shape, "dtype": "bf16", "mode": method, "provider": provider,
               "ms": round(ms, 3), "tflops": round(nominal / (ms * 1e-3) / 1e12, 1),
               "gbps": round(moved / (ms * 1e-3) / 1e9, 1),
               "ratio": round(baseline / ms, 2) if baseline else "",
               "note": f"{args.schedule}; executed {flops / 1e12:.2f} TFLOP, {moved / 1e9:.1f} GB; ideal "
                       f"{ideal:.2f} ms at {ceilings}; tflops = nominal FLOP / ms; ratio = reference ms / ms"}
        rows.append(row)
        ratio = f"x{row['ratio']}" if baseline else ""
        print(f"{provider:<10}{method:<10}{flops / 1e12:>8.2f}{moved / 1e9:>7.1f}{ideal:>10.2f}{ms:>11.2f}"
              f" {ms / ideal:>8.1f} {ratio:>7}")
    if rows:
        print(f"rows appended to {append_rows('muon', rows, args.out_dir)}")


if __name__ == "__main__":
    main()
