"""How the global batch splits over processes and micro-batches, and what to change when a
micro-batch does not fit in memory.

global batch = processes x micro-batch x accumulation steps. The user sets the global batch
(`train.batch_size`) and the micro-batch that fits (`parallel.micro_batch`); the accumulation
steps follow. Derived once per run, at start, and printed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prx.config import Config, ConfigError


class OutOfMemory(RuntimeError):
    """A step ran out of device memory; the message names the settings that lower its memory."""


@dataclass(frozen=True)
class BatchPlan:
    """global batch = world_size x micro_batch x accumulation."""

    global_batch: int
    world_size: int
    local_batch: int  # samples per rank per optimizer step
    micro_batch: int  # samples per rank per forward/backward
    accumulation: int

    @staticmethod
    def derive(global_batch: int, world_size: int, micro_batch: int = 0) -> "BatchPlan":
        if global_batch % world_size:
            raise ConfigError(f"train.batch_size={global_batch} is not divisible by {world_size} processes")
        local = global_batch // world_size
        micro = micro_batch or local
        if local % micro:
            raise ConfigError(f"per-rank batch {local} (train.batch_size={global_batch} over {world_size} "
                              f"processes) is not divisible by parallel.micro_batch={micro}")
        return BatchPlan(global_batch, world_size, local, micro, local // micro)

    def micro_batches(self) -> list[slice]:
        """The rows of this rank's batch that each forward/backward takes, in order."""
        return [slice(i * self.micro_batch, (i + 1) * self.micro_batch) for i in range(self.accumulation)]

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.world_size} process(es) x micro-batch "
                f"{self.micro_batch} x {self.accumulation} accumulation step(s)")

    def out_of_memory(self, err: torch.OutOfMemoryError, cfg: Config) -> OutOfMemory:
        """What ran out, with this plan's micro-batch, and what to set instead (global batch kept)."""
        first_line = (str(err).strip().splitlines() or ["out of memory"])[0]
        tips = []
        smaller = next((m for m in range(self.micro_batch - 1, 0, -1) if self.local_batch % m == 0), None)
        if smaller:
            tips.append(f"--set parallel.micro_batch={smaller} (gradient accumulation keeps the global batch "
                        f"of {self.global_batch})")
        if cfg.parallel.activation_checkpointing != "full":
            tips.append("--set parallel.activation_checkpointing=full (blocks recompute activations in backward)")
        if not cfg.parallel.reshard_after_forward:
            tips.append("--set parallel.reshard_after_forward=true")
        advice = "; or ".join(tips) if tips else "more GPUs, or a smaller train.batch_size"
        return OutOfMemory(f"out of device memory with micro-batch {self.micro_batch} per process at "
                           f"{cfg.data.resolution} px ({first_line}). Try {advice}")
