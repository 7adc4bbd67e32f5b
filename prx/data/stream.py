"""The order in which a finite dataset is read: resumable, identical on every rank, split by rank.

The stream is the concatenation of permutations of range(length), a fresh one per epoch from
(seed, epoch). A global batch is the next `batch_size` indices of that stream; rank r of W takes
every W-th of them. The whole position is one integer (indices consumed so far, all ranks
together), which checkpoints store, so a resumed run reads exactly what it would have read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prx.rng import mix_seed


@dataclass
class ImageBatch:
    """What a data source hands the loop each step (this rank's share of the global batch)."""

    images: torch.Tensor  # uint8 (B, 3, H, W) on the training device
    captions: list[str]
    ids: list[int] | None = None  # sample indices, where captions were embedded in advance
    text: list[torch.Tensor] | None = None  # stored caption embeddings (T_i, C), when the shards have them


class IndexStream:
    def __init__(self, length: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"global batch {batch_size} is not divisible by {world_size} ranks")
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.position = 0
        self._epoch, self._order = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0xDA7A))  # 0xDA7A: data stream
            self._epoch, self._order = epoch, torch.randperm(self.length, generator=g)
        return self._order

    @property
    def slots(self) -> list[int]:
        """This rank's positions inside every global batch (keys for per-sample randomness)."""
        return list(range(self.rank, self.batch_size, self.world_size))

    def next_batch(self) -> list[int]:
        """This rank's indices of the next global batch."""
        picked = []
        for slot in self.slots:
            epoch, offset = divmod(self.position + slot, self.length)
            picked.append(int(self._permutation(epoch)[offset]))
        self.position += self.batch_size
        return picked

    @property
    def epoch(self) -> float:
        return self.position / self.length

    def state_dict(self) -> dict:
        return {"position": self.position, "length": self.length, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["length"] != self.length or state["seed"] != self.seed:
            raise ValueError(
                f"data position was saved for a dataset of {state['length']} samples with seed "
                f"{state['seed']}, but this run has {self.length} samples with seed {self.seed}"
            )
        self.position = int(state["position"])


class BatchSource:
    """What the training loop reads a data source through: next_batch() -> ImageBatch, this
    rank's `slots`, the `epoch`, and the resumable position. Subclasses set `self.order`, the
    batch order whose position checkpoints store (an IndexStream or a bucketed one)."""

    order: IndexStream

    def next_batch(self) -> ImageBatch:
        raise NotImplementedError

    @property
    def slots(self) -> list[int]:
        return self.order.slots

    @property
    def epoch(self) -> float:
        return self.order.epoch

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)
