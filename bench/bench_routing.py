"""Benchmark the TREAD routing kernels (gather and scatter of token rows) against their references.

    python -m bench.bench_routing                                # GPU: batch 16, 256 and 1024 tokens, width 1792, bf16
    python -m bench.bench_routing --smoke --out-dir /tmp/bench  # CPU: tiny shape, interpreter

Providers: torch (eager reference), compile (torch.compile of the reference), triton; plus
`copy`, a device copy of the same bytes. Half the tokens are kept. GB/s counts the minimal bytes
(rows of C elements; the int64 indices are negligible): gather fwd reads and writes K rows;
scatter fwd reads N rows (K kept, N - K full) and writes N; gather bwd (a scatter into zeros)
reads K and writes N; scatter bwd (the split of the gradient) reads N and writes N + K. The
backward modes time the op autograd runs (reference: the same math in torch ops).
Rows go to <out-dir>/routing.csv.
"""

from __future__ import annotations

import torch

import kernels
from bench.common import kernel_bench_arguments, measure_and_record
from kernels import ref
from kernels import routing as kr


def scatter_into_zeros(grad_kept, keep_idx, num_tokens):
    """Reference of gather's backward."""
    b, _, c = grad_kept.shape
    return grad_kept.new_zeros(b, num_tokens, c).scatter(1, keep_idx[..., None].expand(-1, -1, c), grad_kept)


def split_gradient(grad, keep_idx):
    """Reference of scatter's backward: (grad of x_kept, grad of x_full)."""
    index = keep_idx[..., None].expand(-1, -1, grad.shape[2])
    return grad.gather(1, index), grad.scatter(1, index, 0.0)


def cases(batch, tokens, width, dtype, device, names):
    kept = tokens // 2
    gen = torch.Generator(device=device).manual_seed(0)
    keep_idx = kernels.select_kept_tokens(torch.randint(0, 2**62, (batch,), generator=gen, device=device), tokens, kept)
    x = torch.randn(batch, tokens, width, generator=gen, device=device).to(dtype)
    x_kept = torch.randn(batch, kept, width, generator=gen, device=device).to(dtype)
    row = width * x.element_size()
    compiled = {fn.__name__: torch.compile(fn) for fn in (ref.route_gather, ref.route_scatter, scatter_into_zeros,
                                                          split_gradient)} if "compile" in names else {}

    def pick(providers):
        return {k: v for k, v in providers.items() if k in names}

    yield "route_gather", "fwd", batch * 2 * kept * row, pick({
        "torch": lambda: ref.route_gather(x, keep_idx),
        "compile": lambda: compiled["route_gather"](x, keep_idx),
        "triton": lambda: kernels.route_gather(x, keep_idx)})
    yield "route_scatter", "fwd", batch * 2 * tokens * row, pick({
        "torch": lambda: ref.route_scatter(x_kept, x, keep_idx),
        "compile": lambda: compiled["route_scatter"](x_kept, x, keep_idx),
        "triton": lambda: kernels.route_scatter(x_kept, x, keep_idx)})
    yield "route_gather", "bwd", batch * (kept + tokens) * row, pick({
        "torch": lambda: scatter_into_zeros(x_kept, keep_idx, tokens),
        "compile": lambda: compiled["scatter_into_zeros"](x_kept, keep_idx, tokens),
        "triton": lambda: kr.launch_route_merge(x_kept, None, keep_idx, tokens)})
    yield "route_scatter", "bwd", batch * (2 * tokens + kept) * row, pick({
        "torch": lambda: split_gradient(x, keep_idx),
        "compile": lambda: compiled["split_gradient"](x, keep_idx),
        "triton": lambda: kr.launch_route_split(x, keep_idx)})


def main() -> None:
    args = kernel_bench_arguments(__doc__.splitlines()[0])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = args.providers.split(",")
    shapes = [(2, 77, 40, torch.float32)] if args.smoke else [(16, 256, 1792, torch.bfloat16),
                                                               (16, 1024, 1792, torch.bfloat16)]
    measure_and_record("routing", (
        (op, f"{batch}x{tokens}x{width} keep {tokens // 2}", str(dtype).removeprefix("torch."), mode, nbytes, providers)
        for batch, tokens, width, dtype in shapes
        for op, mode, nbytes, providers in cases(batch, tokens, width, dtype, device, names)),
        device, args.out_dir)


if __name__ == "__main__":
    main()
