"""EMA over seven "optimizer steps" on a small model, on one process or FSDP2-sharded over the
ranks of a torchrun (gloo, uneven row shards). Saves the full shadow, the weights seen inside
`swapped_into`, the weights after it, and forward outputs before, inside and after it
(a no-grad forward leaves FSDP2's root unsharded: the swap must not be fooled by that).
Used by tests/test_ema.py.

usage: ema_worker.py OUT.pt [DCP_DIR]   (DCP_DIR: also save {"ema": ema.state_dict()} there)
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor, distribute_tensor  # noqa: E402

from prx.recipe.ema import EMA  # noqa: E402

DECAY, EVERY, STEPS = 0.9, 3, 7


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 7))  # 5 and 7 rows: uneven over 2


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def set_weights(model: nn.Module, step: int) -> None:
    """Stands in for an optimizer step: new full values, sharded like each parameter."""
    g = torch.Generator().manual_seed(100 + step)
    with torch.no_grad():
        for p in model.parameters():
            value = torch.randn(p.shape, generator=g)
            if isinstance(p, DTensor):
                value = distribute_tensor(value, p.device_mesh, p.placements)
            p.copy_(value)


def run(out: str, dcp_dir: str | None = None) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = small_model()
    if world > 1:
        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
    ema = EMA(model, DECAY, EVERY)
    for step in range(1, STEPS + 1):
        set_weights(model, step)
        ema.update(step)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(7))
    result = {f"shadow.{k}": full(v) for k, v in ema.state_dict().items()}
    with torch.no_grad():
        result["out_before"] = model(x)  # FSDP2's root now holds gathered training weights
    with torch.no_grad(), ema.swapped_into(model):
        result["out_ema"] = model(x)
        result |= {f"swapped.{k}": full(p) for k, p in model.named_parameters()}
    with torch.no_grad():
        result["out_train"] = model(x)
    result |= {f"restored.{k}": full(p) for k, p in model.named_parameters()}
    result["sharded"] = torch.tensor(all(isinstance(s, DTensor) for s in ema.shadow))
    if dcp_dir:
        dcp.save({"ema": ema.state_dict()}, checkpoint_id=dcp_dir)
    if world == 1 or dist.get_rank() == 0:
        torch.save(result, out)
    if world > 1:
        dist.barrier()  # no rank tears gloo down while another still talks (aborts otherwise)
        dist.destroy_process_group()


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
    # torch 2.13 + gloo: now and then a rank aborts during interpreter teardown, after a clean
    # destroy_process_group ("terminate called without an active exception": gloo threads meet a
    # finalising interpreter, cf. pytorch/pytorch#179291; tests/muon_worker.py shows it too).
    # Everything is saved and closed by now, so leave without the teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
