"""FSDP2 as train.py applies it, with bf16 compute, checked against the unsharded model: on the
CPU with gloo (`--cpu`), on a GPU with NCCL (one rank: a machine here has one GPU), or with every
rank on that one GPU over gloo (`--gloo`: NCCL refuses two ranks on one device). Run under
torchrun by tests/test_parallel.py and tests/test_train_gpu.py; exits non-zero with the failed
checks' messages.

1. Forward and every gradient with bf16 compute (FSDP2's bf16 parameters under autocast): no
   further from the fp32 model than plain autocast is, within twice its error (the low-precision
   rule of docs/architecture.md).
2. Parameters and gradients stay fp32 (docs/recipe.md section 6: bf16-stored weights cost 3.7 FID).
3. One Muon + Adam step from the same gradients: the sharded path (rows all-to-all'd to the
   matrix's owner, as uint8; with more than one rank) moves every parameter exactly as the
   unsharded one does.
"""

import copy
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DTensor, distribute_tensor  # noqa: E402

from prx.config import ModelConfig, ParallelConfig, preset  # noqa: E402
from prx.model.denoiser import PRX  # noqa: E402
from prx.optim import build_optimizer  # noqa: E402
from prx.run.parallel import apply_fsdp  # noqa: E402

CFG = ModelConfig(patch_size=4, bottleneck_dim=32, hidden_dim=128, depth=3, num_heads=4, text_dim=48,
                  time_embed_dim=64)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((full(a).float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def init_distributed() -> torch.device:
    """This rank's device and process group, from the flags: `--cpu` gloo on the CPU; `--gloo` gloo
    with every rank on cuda:0 (it stages CUDA tensors through pinned host memory, so unlike NCCL it
    takes two ranks on one GPU); otherwise NCCL with a GPU per rank."""
    gloo_on_gpu = "--gloo" in sys.argv
    index = 0 if gloo_on_gpu else int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu" if "--cpu" in sys.argv else "cuda", index)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.init()  # initialized now, init_device_mesh keeps this device (not cuda:LOCAL_RANK)
    dist.init_process_group("nccl" if device.type == "cuda" and not gloo_on_gpu else "gloo")
    return device


def forward_backward(model, inputs, autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x, t, text, mask, grid = inputs
    with torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
        out = model(x, t, text, mask, grid).x_hat
    (out.float().square().mean() + out.float().mean()).backward()
    return out.detach(), {name: full(p.grad) for name, p in model.named_parameters()}


def main() -> None:
    device = init_distributed()
    torch.manual_seed(0)
    reference = PRX(CFG)
    for p in reference.parameters():  # adaLN-Zero starts at zero: give every path a signal
        torch.nn.init.normal_(p, std=0.05)
    reference = reference.to(device)
    autocast_model, sharded = copy.deepcopy(reference), copy.deepcopy(reference)
    apply_fsdp(sharded, device, ParallelConfig(), torch.bfloat16)

    g = torch.Generator(device=device).manual_seed(1)
    b, n, text_len = 4, 48, 11
    mask = torch.arange(text_len, device=device)[None] < torch.tensor([[11], [7], [3], [11]], device=device)
    inputs = (torch.randn(b, n, CFG.patch_dim, device=device, generator=g),
              torch.rand(b, device=device, generator=g),
              torch.randn(b, text_len, CFG.text_dim, device=device, generator=g), mask, (6, 8))

    out_ref, grads_ref = forward_backward(reference, inputs, autocast=False)
    out_amp, grads_amp = forward_backward(autocast_model, inputs, autocast=True)
    out_fsdp, grads_fsdp = forward_backward(sharded, inputs, autocast=True)
    failures = []
    bound = 2 * rel_err(out_amp, out_ref) + 1e-3
    if rel_err(out_fsdp, out_ref) > bound:
        failures.append(f"output: FSDP2 error {rel_err(out_fsdp, out_ref):.2e} > {bound:.2e}")
    for name, ref in grads_ref.items():
        bound = 2 * rel_err(grads_amp[name], ref) + 1e-3
        if rel_err(grads_fsdp[name], ref) > bound:
            failures.append(f"grad {name}: FSDP2 error {rel_err(grads_fsdp[name], ref):.2e} > {bound:.2e}")
    for name, p in sharded.named_parameters():
        if p.dtype != torch.float32 or p.grad.dtype != torch.float32 or not isinstance(p, DTensor):
            failures.append(f"{name}: {type(p).__name__} {p.dtype}, grad {p.grad.dtype}; want fp32 DTensors")

    cfg = dataclasses.replace(preset("prx_small_512"), model=CFG)  # Muon + Adam, Triton Newton-Schulz on GPU
    for model in (reference, sharded):  # the same gradients on both: the fp32 reference's
        for name, p in model.named_parameters():
            p.grad = (distribute_tensor(grads_ref[name], p.device_mesh, p.placements)
                      if isinstance(p, DTensor) else grads_ref[name].clone())
        build_optimizer(model, cfg).step()
    moved = dict(sharded.named_parameters())
    for name, p in reference.named_parameters():
        if not torch.equal(full(moved[name]).detach(), p.detach()):
            failures.append(f"Muon/Adam step of {name}: sharded differs by "
                            f"{(full(moved[name]) - p).abs().max().item():.2e}")
    print("\n".join(failures) or f"FSDP2 on {device.type}: every check passed", flush=True)
    dist.destroy_process_group()
    os._exit(1 if failures else 0)  # gloo may abort in interpreter teardown (tests/muon_worker.py)


if __name__ == "__main__":
    main()
