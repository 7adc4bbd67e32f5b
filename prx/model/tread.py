"""TREAD token routing (Krause et al. 2025; docs/recipe.md section 3): which image tokens skip which blocks.

In training, a random share `probability` of each sample's image tokens is taken out before
block `start` and put back, unchanged, after block `end` (inclusive); the kept tokens run the
span with their true 2-D RoPE positions. With 50 % routed over blocks 2..12 of 16, those 11
blocks see half the tokens: about a third less compute per step at 512 px.

The selection of sample slot s at step k is keyed by (seed, k, s) alone (`prx.rng.mix_seed`,
on its own stream), so it is the same on any rank layout, on resume, and when activation
checkpointing recomputes a block: the indices are computed once per step, outside the model,
and passed in. The gather, the scatter and the selection are Triton kernels on GPU
(kernels/routing.py), references on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from prx.config import TreadConfig
from prx.rng import mix_seed

ROUTE_STREAM = 0x7EAD  # a fourth key part: the noise uses (seed, step, slot), routing (…, ROUTE_STREAM)


@dataclass(frozen=True)
class TokenRoute:
    """Tokens `keep_idx` (B, K) int64, ascending per sample, run blocks start..end (inclusive)."""

    keep_idx: torch.Tensor
    start: int
    end: int

    def part(self, rows: slice) -> "TokenRoute":
        """The route of a micro-batch."""
        return TokenRoute(self.keep_idx[rows], self.start, self.end)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.route_gather(x, self.keep_idx)

    def scatter(self, kept: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        return kernels.route_scatter(kept, full, self.keep_idx)

    def gather_table(self, table: torch.Tensor) -> torch.Tensor:
        """RoPE table (1, N, 1, D/2) -> (B, K, 1, D/2): the kept tokens' true positions."""
        return kernels.route_gather_table(table[0], self.keep_idx)


def kept_count(num_tokens: int, probability: float) -> int:
    """Tokens that stay in the span: the rest, probability * N, rounded, are routed (at least 1 stays)."""
    return max(1, num_tokens - round(probability * num_tokens))


def route_seeds(seed: int, step: int, slots: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([mix_seed(seed, step, slot, ROUTE_STREAM) for slot in slots], device=device)


def plan_route(cfg: TreadConfig, depth: int, num_tokens: int, seeds: torch.Tensor) -> TokenRoute | None:
    """The route of one training step for samples with per-sample `seeds` (B,); None when off."""
    if not cfg.enabled:
        return None
    start, end = cfg.blocks(depth)
    keep_idx = kernels.select_kept_tokens(seeds, num_tokens, kept_count(num_tokens, cfg.probability))
    return TokenRoute(keep_idx, start, end)


def self_guided(routed: torch.Tensor, dense: torch.Tensor, weight: float) -> torch.Tensor:
    """Self-guidance on x-hat (docs/recipe.md section 3): routed + w * (dense - routed)."""
    return routed + weight * (dense - routed)
