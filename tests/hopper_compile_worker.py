"""Compile recorded Triton launches for sm_90 (H100/H200) to cubins, in a process where the
kernels are real JIT functions (the interpreter patches triton.language once it has run, so
this cannot happen in the process that recorded them). Reads a JSON list of
{"module", "kernel", "signature", "constexprs", "options"} on stdin; prints a JSON list of
failures. Used by tests/test_kernels_compile.py."""

import importlib
import json
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

HOPPER_SHARED_MEMORY = 232448  # bytes per block on sm_90 (227 KiB)
failures = []
for launch in json.load(sys.stdin):
    kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    try:
        source = ASTSource(fn=kernel, signature=launch["signature"], constexprs=launch["constexprs"])
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch["options"])
        if not compiled.asm.get("cubin"):
            raise RuntimeError("no cubin")
        if compiled.metadata.shared > HOPPER_SHARED_MEMORY:  # would fail at launch (OutOfResources)
            raise RuntimeError(f"needs {compiled.metadata.shared} bytes of shared memory, "
                               f"the H100/H200 has {HOPPER_SHARED_MEMORY} per block")
    except Exception as exc:  # report every kernel that fails, not only the first
        failures.append(f"{launch['kernel']} {launch['constexprs']}: {type(exc).__name__}: {str(exc)[:600]}")
print(json.dumps(failures))
