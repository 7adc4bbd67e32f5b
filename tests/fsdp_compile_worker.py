"""The PRX presets' parallel model (FSDP2 + per-block compile, here with activation checkpointing
on as well) built by `prx.run.parallel.parallelize` as train.py builds it, checked against the
unsharded eager model without checkpointing. On the CPU with gloo (`--cpu`, 2 ranks, fp32 compute),
or on a GPU (bf16 compute, train.py's default) with NCCL (one rank: a machine here has one GPU)
or with two ranks on it over gloo (`--gloo`; tests.fsdp_worker.init_distributed).
`--backend` is torch.compile's (inductor, as train.py, unless given), `--ac` the checkpointing
mode (selective unless given). Run under torchrun by tests/test_parallel.py and
tests/test_train_gpu.py; exits non-zero naming every failed check.

Each rank feeds its own micro-batch; the reference runs every rank's micro-batch and averages
the gradients, as FSDP2's reduce-scatter does. Checks:
1. The blocks are what parallelize should make of them: checkpoint-wrapped where the mode says,
   compiled, FSDP2-sharded.
2. This rank's output and every parameter's gradient (gathered), against the reference: in fp32
   within FP32_TOL; in bf16 within twice plain autocast's error (docs/architecture.md's rule).
"""

import copy
import dataclasses
import functools
import os
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402

from prx import precision  # noqa: E402
from prx.config import preset  # noqa: E402
from prx.model.denoiser import PRX  # noqa: E402
from prx.run import parallel  # noqa: E402
from tests.fsdp_worker import CFG, full, init_distributed, rel_err  # noqa: E402

# fp32: inductor's fused kernels sum in another order than eager. Measured on the CPU, 2 ranks:
# with "aot_eager" every output and gradient is bit-equal to the reference (halving is exact, so
# the reduce-scatter's average equals the reference's); with inductor at most 3.2e-7 of norm.
# 1e-5 leaves 30 times that, while the sum of the ranks' gradients instead of their average is
# off by 0.5, and the other rank's micro-batch puts the output off by 1.2 (both tried).
FP32_TOL = 1e-5


def arg(flag: str, default: str) -> str:
    return sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv else default


def micro_batch(rank: int, device: torch.device) -> tuple:
    """Rank `rank`'s micro-batch: its own noise, timesteps, captions, and caption lengths."""
    g = torch.Generator(device="cpu").manual_seed(100 + rank)
    b, n, text_len = 2, 48, 11
    mask = torch.arange(text_len)[None] < torch.tensor([[11], [3 + 4 * rank]])
    return tuple(t.to(device) for t in (torch.randn(b, n, CFG.patch_dim, generator=g), torch.rand(b, generator=g),
                                        torch.randn(b, text_len, CFG.text_dim, generator=g), mask)) + ((6, 8),)


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return out.float().square().mean() + out.float().mean()


def reference_run(model, batches, autocast) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Every rank's micro-batch through the unsharded eager model; the gradients averaged over them."""
    outs = []
    for x, t, text, mask, grid in batches:
        with autocast:
            out = model(x, t, text, mask, grid).x_hat
        (loss_of(out) / len(batches)).backward()
        outs.append(out.detach())
    return outs, {name: p.grad for name, p in model.named_parameters()}


def structure_failures(model, mode: str, every: int) -> list[str]:
    failures = []
    for i, block in enumerate(model.blocks):
        checkpointed = mode == "full" or (mode == "selective" and i % every == 0)
        if isinstance(block, CheckpointWrapper) != checkpointed:
            failures.append(f"block {i}: {type(block).__name__}, want checkpointed={checkpointed}")
        if getattr(block, "_compiled_call_impl", None) is None:
            failures.append(f"block {i}: not compiled")
        if not isinstance(block, FSDPModule):
            failures.append(f"block {i}: not FSDP2-sharded")
    return failures


def main() -> None:
    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    compute_dtype, autocast = precision.compute_dtype("bf16", device), precision.autocast("bf16", device)
    # The presets' parallel settings (FSDP2, compile; checkpointing off), checkpointing turned on:
    # "selective" every 2nd block of 3 wraps blocks 0 and 2 and leaves block 1, so one run has
    # a compiled block with and one without the wrapper.
    mode, backend = arg("--ac", "selective"), arg("--backend", "inductor")
    cfg = dataclasses.replace(preset("prx_small_512").parallel, activation_checkpointing=mode)

    torch.manual_seed(0)
    reference = PRX(CFG)
    for p in reference.parameters():  # adaLN-Zero starts at zero: give every path a signal
        torch.nn.init.normal_(p, std=0.05)
    reference = reference.to(device)
    autocast_model, model = copy.deepcopy(reference), copy.deepcopy(reference)
    torch._dynamo.reset()
    # train.py's call (AC, then compile, then FSDP2); parallelize always compiles with inductor, so
    # another backend is put in by wrapping its apply_compile, the rest unchanged.
    with mock.patch.object(parallel, "apply_compile", functools.partial(parallel.apply_compile, backend=backend)):
        model = parallel.parallelize(model, cfg, device, world, compute_dtype)
    if world == 1:  # parallelize shards only across processes; one GPU still runs FSDP2's hooks over a 1-rank mesh
        parallel.apply_fsdp(model, device, cfg, compute_dtype)
    failures = [f"rank {rank} {f}" for f in structure_failures(model, mode, cfg.checkpoint_every_n_blocks)]

    batches = [micro_batch(r, device) for r in range(world)]
    x, t, text, mask, grid = batches[rank]
    with autocast:
        out = model(x, t, text, mask, grid).x_hat
    loss_of(out).backward()
    # checkpoint_wrapper puts its module under a prefix (state_dict hides it; named_parameters not)
    grads = {name.replace("_checkpoint_wrapped_module.", ""): full(p.grad) for name, p in model.named_parameters()}
    fp32 = torch.autocast(device.type, enabled=False)
    outs_ref, grads_ref = reference_run(reference, batches, fp32)
    if compute_dtype == torch.float32:
        bounds = {name: FP32_TOL for name in ["output", *grads_ref]}
    else:  # the low-precision rule: no worse than twice eager autocast's own error
        outs_amp, grads_amp = reference_run(autocast_model, batches, autocast)
        bounds = {"output": 2 * rel_err(outs_amp[rank], outs_ref[rank]) + 1e-3}
        bounds |= {name: 2 * rel_err(grads_amp[name], ref) + 1e-3 for name, ref in grads_ref.items()}
    errors = {"output": rel_err(out.detach(), outs_ref[rank])}
    errors |= {name: rel_err(grads[name], ref) for name, ref in grads_ref.items()}
    for name, error in errors.items():
        if not error <= bounds[name]:  # `not <=`: a NaN fails too
            failures.append(f"rank {rank} {name}: error {error:.2e} > {bounds[name]:.2e}")
    worst = max(errors, key=errors.get)
    print("\n".join(failures) or f"rank {rank}: FSDP2 + compile ({backend}) + {mode} checkpointing on {device.type}, "
          f"{compute_dtype}: every check passed (largest error {errors[worst]:.1e}, {worst})", flush=True)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(1 if failures else 0)  # gloo may abort in interpreter teardown (tests/muon_worker.py)


if __name__ == "__main__":
    main()
