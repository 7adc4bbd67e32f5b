"""How close each Newton-Schulz evaluation comes to the exact iteration and to the polar factor, on CPU.

    python -m bench.muon_numerics                # the study: 6 to 11 minutes on a 2-core CPU
    python -m bench.muon_numerics --quick        # one small shape, seconds (a smoke run)

Inputs are what Muon hands to Newton-Schulz: a bf16 bank (momentum cast from fp32), at the six
bank shapes of PRX small (taken from the model) and at the same shapes divided by 4, of two kinds:
"gaussian" (i.i.d. normal, a well-conditioned Marchenko-Pastur spectrum) and "log-uniform"
(U diag(s) V^T with s spread log-uniformly over 1e-6..1; the bf16 cast lifts the smallest
singular values to its rounding floor, about 1e-4 of the largest, reported as `input_cond`).

References, in fp64 from one eigendecomposition X X^T = W diag(s^2) W^T of the bf16 input:
the polar factor W diag(1/s) W^T X (= U V^T), and the exact standard iteration
W diag(p(s)/s) W^T X, with p the composed polynomial of the schedule. Per output O (wide
orientation, r rows): the orthogonality error ||O O^T - I||_F / sqrt(r), the distances
||O - ref||_F / ||ref||_F to both references, and O's singular-value range. Jordan's quintic
does not converge on purpose (singular values end in about [0.7, 1.2]), so the distance to the
exact iteration is the number that measures rounding; the polar distance mostly measures the
polynomial (both methods share it).

Methods run through kernels/ref.py, whose Gram path rounds exactly where the Triton kernels do
(fp32 accumulation, one rounding per stored matrix, symmetric results mirrored): "standard" in
bf16 (the recipe), "gram" stored in fp16 / bf16 / fp32 with its restarts. The printed table is
the maximum error (and the widest singular-value range) over shapes and matrices; every
measurement is a row of bench/results/muon_numerics.csv.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import torch

from bench.common import RESULTS, append_csv, environment
from kernels import ref
from kernels.muon import newton_schulz_flops
from prx.config import preset
from prx.model.denoiser import PRX
from prx.optim import NewtonSchulzSchedule, is_muon_parameter

FIELDS = ["date", "device", "torch", "git", "scale", "kind", "shape", "matrix", "input_cond", "schedule", "method",
          "orth", "dist_polar", "dist_exact", "sv_min", "sv_max", "seconds"]
SCHEDULES = ("jordan", "polar_express")
KINDS = ("gaussian", "log-uniform")


def gram(dtype, restarts=None):
    return lambda x, s: ref.gram_newton_schulz(x, list(s.coefficients), s.norm_safety, s.eps, dtype=dtype,
                                               restarts=restarts)


# name -> (bank, schedule) -> O. The first two are the trainer's two roads (optim.newton_schulz).
METHODS = {
    "standard, bf16": lambda x, s: ref.newton_schulz(x, list(s.coefficients), s.norm_safety, s.eps),
    "gram, fp16, restart after 3 (default)": lambda x, s: ref.newton_schulz(x, list(s.coefficients), s.norm_safety,
                                                                           s.eps, method="gram"),
    "gram, fp16, restart after 2": gram(torch.float16, (2,)),
    "gram, fp16, no restart": gram(torch.float16, ()),
    "gram, bf16, restart after 3": gram(torch.bfloat16),
    "gram, fp32, no restart": gram(torch.float32, ()),
}
SWEEP = {  # at the shapes divided by 4 only: where to restart
    "gram, fp16, restart after 1": gram(torch.float16, (1,)),
    "gram, fp16, restart after 4": gram(torch.float16, (4,)),
    "gram, fp16, restart after 2 and 4": gram(torch.float16, (2, 4)),
}


def bank_shapes() -> dict[tuple[int, int], int]:
    """PRX small's Muon matrices: shape (rows, cols as stored; tall ones run transposed) -> count."""
    with torch.device("meta"):
        model = PRX(preset("prx_small_512").model)
    counts: dict[tuple[int, int], int] = {}
    for name, p in model.named_parameters():
        if is_muon_parameter(name, p):
            counts[tuple(p.shape)] = counts.get(tuple(p.shape), 0) + 1
    return dict(sorted(counts.items()))


def make_input(kind: str, r: int, c: int, g: torch.Generator) -> torch.Tensor:
    """A wide (r <= c) fp64 matrix of the given kind, rounded to bf16 as Muon's bank is."""
    if kind == "gaussian":
        x = torch.randn(r, c, generator=g, dtype=torch.float64)
    else:
        u = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(c, r, generator=g, dtype=torch.float64))[0]
        s = torch.exp(torch.empty(r, dtype=torch.float64).uniform_(math.log(1e-6), 0.0, generator=g))
        x = (u * s) @ v.mT
    return x.bfloat16()


def composed(sigma: torch.Tensor, schedule: NewtonSchulzSchedule) -> torch.Tensor:
    for a, b, c in schedule.coefficients:
        sigma = a * sigma + b * sigma**3 + c * sigma**5
    return sigma


