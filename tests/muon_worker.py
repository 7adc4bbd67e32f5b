"""Three Muon + Adam steps on the `Blocks` test model, on one process or FSDP2-sharded over the
ranks of a torchrun; every rank gets the same full gradients (sharded like the parameters).
Saves the full parameters to the path given. Used by tests/test_optim.py."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor, distribute_tensor  # noqa: E402

from tests.test_optim import Blocks, muon_optimizer  # noqa: E402


def main(out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = Blocks()
    if world > 1:
        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = muon_optimizer(model)  # Newton-Schulz in fp64: the paths must agree to rounding
    for step in range(3):
        g = torch.Generator().manual_seed(100 + step)
        for p in model.parameters():
            full = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.grad = distribute_tensor(full, p.device_mesh, p.placements) if isinstance(p, DTensor) else full
        optimizer.step()
    state = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
             for name, p in model.named_parameters()}
    if world == 1 or dist.get_rank() == 0:
        torch.save(state, out)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # torch 2.13 + gloo: a rank sometimes aborts during interpreter teardown after a clean
    # destroy_process_group ("terminate called without an active exception"); the results are
    # saved by now, so leave without the teardown.
    sys.stdout.flush()
    os._exit(0)
