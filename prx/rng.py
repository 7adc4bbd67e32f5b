"""Randomness keyed by (seed, step, rank), so that any step can be replayed exactly.

The training loop draws timesteps, noise and caption dropout from a fresh generator per step
instead of a global stream: a resumed run, or a recomputed activation, sees the same numbers
without saving or restoring any generator state.
"""

from __future__ import annotations

import torch

_MASK63 = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64-style mixing, so nearby inputs decorrelate)."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (part & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & _MASK63


def step_generator(seed: int, step: int, rank: int, device: torch.device | str = "cpu", stream: int = 0):
    """A generator for one (seed, step, rank); `stream` separates independent uses in a step."""
    return torch.Generator(device=device).manual_seed(mix_seed(seed, step, rank, stream))
