"""Every Triton kernel compiles for Hopper (sm_90: H100 and H200) down to a cubin, on this CPU.

The interpreter runs kernels as Python, so a kernel can pass every CPU test and still fail to
compile for a GPU (a loop-carried type change, a shape the layout pass rejects, too much shared
memory for the GPU's tile sizes). Here each op runs once under the interpreter with the block
sizes its launcher picks on a GPU; the launches are recorded; then a separate process
(tests/hopper_compile_worker.py) compiles each recorded kernel for sm_90 with the argument
types, constexprs, num_warps and num_stages it was given. Triton ships ptxas, so no GPU and
no CUDA install is needed.
"""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs the Triton interpreter (on a GPU the GPU tests compile and run the kernels)",
                allow_module_level=True)

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import kernels.cosine as kernel_cosine  # noqa: E402
import kernels.flow_matching as kernel_flow_matching  # noqa: E402
import kernels.launch as kernel_launch  # noqa: E402
import kernels.lpips_head as kernel_lpips_head  # noqa: E402
import kernels.muon as kernel_ns  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int64: "*i64",
           torch.int32: "*i32", torch.uint8: "*u8", torch.int8: "*i8", torch.bool: "*i1"}
OPTIONS = ("num_warps", "num_stages", "num_ctas")


def exercise_every_op():
    """Forward and backward of every op, bf16 where training uses it, at small shapes."""
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(2, 40, 72, generator=g).bfloat16()
    kernel_ns.newton_schulz(bank, [(3.4445, -4.7750, 2.0315)] * 2)
    kernel_ns.newton_schulz(bank.mT.contiguous(), [(3.4445, -4.7750, 2.0315)] * 1)  # tall

    from kernels import patchify as kp
    from kernels import routing as kr
    images = torch.randint(0, 256, (2, 3, 16, 24), generator=g, dtype=torch.uint8)
    t = torch.rand(2, generator=g)
    seeds = torch.tensor([11, 12])
    kp.patchify_and_noise(images, t, 8, seeds=seeds, out_dtype=torch.bfloat16)
    kp.patchify_and_noise(images, t, 8, noise=torch.randn(2, 6, 192, generator=g), out_dtype=torch.bfloat16)
    patches = torch.randn(2, 6, 192, generator=g).bfloat16().requires_grad_()
    kp.unpatchify(patches, 8, 16, 24).float().sum().backward()

    keep = kr.select_kept_tokens(seeds, 9, 4)
    x = torch.randn(2, 9, 40, generator=g).bfloat16().requires_grad_()
    kept = kr.route_gather(x, keep)
    kr.route_scatter(kept * 2, x, keep).float().sum().backward()

    x_hat = torch.randn(2, 6, 192, generator=g).bfloat16().requires_grad_()
    kernel_flow_matching.flow_loss(x_hat, torch.randn(2, 6, 192, generator=g), t)[0].backward()
    feats = [torch.randn(2, c, 3, 5, generator=g).bfloat16().requires_grad_() for c in (64, 128, 256, 512, 512)]
    targets = [torch.randn(2, c, 3, 5, generator=g).bfloat16() for c in (64, 128, 256, 512, 512)]
    heads = [torch.rand(c, generator=g) for c in (64, 128, 256, 512, 512)]
    kernel_lpips_head.lpips_distance(feats, targets, heads).sum().backward()
    a = torch.randn(2, 7, 48, generator=g).bfloat16().requires_grad_()
    mask = torch.rand(2, 7, generator=g) > 0.3
    kernel_cosine.cosine_alignment(a, torch.randn(2, 7, 48, generator=g).bfloat16(), mask)[0].backward()


def signature_of(fn, args, kwargs):
    params = list(inspect.signature(fn).parameters.values())
    values = dict(zip((p.name for p in params), args))
    values.update({k: v for k, v in kwargs.items() if k not in OPTIONS})
    signature, constexprs = {}, {}
    for p in params:
        value = values[p.name]
        if "constexpr" in str(p.annotation) or value is None:
            signature[p.name], constexprs[p.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = POINTER[value.dtype]
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} of type {type(value).__name__}")
    return signature, constexprs


@pytest.fixture(scope="module")
def launches():
    recorded = {}
    original = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        recorded.setdefault((self.fn.__name__, tuple(sorted(
            (k, v) for k, v in kwargs.items() if not isinstance(v, torch.Tensor)))), (self.fn, args, kwargs))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    patch = pytest.MonkeyPatch()
    patch.setattr(InterpretedFunction, "run", recording_run)
    patch.setattr(kernel_launch, "interpreting", lambda: False)  # the GPU's tile and grid sizes
    try:
        exercise_every_op()
    finally:
        patch.undo()
    return recorded


def test_every_kernel_is_exercised(launches):
    names = {name for name, _ in launches}
    defined = {
        obj.fn.__name__
        for module in (kernel_ns, kernel_flow_matching, kernel_lpips_head, kernel_cosine,
                       __import__("kernels.patchify").patchify,
                       __import__("kernels.routing").routing)
        for obj in vars(module).values()
        if isinstance(obj, InterpretedFunction) and obj.fn.__name__.endswith("_kernel")  # not device helpers
    }
    assert defined and defined <= names, f"never launched here: {sorted(defined - names)}"


def test_every_launch_compiles_for_hopper(launches):
    jobs = []
    for fn, args, kwargs in launches.values():
        signature, constexprs = signature_of(fn, args, kwargs)
        jobs.append({"module": fn.__module__, "kernel": fn.__name__, "signature": signature,
                     "constexprs": constexprs, "options": {k: kwargs[k] for k in OPTIONS if k in kwargs}})
    worker = subprocess.run([sys.executable, str(ROOT / "tests" / "hopper_compile_worker.py")],
                            input=json.dumps(jobs), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert worker.returncode == 0, worker.stderr[-3000:]
    failures = json.loads(worker.stdout.strip().splitlines()[-1])
    assert len(jobs) >= 19 and not failures, "\n".join(failures)
