"""Process setup for `python train.py` and `torchrun train.py`: rank, world size, device,
and the few collectives the loop needs. How the model is spread over ranks is `prx.run.parallel`.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(preference: str, local_rank: int = 0, option: str = "train.device") -> torch.device:
    """This process's device for `preference` (auto | cpu | cuda); `option` is the setting the
    user typed, named in the one-line ConfigError (train.device, or the sample command's --device)."""
    from prx.config import ConfigError  # here, not at the top: this function is its only user

    if preference not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"{option}={preference!r}: must be one of auto, cpu, cuda")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}=cuda but torch.cuda.is_available() is False (no CUDA device visible, or "
                          f"torch {torch.__version__} built without CUDA); use --device cpu or auto")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if local_rank >= torch.cuda.device_count():  # more processes on this node than GPUs
            raise ConfigError(f"LOCAL_RANK={local_rank} but {torch.cuda.device_count()} CUDA device(s) are "
                              "visible; start at most one process per GPU (torchrun --nproc-per-node)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_preference: str) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=_rendezvous_store(rank, world_size),
                                rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, device)


def _rendezvous_store(rank: int, world_size: int) -> dist.Store:
    """The torchrun store, with keys prefixed by the restart attempt.

    After `torchrun --max-restarts` restarts a failed worker group, the store can still hold the
    dead workers' addresses under the same keys, and the new workers were seen to connect to
    those and hang. A fresh prefix per attempt (TORCHELASTIC_RESTART_COUNT) rules that out.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=not agent_hosts_store and rank == 0,
                          timeout=datetime.timedelta(minutes=10))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"prx/attempt{attempt}", store)


def process_rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if dist.is_initialized() else 0


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.AVG if t.is_cuda else dist.ReduceOp.SUM)
        if not t.is_cuda:  # gloo has no AVG
            t /= dist.get_world_size()
    return t


def gather_to_main(local: torch.Tensor, positions: list[int], total: int) -> torch.Tensor | None:
    """Rank 0 receives every rank's rows, placed at their `positions` of a (total, ...) tensor."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return local
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (positions, local.cpu()))
    if dist.get_rank() != 0:
        return None
    out = local.new_empty((total, *local.shape[1:]), device="cpu")
    for rank_positions, rows in parts:
        out[rank_positions] = rows
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        # Every rank past its last collective before any tears the group down: on gloo a rank that
        # destroyed its group right after an all-reduce left the other hanging in 2 of 8 CPU runs.
        dist.barrier()
        dist.destroy_process_group()
