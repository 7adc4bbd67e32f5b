"""Every Triton kernel compiles for Hopper (sm_90a: H100 and H200) as a GPU would compile it, and
fits the SM as intended: no spills, the resident blocks it is meant to have, `wgmma` in the
matmuls. On this CPU, with Triton's bundled ptxas (no GPU, no CUDA install).

The interpreter runs kernels as Python, so a kernel can pass every CPU test and still fail to
compile, spill, or ask for more shared memory than an SM has. `bench.kernel_resources` records
each launch at the PRX shapes and at small odd ones under the interpreter (the kernels are not
run), then compiles each with the specialisation Triton's own binder derives on a GPU (16-byte
alignment, divisibility by 16, i32/i64) and reads ptxas -v; `python -m bench.kernel_resources`
prints the same table.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs the Triton interpreter (on a GPU the GPU tests compile and run the kernels)",
                allow_module_level=True)

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import kernels  # noqa: E402
from bench import kernel_resources as resources  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KERNEL_MODULES = ("cosine", "flow_matching", "lpips_head", "muon", "muon_update", "patchify", "routing")


def compile_for_hopper(jobs: list[dict]) -> dict:
    """The compile stage in its own process (the interpreter has patched triton.language here)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-m", "bench.kernel_resources", "--compile"], input=json.dumps(jobs),
                          capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compiled():
    prx = resources.record_launches(resources.prx_workload)
    odd = resources.record_launches(resources.odd_shapes_workload)
    # One launch made too big for Hopper: the check must see it (4 stages of 256 x 128 + 128 x 256
    # bf16 tiles = 512 KiB of shared memory; an SM has 228 KiB).
    oversized = next(job for job in prx if job["kernel"] == "_polynomial_step_kernel")
    oversized = json.loads(json.dumps(oversized))
    oversized["kwargs"].update(BLOCK=256, BLOCK_K=128, num_stages=4)
    result = compile_for_hopper(prx + odd + [oversized])
    return {"jobs": (prx, odd), **result}


def test_every_kernel_is_launched_at_the_prx_shapes(compiled):
    launched = {job["kernel"] for job in compiled["jobs"][0]}
    defined = {obj.fn.__name__ for name in KERNEL_MODULES
               for obj in vars(getattr(kernels, f"_{name}")).values()
               if isinstance(obj, InterpretedFunction) and obj.fn.__name__.endswith("_kernel")}  # not helpers
    assert defined and defined <= launched, f"never launched here: {sorted(defined - launched)}"


def test_every_launch_compiles_for_hopper(compiled):
    assert not compiled["failures"], "\n".join(compiled["failures"])
    assert len(compiled["rows"]) >= 30


def test_no_kernel_spills_or_misses_its_occupancy(compiled):
    """At the PRX shapes. (The odd shapes only have to compile: at M = 40, K = 72, sizes that are
    not multiples of 16, the matmuls spill; no GPU run uses them.)"""
    rows = [r for r in compiled["rows"]
            if r["workload"] == "prx_workload" and "BLOCK=256 BLOCK_K=128" not in r["launch"]]
    print("\n" + resources.format_table(rows))
    problems = [p for row in rows for p in resources.resource_problems(row)]
    assert not problems, "\n".join(problems)
    matmuls = [r for r in rows if r["kernel"] in resources.MATMUL_KERNELS]
    assert matmuls and all(r["wgmma"] for r in matmuls)


def test_a_tile_too_big_for_hopper_is_caught(compiled):
    big = [r for r in compiled["rows"] if "BLOCK=256 BLOCK_K=128" in r["launch"]]
    assert len(big) == 1 and big[0]["shared_bytes"] > resources.SHARED_PER_BLOCK
    assert any("shared memory" in p for p in resources.resource_problems(big[0]))


@pytest.mark.parametrize("registers, shared, warps, blocks", [
    (124, 98_304, 8, 2),   # the Newton-Schulz matmul: 2 x 96 KiB + 2 KiB reserved fit in 228 KiB
    (128, 0, 8, 2),        # 128 x 32 x 8 = 32,768 registers a block
    (129, 0, 8, 1),        # rounded up to 136 a thread: two blocks need 69,632 > 65,536
    (32, 0, 4, 16),        # limited by the 64 warps of an SM
    (16, 0, 1, 32),        # by the 32 blocks of an SM
    (40, 116_736, 4, 1),   # 2 x (114 KiB + 1 KiB reserved) > 228 KiB
])
def test_blocks_per_sm_follow_the_occupancy_rules(registers, shared, warps, blocks):
    assert resources.blocks_per_sm(registers, shared, warps) == blocks
