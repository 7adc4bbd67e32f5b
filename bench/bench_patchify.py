"""Benchmark the fused patchify + noise and unpatchify kernels against their references.

    python -m bench.bench_patchify                                # GPU: 512 and 1024 px, batch 16
    python -m bench.bench_patchify --smoke --out-dir /tmp/bench  # CPU: tiny shape, interpreter

Providers: torch (eager reference), compile (torch.compile of the reference: the honest
baseline), triton; plus `copy`, a device copy of the same number of bytes. GB/s counts the
minimal bytes: uint8 image in, two bf16 tensors out (5 B/pixel), plus the fp32 noise when it is
passed in; unpatchify reads and writes each bf16 element once. For in-kernel noise the baseline
draws its noise with torch.randn (which inductor also fuses): the torch Philox of kernels.ref is
a correctness reference, not a speed one. Mode `bwd` of unpatchify times the op its backward
runs (a patchify of the image gradient). Rows go to <out-dir>/patchify.csv.
"""

from __future__ import annotations

import torch

import kernels
from bench.common import kernel_bench_arguments, measure_and_record
from kernels import patchify as kp
from kernels import ref


def unfused_with_randn(images, t, p):
    """The trainer's unfused path: float conversion, patchify, randn, noising, cast."""
    x = ref.patchify(images.float() / 127.5 - 1.0, p)
    tb = t.reshape(-1, 1, 1)
    x_t = (1 - tb) * x + tb * torch.randn_like(x)
    return x_t.bfloat16(), x.bfloat16()


def cases(batch, size, p, device, names):
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), generator=gen, device=device, dtype=torch.uint8)
    t = torch.rand(batch, generator=gen, device=device)
    seeds = torch.randint(0, 2**62, (batch,), generator=gen, device=device)
    tokens, dim = (size // p) ** 2, 3 * p * p
    noise = torch.randn(batch, tokens, dim, generator=gen, device=device)
    patches = torch.randn(batch, tokens, dim, generator=gen, device=device).bfloat16()
    grad_images = torch.randn(batch, 3, size, size, generator=gen, device=device).bfloat16()
    pixels = batch * 3 * size * size
    compiled = {name: torch.compile(fn) for name, fn in [
        ("randn", unfused_with_randn), ("noise", ref.patchify_and_noise),
        ("unpatchify", ref.unpatchify), ("patchify", ref.patchify)]} if "compile" in names else {}

    def pick(providers):
        return {k: v for k, v in providers.items() if k in names}

    yield "patchify_noise", "seeds", pixels * (1 + 2 + 2), pick({
        "torch": lambda: unfused_with_randn(images, t, p),
        "compile": lambda: compiled["randn"](images, t, p),
        "triton": lambda: kernels.patchify_and_noise(images, t, p, seeds=seeds, out_dtype=torch.bfloat16)})
    yield "patchify_noise", "noise", pixels * (1 + 4 + 2 + 2), pick({
        "torch": lambda: ref.patchify_and_noise(images, t, p, noise=noise, out_dtype=torch.bfloat16),
        "compile": lambda: compiled["noise"](images, t, p, noise=noise, out_dtype=torch.bfloat16),
        "triton": lambda: kernels.patchify_and_noise(images, t, p, noise=noise, out_dtype=torch.bfloat16)})
    yield "unpatchify", "fwd", pixels * 2 * 2, pick({
        "torch": lambda: ref.unpatchify(patches, p, size, size),
        "compile": lambda: compiled["unpatchify"](patches, p, size, size),
        "triton": lambda: kernels.unpatchify(patches, p, size, size)})
    yield "unpatchify", "bwd", pixels * 2 * 2, pick({
        "torch": lambda: ref.patchify(grad_images, p),
        "compile": lambda: compiled["patchify"](grad_images, p),
        "triton": lambda: kp.launch_patchify(grad_images, p)})


def main() -> None:
    args = kernel_bench_arguments(__doc__.splitlines()[0])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = args.providers.split(",")
    shapes = [(2, 64, 32)] if args.smoke else [(16, 512, 32), (16, 1024, 32)]
    measure_and_record("patchify", (
        (op, f"{batch}x3x{size}x{size} p{p}", "uint8->bf16" if op != "unpatchify" else "bf16", mode, nbytes, providers)
        for batch, size, p in shapes for op, mode, nbytes, providers in cases(batch, size, p, device, names)),
        device, args.out_dir)


if __name__ == "__main__":
    main()