def references(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
    """fp64 polar factor, exact standard output per schedule, and s_min / s_max of x (wide, bf16)."""
    x64 = x.double()
    lam, w = torch.linalg.eigh(x64 @ x64.mT)
    sigma = lam.clamp_min(1e-300).sqrt()
    wx = w.mT @ x64
    polar = (w * (1 / sigma)) @ wx
    norm = torch.linalg.vector_norm(x64).item()
    exact = {}
    for name in SCHEDULES:
        s = NewtonSchulzSchedule.named(name, 5)
        exact[name] = (w * (composed(sigma / (norm * s.norm_safety + s.eps), s) / sigma)) @ wx
    return polar, exact, (sigma.min() / sigma.max()).item()


def metrics(o: torch.Tensor, polar: torch.Tensor, exact: torch.Tensor) -> dict:
    r = o.shape[0]
    o32 = o.float()
    gram_o = o32 @ o32.mT  # bf16 entries are exact in fp32
    sv = torch.linalg.eigvalsh(gram_o.double()).clamp_min(0).sqrt()
    o64 = o.double()
    identity = torch.eye(r, dtype=torch.float64)
    return {"orth": (torch.linalg.matrix_norm(gram_o.double() - identity) / math.sqrt(r)).item(),
            "dist_polar": (torch.linalg.matrix_norm(o64 - polar) / torch.linalg.matrix_norm(polar)).item(),
            "dist_exact": (torch.linalg.matrix_norm(o64 - exact) / torch.linalg.matrix_norm(exact)).item(),
            "sv_min": sv.min().item(), "sv_max": sv.max().item()}


def study(shapes, scale: str, matrices: int, methods: dict, env: dict, seed: int = 0) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(seed)
    for kind in KINDS:
        for rows_, cols in shapes:
            r, c = min(rows_, cols), max(rows_, cols)
            for k in range(matrices):
                x = make_input(kind, r, c, g)  # wide; the bank holds it as stored (tall: transposed)
                bank = x.mT.contiguous() if rows_ > cols else x
                polar, exact, cond = references(x)
                for schedule_name in SCHEDULES:
                    schedule = NewtonSchulzSchedule.named(schedule_name, 5)
                    for method, run in methods.items():
                        start = time.perf_counter()
                        o = run(bank, schedule)
                        seconds = time.perf_counter() - start
                        o = o.mT if rows_ > cols else o
                        rows.append({**env, "scale": scale, "kind": kind, "shape": f"{rows_}x{cols}", "matrix": k,
                                     "input_cond": cond, "schedule": schedule_name, "method": method,
                                     **metrics(o, polar, exact[schedule_name]), "seconds": seconds})
            print(f"  {scale}, {kind}: done {rows_}x{cols}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """One line per (scale, input, method), Jordan / Polar Express side by side: the largest
    errors and the widest singular-value range over shapes and matrices."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for row in rows:
        groups.setdefault((row["scale"], row["kind"], row["method"]), {}).setdefault(row["schedule"], []).append(row)

    def both(per_schedule, cell):
        return " / ".join(cell(per_schedule[name]) for name in SCHEDULES if name in per_schedule)

    def worst(key, digits):
        return lambda group: f"{max(float(r[key]) for r in group):.{digits}f}"

    def band(group):  # singular values under 3e-4 drown in the fp32 rounding of O O^T: "<3e-4"
        low = min(float(r["sv_min"]) for r in group)
        return f"{f'{low:.2g}' if low >= 3e-4 else '<3e-4'}..{max(float(r['sv_max']) for r in group):.3f}"

    lines = ["| shapes | input | method | orthogonality | to polar | to exact iteration | singular values |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (scale, kind, method), per_schedule in groups.items():
        lines.append(f"| {scale} | {kind} | {method} | {both(per_schedule, worst('orth', 3))} "
                     f"| {both(per_schedule, worst('dist_polar', 3))} | {both(per_schedule, worst('dist_exact', 4))} "
                     f"| {both(per_schedule, band)} |")
    return "\n".join(lines)


def flop_lines(shapes_and_counts: dict[tuple[int, int], int]) -> str:
    out = []
    for method in ("standard", "gram"):
        nominal = sum(n * newton_schulz_flops(*shape, 5, False, method) for shape, n in shapes_and_counts.items())
        symmetric = sum(n * newton_schulz_flops(*shape, 5, True, method) for shape, n in shapes_and_counts.items())
        out.append(f"{method}: {nominal / 1e12:.2f} TFLOP as full products, {symmetric / 1e12:.2f} with symmetric "
                   "products on the upper triangle")
    return "PRX small Newton-Schulz work per optimizer step (112 matrices, 5 steps): " + "; ".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one 96 x 320 shape, one matrix: a smoke run")
    parser.add_argument("--matrices", type=int, default=1, help="matrices per shape and kind at full size")
    parser.add_argument("--out-dir", default=None, help="CSV folder (default bench/results/)")
    parser.add_argument("--table", metavar="CSV", help="print the table of an earlier run's CSV and exit")
    args = parser.parse_args()
    if args.table:
        with open(args.table, newline="") as f:
            print(table(list(csv.DictReader(f))))
        return
    torch.manual_seed(0)
    env = environment(torch.device("cpu"))
    env.pop("triton")
    start = time.perf_counter()
    if args.quick:
        rows = study([(96, 320)], "96x320", 1, {**METHODS, **SWEEP}, env)
    else:
        counts = bank_shapes()
        print(flop_lines(counts))
        shapes = list(counts)
        rows = study([(a // 4, b // 4) for a, b in shapes], "PRX small / 4", 3, {**METHODS, **SWEEP}, env, seed=1)
        rows += study(shapes, "PRX small", args.matrices, METHODS, env, seed=2)
    print(f"{env['device']}, torch {env['torch']}, {time.perf_counter() - start:.0f} s; each cell: "
          "jordan / polar_express\n")
    print(table(rows))
    path = append_csv(Path(args.out_dir or RESULTS) / "muon_numerics.csv", FIELDS, rows)
    print(f"\nrows appended to {path}")


if __name__ == "__main__":
    main()
