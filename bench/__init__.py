"""Benchmarks, run as modules from the repository root: `python -m bench.bench_step ...`.

Without a CUDA device the Triton kernels that a benchmark calls run under the Triton interpreter
(set here, before anything imports triton), for the CPU smoke runs; their numbers mean nothing.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
