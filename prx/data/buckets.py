"""Aspect-ratio buckets at a fixed token budget, and the resumable order of global batches.

Buckets (docs/recipe.md section 7): every (height, width) that is a multiple of the patch size (32 px in
the PRX presets), has at most resolution^2 pixels (256 tokens at 512 px, 1024 at 1024 px), has
aspect in [0.5, 2], and is the largest such size for its width or its height. That gives 11
buckets at 512 px (aspect 0.5 to 2) and 19 at 1024 px (0.52 to 1.91), each within 6 % of the
token budget (the reference has 13 and 27; it must use a finer size step than 32 px). An image
goes to the bucket nearest in log-aspect; it is scaled to cover the bucket and cropped (center
or random). `square` mode is the one bucket (res, res).

The order of batches is a pure function of (seed, batch number), like `IndexStream`: epoch e
permutes each bucket's samples, cuts them into global batches (the leftover < batch of each
bucket waits for a later epoch's permutation), and permutes the batches. Rank r takes the global
slots r, r + W, ... of a batch, so every rank gets the same bucket at each step and the global
batch does not depend on the number of ranks. The position is one integer (batches consumed).
"""

from __future__ import annotations

import numpy as np
import torch

from prx.rng import mix_seed

MIN_ASPECT, MAX_ASPECT = 0.5, 2.0  # width / height


def bucket_sizes(resolution: int, multiple: int, square: bool = False) -> list[tuple[int, int]]:
    """(height, width) buckets at the token budget of a resolution^2 image, by increasing aspect."""
    if square:
        return [(resolution, resolution)]
    budget = resolution * resolution
    sizes = set()
    for side in range(multiple, 2 * resolution + 1, multiple):
        other = budget // side // multiple * multiple
        if other == 0:
            continue
        for h, w in ((side, other), (other, side)):
            if MIN_ASPECT <= w / h <= MAX_ASPECT:
                sizes.add((h, w))
    # Keep the largest area per height and per width (the others are the same shape, smaller).
    best = [s for s in sizes
            if not any((o[0] == s[0] or o[1] == s[1]) and o[0] * o[1] > s[0] * s[1] for o in sizes)]
    return sorted(best, key=lambda s: s[1] / s[0])


def assign_buckets(aspects: np.ndarray, sizes: list[tuple[int, int]]) -> np.ndarray:
    """Index of the bucket nearest in log(width / height) for each aspect."""
    log_buckets = np.log(np.array([w / h for h, w in sizes]))
    return np.abs(np.log(aspects)[:, None] - log_buckets[None, :]).argmin(axis=1)


def crop_box(width: int, height: int, out_h: int, out_w: int, offset: tuple[float, float] = (0.5, 0.5)
             ) -> tuple[float, float, float, float]:
    """The source region (x0, y0, x1, y1) that, scaled to (out_w, out_h), covers it without
    distortion; `offset` in [0, 1]^2 places it along the axis that is cropped (0.5: centered)."""
    scale = max(out_w / width, out_h / height)
    box_w, box_h = out_w / scale, out_h / scale
    # Clamped: along the uncropped axis box_w == width up to float rounding (e.g. -1e-13 offsets).
    x0, y0 = max(0.0, (width - box_w) * offset[0]), max(0.0, (height - box_h) * offset[1])
    return x0, y0, min(float(width), x0 + box_w), min(float(height), y0 + box_h)


class BucketBatches:
    """Global batches (lists of sample indices, one bucket each) by batch number; resumable."""

    def __init__(self, buckets: np.ndarray, num_buckets: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"global batch {batch_size} is not divisible by {world_size} ranks")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.members = [np.flatnonzero(buckets == b) for b in range(num_buckets)]
        self.per_bucket = [len(m) // batch_size for m in self.members]
        self.batches_per_epoch = sum(self.per_bucket)
        self.num_samples = len(buckets)
        self.position = 0  # global batches consumed
        self._epoch, self._plan = -1, None

    @property
    def dropped_per_epoch(self) -> int:
        """Samples in no batch of an epoch: each bucket's remainder (a different set each epoch)."""
        return self.num_samples - self.batches_per_epoch * self.batch_size

    @property
    def slots(self) -> list[int]:
        return list(range(self.rank, self.batch_size, self.world_size))

    def _epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        if epoch != self._epoch:
            batches = []
            for b, members in enumerate(self.members):
                g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, b, 0xB0C7))  # 0xB0C7: bucket
                order = members[torch.randperm(len(members), generator=g).numpy()]
                batches += [(b, order[k * self.batch_size:(k + 1) * self.batch_size])
                            for k in range(self.per_bucket[b])]
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0xBA7C))  # 0xBA7C: batch order
            self._epoch, self._plan = epoch, [batches[i] for i in torch.randperm(len(batches), generator=g)]
        return self._plan

    def batch(self, number: int) -> tuple[int, list[int]]:
        """(bucket, this rank's sample indices) of global batch `number`."""
        epoch, k = divmod(number, self.batches_per_epoch)
        bucket, indices = self._epoch_plan(epoch)[k]
        return bucket, [int(indices[s]) for s in self.slots]

    def bucket_members(self, bucket: int) -> np.ndarray:
        return self.members[bucket]

    @property
    def epoch(self) -> float:
        return self.position / self.batches_per_epoch

    def state_dict(self) -> dict:
        return {"batches": self.position, "samples": self.num_samples, "seed": self.seed,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        saved = (state.get("samples"), state.get("seed"), state.get("batch_size"))
        if saved != (self.num_samples, self.seed, self.batch_size) or "batches" not in state:
            raise ValueError(
                f"data position was saved for {state.get('samples')} samples, seed {state.get('seed')}, "
                f"batch {state.get('batch_size')}; this run has {self.num_samples} samples, seed "
                f"{self.seed}, batch {self.batch_size}: resume with the same --data, seed and batch size")
        self.position = int(state["batches"])


def describe_buckets(sizes: list[tuple[int, int]], batches: BucketBatches, multiple: int) -> str:
    tokens = [h * w // (multiple * multiple) for h, w in sizes]
    used = [f"{h}x{w}:{len(m)}" for (h, w), m in zip(sizes, batches.members) if len(m)]
    return (f"{len(sizes)} bucket(s), {min(tokens)}-{max(tokens)} tokens; samples per bucket "
            f"(HxW:n) {' '.join(used)}; {batches.batches_per_epoch} batches per epoch, "
            f"{batches.dropped_per_epoch} samples wait for a later epoch")
