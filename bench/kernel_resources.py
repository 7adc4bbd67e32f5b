"""What each Triton kernel asks of an H100/H200 SM, as a GPU would compile it, found on the CPU:
registers per thread, spills, shared memory, resident blocks per SM, and Hopper `wgmma`.

    python -m bench.kernel_resources          # the table; writes bench/results/kernel_resources.csv

A kernel's resources depend on how Triton specialises its arguments at launch: a pointer known to
be 16-byte aligned, an integer known to be divisible by 16 (or equal to 1) let the compiler
vectorise loads and drop bounds arithmetic; compiled without those hints, the Newton-Schulz
polynomial kernel used 255 registers and spilled, where the GPU's own launch needs 124 and none.
So the table is made the way a GPU makes its kernels, in two processes:

1. `record_launches`, under the Triton interpreter: every op runs at the PRX shapes (prx_small
   at 512 px batch 32 and 1024 px batch 16, the Muon banks of its 112 block matrices) with the
   launchers' GPU tile sizes and an H100's 132 SMs; each launch's arguments are recorded and the
   kernel itself is not run (nothing is computed, so full-size shapes cost only allocation).
2. `compile_launches`, with real JIT functions: each recorded launch is bound by the binder
   `JITFunction.run` builds on a GPU (`create_function_from_signature` with the CUDA backend:
   alignment, divisibility and i32/i64 by value), compiled for sm_90a, and the bundled
   `ptxas -v` reads the PTX: registers and spill bytes. Shared memory is Triton's dynamic
   allocation (the pipelined tiles), from the compiled kernel's metadata.

Blocks per SM follow the CUDA occupancy rules for compute capability 9.0: 65,536 registers,
allocated per warp in units of 256; 228 KiB of shared memory, 1 KiB of it reserved per block,
at most 227 KiB for one block; 64 warps and 32 blocks. `INTENDED_BLOCKS` says how many each
kernel is meant to keep resident; tests/test_kernels_compile.py fails when a kernel spills, does
not reach that, or uses no `wgmma` where it multiplies matrices.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSV_PATH = ROOT / "bench" / "results" / "kernel_resources.csv"
H100_SMS = 132  # H100 SXM and H200 alike: what `target_programs` sizes grids for

# Compute capability 9.0 (CUDA C Programming Guide, "Technical Specifications per Compute Capability").
REGISTERS_PER_SM = 65_536
REGISTER_UNIT = 256  # registers are allocated per warp in units of 256 (8 per thread)
SHARED_PER_SM = 233_472  # 228 KiB
SHARED_PER_BLOCK = 232_448  # 227 KiB: the most one block may have
SHARED_RESERVED_PER_BLOCK = 1_024
WARPS_PER_SM, BLOCKS_PER_SM = 64, 32

# Blocks each kernel must keep resident on one SM. The matmul kernels (128 x 128 tiles, 8 warps,
# 3 stages of 128 x 64 bf16 operands = 96 KiB) are meant to run two per SM, so that one block's
# loads overlap the other's wgmma: that needs <= 128 registers and <= 113 KiB each. The
# element-wise and reduction kernels move bytes: at least 1,024 resident threads (half the SM's
# 2,048) hide DRAM latency, so <= 64 registers at 4 warps (8 blocks), <= 32 KiB of shared memory.
MATMUL_KERNELS = {"_symmetric_product_kernel", "_polynomial_step_kernel"}
INTENDED_BLOCKS = {name: 2 for name in MATMUL_KERNELS}
DEFAULT_INTENDED_THREADS = 1_024


def intended_blocks(kernel: str, num_warps: int) -> int:
    return INTENDED_BLOCKS.get(kernel, max(1, DEFAULT_INTENDED_THREADS // (32 * num_warps)))


def blocks_per_sm(registers: int, shared: int, num_warps: int) -> int:
    """Resident blocks of one kernel on one SM (the occupancy calculator's arithmetic)."""
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = REGISTERS_PER_SM // (per_warp * num_warps) if registers else BLOCKS_PER_SM
    by_shared = SHARED_PER_SM // (shared + SHARED_RESERVED_PER_BLOCK)
    return min(BLOCKS_PER_SM, WARPS_PER_SM // num_warps, by_registers, by_shared)


# ----------------------------------------------------------------------------- 1. record (interpreter)


def prx_workload() -> None:
    """Every op once per distinct launch of a PRX small training step at 512 and 1024 px, with its
    Muon step: the shapes come from the presets (patch 32, hidden 1792, TREAD keeping half the
    tokens, REPA on 1024-wide ViT-L tokens, DINO on 768-wide ViT-B tokens at 224 px, LPIPS on VGG
    taps of the half-size image)."""
    import torch

    import kernels
    from prx.config import preset
    from prx.model.denoiser import PRX
    from prx.optim import is_muon_parameter

    cfg = preset("prx_small_512").model
    empty = torch.empty
    for side, batch in ((512, 32), (1024, 16)):
        tokens = (side // cfg.patch_size) ** 2
        images = empty((batch, 3, side, side), dtype=torch.uint8)
        t, seeds = torch.rand(batch), torch.arange(batch)
        x_t, x = kernels.patchify_and_noise(images, t, cfg.patch_size, seeds=seeds, out_dtype=torch.bfloat16)
        x_hat = empty(x_t.shape, dtype=torch.bfloat16, requires_grad=True)
        kernels.flow_loss(x_hat, x, t)[0].backward()
        patches = empty(x_t.shape, dtype=torch.bfloat16, requires_grad=True)
        kernels.unpatchify(patches, cfg.patch_size, side, side).float().sum().backward()

        keep = kernels.select_kept_tokens(seeds, tokens, tokens // 2)
        hidden = empty((batch, tokens, cfg.hidden_dim), dtype=torch.bfloat16, requires_grad=True)
        kept = kernels.route_gather(hidden, keep)
        kernels.route_scatter(kept * 2, hidden, keep).float().sum().backward()

        repa = empty((batch, tokens, 1024), dtype=torch.bfloat16, requires_grad=True)
        kernels.cosine_alignment(repa, empty(repa.shape, dtype=torch.bfloat16))[0].backward()
        dino = empty((batch, 16 * 16, 768), dtype=torch.bfloat16, requires_grad=True)
        kernels.cosine_alignment(dino, empty(dino.shape, dtype=torch.bfloat16))[0].backward()

        half = side // 2  # lpips_scale 0.5; VGG16's taps at full, 1/2, 1/4, 1/8, 1/16 of it
        taps = [(64, half), (128, half // 2), (256, half // 4), (512, half // 8), (512, half // 16)]
        feats = [empty((batch, c, s, s), dtype=torch.bfloat16, requires_grad=True) for c, s in taps]
        targets = [empty((batch, c, s, s), dtype=torch.bfloat16) for c, s in taps]
        heads = [torch.rand(c) for c, _ in taps]
        kernels.lpips_distance(feats, targets, heads).sum().backward()

    with torch.device("meta"):
        model = PRX(cfg)
    shapes = sorted({tuple(p.shape) for name, p in model.named_parameters() if is_muon_parameter(name, p)})
    for rows, cols in shapes:  # two matrices a bank (the count changes only the grid); the standard
        # iteration: two steps (the first folds the norm in, HAS_SCALE); the Gram one (the default):
        # five, which include its restart after step 3 and every product kind
        bank = empty((2, rows, cols), dtype=torch.bfloat16)
        kernels.newton_schulz(bank, [(3.4445, -4.7750, 2.0315)] * 2, method="standard")
        kernels.newton_schulz(bank, [(3.4445, -4.7750, 2.0315)] * 5, method="gram")
        # Muon's element-wise passes on fp32 matrices (Nesterov on and off); the update reads O as
        # Newton-Schulz returns it, a transposed view for the tall banks
        grads, buffers = ([empty((rows, cols)) for _ in range(2)] for _ in range(2))
        for nesterov in (True, False):
            bank = kernels.momentum_to_bank(grads, buffers, 0.95, nesterov)
        o = empty((2, cols, rows), dtype=torch.bfloat16).mT if rows > cols else bank
        kernels.apply_update(grads, list(o.unbind(0)), 1e-4, 0.99)


def odd_shapes_workload() -> None:
    """Every op forward and backward at small shapes (sizes not multiples of 16, a mask, a tall
    bank): launches that specialise unlike the PRX ones (the tiny preset on a GPU) still compile."""
    import torch

    import kernels

    g = torch.Generator().manual_seed(0)
    bank = torch.randn(2, 40, 72, generator=g).bfloat16()
    for method in ("standard", "gram"):
        kernels.newton_schulz(bank, [(3.4445, -4.7750, 2.0315)] * 2, method=method)
        kernels.newton_schulz(bank.mT.contiguous(), [(3.4445, -4.7750, 2.0315)], method=method)  # tall
    # Muon's element-wise passes on matrices that start 4 bytes off 16-byte alignment (as FSDP2's
    # row shards of a flat buffer may), O as the transposed view of a tall bank
    flat = torch.randn(1 + 4 * 40 * 72, generator=g)
    shards = [flat[1 + i * 40 * 72:1 + (i + 1) * 40 * 72].view(40, 72) for i in range(4)]
    grads, buffers = shards[:2], shards[2:]
    kernels.apply_update(grads, list(kernels.momentum_to_bank(grads, buffers, 0.95, True).unbind(0)), 1e-4, 0.99)
    tall = [torch.randn(72, 40, generator=g) for _ in range(2)]
    kernels.apply_update(tall, list(bank.mT.unbind(0)), 1e-4)

    images = torch.randint(0, 256, (2, 3, 16, 24), generator=g, dtype=torch.uint8)
    t, seeds = torch.rand(2, generator=g), torch.tensor([11, 12])
    kernels.patchify_and_noise(images, t, 8, seeds=seeds, out_dtype=torch.bfloat16)
    kernels.patchify_and_noise(images, t, 8, noise=torch.randn(2, 6, 192, generator=g), out_dtype=torch.bfloat16)
    patches = torch.randn(2, 6, 192, generator=g).bfloat16().requires_grad_()
    kernels.unpatchify(patches, 8, 16, 24).float().sum().backward()

    keep = kernels.select_kept_tokens(seeds, 9, 4)
    x = torch.randn(2, 9, 40, generator=g).bfloat16().requires_grad_()
    kept = kernels.route_gather(x, keep)
    kernels.route_scatter(kept * 2, x, keep).float().sum().backward()

    x_hat = torch.randn(2, 6, 192, generator=g).bfloat16().requires_grad_()
    kernels.flow_loss(x_hat, torch.randn(2, 6, 192, generator=g), t)[0].backward()
    channels = (64, 128, 256, 512, 512)
    feats = [torch.randn(2, c, 3, 5, generator=g).bfloat16().requires_grad_() for c in channels]
    targets = [torch.randn(2, c, 3, 5, generator=g).bfloat16() for c in channels]
    kernels.lpips_distance(feats, targets, [torch.rand(c, generator=g) for c in channels]).sum().backward()
    a = torch.randn(2, 7, 48, generator=g).bfloat16().requires_grad_()
    mask = torch.rand(2, 7, generator=g) > 0.3
    kernels.cosine_alignment(a, torch.randn(2, 7, 48, generator=g).bfloat16(), mask)[0].backward()


def _describe(value):
    """A launch argument as JSON: tensors by dtype and 16-byte alignment (all Triton specialises on)."""
    import torch

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"launch argument of type {type(value).__name__}")


def record_launches(workload) -> list[dict]:
    """Run `workload()` under the interpreter with the GPU's tiles and grids, launches not executed;
    one job per distinct (kernel, arguments' specialisation inputs)."""
    from triton.runtime.interpreter import InterpretedFunction

    import kernels
    import kernels.flow_matching
    import kernels.launch
    import kernels.lpips_head

    jobs: dict[str, dict] = {}

    def record(self, *args, grid, warmup, **kwargs):
        job = {"workload": getattr(workload, "__name__", ""), "module": self.fn.__module__, "kernel": self.fn.__name__,
               "args": [_describe(a) for a in args], "kwargs": {k: _describe(v) for k, v in kwargs.items()}}
        jobs.setdefault(json.dumps(job, sort_keys=True), job)

    gpu_programs = lambda device: 4 * H100_SMS  # noqa: E731 (launch.target_programs on an H100)
    patches = [(InterpretedFunction, "run", record), (kernels.launch, "interpreting", lambda: False)]
    patches += [(m, "target_programs", gpu_programs) for m in (kernels.launch, kernels.flow_matching,
                                                               kernels.lpips_head)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        with kernels.pinned("triton"):
            workload()
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
    return list(jobs.values())


# ----------------------------------------------------------------------------- 2. compile (real JIT)


def _argument(value):
    """The recorded argument back as something Triton's binder specialises identically."""
    import torch

    if isinstance(value, dict) and "tensor" in value:
        dtype = getattr(torch, value["tensor"])
        storage = torch.empty(32, dtype=dtype)  # CPU allocations are 64-byte aligned, like cudaMalloc's
        return storage if value["aligned"] else storage[1:]  # one element in: not 16-byte aligned
    return value


def ptxas_report(ptx: str, arch: str = "sm_90a") -> tuple[int, int]:
    """(registers per thread, spill bytes stored + loaded) from the bundled `ptxas -v`, with the
    flags Triton's own cubin step passes (`CUDABackend.make_cubin` in triton 3.7)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        done = subprocess.run([get_ptxas(90).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}",
                               str(source), "-o", str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed: {done.stderr[-800:]}")
    registers = re.search(r"Used (\d+) registers", done.stderr)
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", done.stderr)
    if registers is None:
        raise RuntimeError(f"no register count in ptxas -v output: {done.stderr[-800:]}")
    return int(registers.group(1)), sum(int(s) for s in spills)


class HopperLaunch:
    """One recorded launch bound as `JITFunction.run` binds it on an sm_90 GPU."""

    def __init__(self, job: dict):
        import importlib

        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        self.job = job
        self.kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
        self.target = GPUTarget("cuda", 90, 32)
        self.backend = make_backend(self.target)
        binder = create_function_from_signature(self.kernel.signature, self.kernel.params, self.backend)
        self.kwargs = {k: _argument(v) for k, v in job["kwargs"].items()}
        self.kwargs.setdefault("debug", False)
        self.kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        self.bound, self.specialization, self.options = binder(*(_argument(a) for a in job["args"]), **self.kwargs)
        # What the GPU's kernel cache keys on: two launches with one key run one compiled kernel.
        self.key = (job["module"], job["kernel"], repr(self.specialization), repr(sorted(self.options.items())))

    def compile(self) -> dict:
        import triton
        from triton.compiler import ASTSource

        options, signature, constexprs, attrs = self.kernel._pack_args(
            self.backend, self.kwargs, self.bound, self.specialization, self.options)
        compiled = triton.compile(ASTSource(self.kernel, signature, constexprs, attrs), target=self.target,
                                  options=options.__dict__)
        ptx = compiled.asm["ptx"]
        registers, spills = ptxas_report(ptx)
        warps, shared = compiled.metadata.num_warps, compiled.metadata.shared
        return {"kernel": self.job["kernel"], "launch": _launch_name(self.job, self.kernel.arg_names),
                "num_warps": warps, "num_stages": compiled.metadata.num_stages, "registers": registers,
                "spill_bytes": spills, "shared_bytes": shared, "wgmma": "wgmma.mma_async" in ptx,
                "blocks_per_sm": blocks_per_sm(registers, shared, warps),
                "intended_blocks": intended_blocks(self.job["kernel"], warps)}


def _launch_name(job: dict, names: list[str]) -> str:
    """The launch's constexprs, short (what tells two launches of one kernel apart)."""
    values = dict(zip(names, job["args"])) | job["kwargs"]
    shown = [f"{k}={v}" for k, v in values.items()
             if k.isupper() and not isinstance(v, dict) and v is not None]
    return " ".join(shown)


def _compile_one(job: dict) -> dict | str:
    """A row, or the failure naming the kernel (every kernel that fails is reported, not the first)."""
    try:
        return {"workload": job.get("workload", ""), **HopperLaunch(job).compile()}
    except Exception as exc:
        return f"{job['kernel']} {_launch_name(job, [])}: {type(exc).__name__}: {str(exc)[:600]}"


def compile_launches(jobs: list[dict], processes: int = 1) -> tuple[list[dict], list[str]]:
    """A row per distinct compiled kernel (launches that specialise alike share one, as in the
    GPU's kernel cache), and the failures; `processes` compile side by side."""
    distinct, failures = {}, []
    for job in jobs:
        try:
            distinct.setdefault(HopperLaunch(job).key, job)
        except Exception as exc:
            failures.append(f"{job['kernel']} {_launch_name(job, [])}: binding failed: {type(exc).__name__}: {exc}")
    if processes > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(processes) as pool:
            results = pool.map(_compile_one, list(distinct.values()), chunksize=1)
    else:
        results = [_compile_one(job) for job in distinct.values()]
    rows = [r for r in results if isinstance(r, dict)]
    return rows, failures + [r for r in results if isinstance(r, str)]


# Spills that sit on a path the kernel never takes, each with its bound and why. libdevice's
# precise sinf/cosf reduce arguments above 105,615 with a 28-byte local array (Payne-Hanek) and
# spill 4 bytes there; Box-Muller's angle is 2 pi u in [0, 2 pi), so that code never runs.
# (Compiled with the sin/cos replaced: 32 registers, no stack, no spill.)
COLD_PATH_SPILL_BYTES = {"_patchify_and_noise_kernel": 8}


def resource_problems(row: dict) -> list[str]:
    """What would make this launch slow or fail on Hopper."""
    problems = []
    name = f"{row['kernel']} ({row['launch']})"
    if row["spill_bytes"] > COLD_PATH_SPILL_BYTES.get(row["kernel"], 0):
        problems.append(f"{name} spills {row['spill_bytes']} bytes ({row['registers']} registers)")
    if row["shared_bytes"] > SHARED_PER_BLOCK:
        problems.append(f"{name} needs {row['shared_bytes']} bytes of shared memory; one block may have "
                        f"{SHARED_PER_BLOCK}")
    if row["blocks_per_sm"] < row["intended_blocks"]:
        problems.append(f"{name}: {row['blocks_per_sm']} block(s) per SM with {row['registers']} registers and "
                        f"{row['shared_bytes']} bytes of shared memory, {row['intended_blocks']} intended")
    if row["kernel"] in MATMUL_KERNELS and not row["wgmma"]:
        problems.append(f"{name} multiplies matrices without Hopper's wgmma")
    return problems


# ----------------------------------------------------------------------------- the two processes


def run_stage(stage: str, payload: str = "", workload: str = "prx") -> str:
    """Run a stage in a fresh process (the interpreter patches triton.language for good once it
    has run, so the compile stage cannot share its process)."""
    env = dict(os.environ, TRITON_INTERPRET="1" if stage == "record" else "0")  # "0" also stops bench/__init__
    done = subprocess.run([sys.executable, "-m", "bench.kernel_resources", f"--{stage}", "--workload", workload],
                          input=payload, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(f"bench.kernel_resources --{stage} failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


WORKLOADS = {"prx": prx_workload, "odd_shapes": odd_shapes_workload}


def measure(workload: str = "prx") -> tuple[list[dict], list[str]]:
    jobs = run_stage("record", workload=workload)
    result = json.loads(run_stage("compile", jobs))
    return result["rows"], result["failures"]


COLUMNS = ["kernel", "launch", "num_warps", "num_stages", "registers", "spill_bytes", "shared_bytes",
           "blocks_per_sm", "intended_blocks", "wgmma"]


def format_table(rows: list[dict]) -> str:
    header = f"{'kernel':<34}{'warps':>6}{'stages':>7}{'regs':>6}{'spill':>7}{'smem KiB':>10}{'blocks/SM':>11}" \
             f"{'wgmma':>7}  launch"
    lines = [header]
    for r in rows:
        blocks = f"{r['blocks_per_sm']}/{r['intended_blocks']}"
        lines.append(f"{r['kernel']:<34}{r['num_warps']:>6}{r['num_stages']:>7}{r['registers']:>6}"
                     f"{r['spill_bytes']:>7}{r['shared_bytes'] / 1024:>10.1f}{blocks:>11}"
                     f"{'yes' if r['wgmma'] else '-':>7}  {r['launch']}")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path = CSV_PATH) -> None:
    """The whole table of this commit (it replaces the previous one: compiled, not measured on a GPU)."""
    import triton

    stamp = {"date": datetime.date.today().isoformat(), "target": "sm_90a (compiled on the CPU)",
             "triton": triton.__version__}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*stamp, *COLUMNS])
        writer.writeheader()
        for row in rows:
            writer.writerow(stamp | {k: row[k] for k in COLUMNS})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--record", action="store_true", help=argparse.SUPPRESS)  # stage 1 (internal)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)  # stage 2 (internal)
    p.add_argument("--workload", default="prx", choices=sorted(WORKLOADS), help=argparse.SUPPRESS)
    p.add_argument("--no-csv", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.record:
        print(json.dumps(record_launches(WORKLOADS[args.workload])))
        return 0
    if args.compile:
        rows, failures = compile_launches(json.loads(sys.stdin.read()), processes=os.cpu_count() or 1)
        print(json.dumps({"rows": rows, "failures": failures}))
        return 0
    rows, failures = measure(args.workload)
    print(format_table(rows))
    problems = [p for r in rows for p in resource_problems(r)] + failures
    for line in problems:
        print(f"problem: {line}")
    if not args.no_csv:
        write_csv(rows)
        print(f"wrote {CSV_PATH.relative_to(ROOT)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
