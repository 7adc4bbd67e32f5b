"""Parallelism applied to a built model, in torchtitan's order, each step switched by config:

1. activation checkpointing per block ("full": every block; "selective": every k-th block),
2. per-block `torch.compile(fullgraph=True)` (identical blocks share one compiled graph),
3. FSDP2 `fully_shard` per block, then at the root, with bf16 compute and fp32 gradient
   reduction (docs/recipe.md section 6: bf16-stored weights cost 3.7 FID, so parameters stay fp32).

The model code knows nothing of this. How the global batch splits over ranks and micro-batches
is `prx.run.batch_plan`.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from prx.config import ParallelConfig


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int) -> None:
    """Recompute block activations in backward: all blocks, or every `every`-th one."""
    if mode == "none":
        return
    for i, block in enumerate(model.blocks):
        if mode == "full" or (mode == "selective" and i % every == 0):
            model.blocks[i] = checkpoint_wrapper(block)


# How many graphs a block may compile before dynamo gives up and runs it eagerly (default 8).
# Shapes alone stay few: a second token count or caption length recompiles the block once with
# that size symbolic, and every later aspect bucket and caption length reuses it (4 graphs for 8
# shapes in a CPU trial). But each variant of the call multiplies them: static or symbolic, with
# or without a text mask, TREAD route and REPA capture, training or sampling under no_grad.
RECOMPILE_LIMIT = 64


def apply_compile(model: nn.Module, backend="inductor") -> None:
    """Compile each block in place (names unchanged); the blocks share code, so one graph.
    `backend`: torch.compile's (e.g. "aot_eager" to tell a dynamo problem from an inductor one)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in model.blocks:
        block.compile(fullgraph=True, backend=backend)


def apply_fsdp(model: nn.Module, device: torch.device, cfg: ParallelConfig, compute_dtype: torch.dtype) -> None:
    """Shard every block and then the root over all ranks (FSDP2)."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # Inputs stay as they come: FSDP2's default casts every float argument of a sharded module to
    # bf16, which rounds the timesteps before the sinusoidal embedding of 1000 t (an error of up
    # to 2 in its argument) and the blocks' fp32 RoPE tables. Autocast casts at the matmuls, so
    # only parameters go bf16 here. With the default, tests/fsdp_worker.py (on the CPU, bf16)
    # saw gradient errors of 2 to 28 %, up to 36 times plain autocast's; now at most 1.3 times.
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.reshard_after_forward)
    # PRX returns the final Linear's output, a view of its 2-D matmul; FSDP2 warns that an in-place
    # op on it would skip its backward hook. The loop and the sampler never write into it.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPPRX\) returned a view tensor")


def parallelize(model: nn.Module, cfg: ParallelConfig, device: torch.device, world_size: int,
                compute_dtype: torch.dtype) -> nn.Module:
    """Apply checkpointing, compile and data parallelism in that order; returns the model to call."""
    apply_activation_checkpointing(model, cfg.activation_checkpointing, cfg.checkpoint_every_n_blocks)
    if cfg.compile:
        apply_compile(model)
    if world_size > 1:
        if cfg.data_parallel == "fsdp":
            apply_fsdp(model, device, cfg, compute_dtype)
        else:
            return nn.parallel.DistributedDataParallel(model)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the gradient reduction on all but the last micro-batch of an accumulation."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = enabled
