"""Randomness keyed by (seed, step, sample), so that any step can be replayed exactly.

The training loop draws timesteps, noise and caption dropout from fresh generators per step
instead of a global stream. A resumed run, or a recomputed activation, sees the same numbers
without saving any generator state; and since the keys are global sample slots, not ranks, a
run on W processes draws exactly what a single process would for the same global batch.
"""

from __future__ import annotations

import torch

_M64 = 0xFFFFFFFFFFFFFFFF


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64-style mixing, so nearby inputs decorrelate)."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (part & _M64)) * 0xBF58476D1CE4E5B9 & _M64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _M64
        h ^= h >> 29
    return h >> 1


def step_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from integer keys, e.g. (seed, step) or (seed, step, sample slot)."""
    return torch.Generator(device=device).manual_seed(mix_seed(*keys))


def per_sample_normal(shape: tuple[int, ...], seed: int, step: int, slots: list[int],
                      device: torch.device) -> torch.Tensor:
    """(len(slots), *shape) standard normal noise; sample i is keyed by (seed, step, slots[i])."""
    return torch.stack([
        torch.randn(shape, generator=step_generator(seed, step, slot, device=device), device=device)
        for slot in slots
    ])
