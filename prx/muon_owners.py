"""Which rank orthogonalises which Muon matrix under FSDP2: owners balanced by work, not by count.

Each Muon matrix is orthogonalised whole on one rank, its owner (prx/optim.py gathers its row
shards there and scatters the result back), so a step waits for the busiest owner. Dealing
matrices round robin balances their number, not their cost: in PRX small a (10752, 1792) matrix
costs 3.5x a (1792, 1792) one in Gram Newton-Schulz FLOP (4.75x in the standard iteration), and
at 32 ranks round robin over the optimizer's bank order leaves the busiest rank 1.253x the mean
(1.315x standard; at 8 and 16 ranks it is even by luck: 16 matrices of each shape but one).
Longest processing time first (Graham 1969: each matrix, costliest first, to the least-loaded
rank; within 4/3 of the best plan in the worst case), then moves and swaps off the busiest rank,
gives 1.000x at 8 and 16 ranks and 1.004x at 32 (1.150x at 64, where 112 matrices are too few to
share evenly). `describe_plan` prints it; tests/test_muon_owners.py checks it.

The plan depends only on the shapes, the world size and the cost function, so every rank
computes the same one without talking to the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Shape = tuple[int, int]


def assign_owners(shapes: Sequence[Shape], world: int, cost: Callable[[int, int], float]) -> list[int]:
    """The owner rank of each matrix: costliest first, each to the least-loaded rank (ties: the
    matrix that comes first, the lowest rank), then single moves and swaps off the busiest rank
    while they lower it. Deterministic, so the plan is the same on every rank."""
    if world < 1:
        raise ValueError(f"assign_owners: world size {world}")
    costs = [float(cost(*shape)) for shape in shapes]
    loads = [0.0] * world
    owners = [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda q: (loads[q], q))
        owners[i] = rank
        loads[rank] += costs[i]
    while _improve_busiest(owners, costs, loads):
        pass
    return owners


def _improve_busiest(owners: list[int], costs: list[float], loads: list[float]) -> bool:
    """Move one matrix off the busiest rank, or swap it for a cheaper one, if that lowers the
    busiest pair's maximum; the first such change in index order. False when none does."""
    busiest = max(range(len(loads)), key=lambda q: (loads[q], -q))
    for i in (i for i, o in enumerate(owners) if o == busiest):
        for q in range(len(loads)):
            if q == busiest:
                continue
            for j in [None] + [j for j, o in enumerate(owners) if o == q and costs[j] < costs[i]]:
                moved = costs[i] - (costs[j] if j is not None else 0.0)
                if max(loads[busiest] - moved, loads[q] + moved) < loads[busiest] - 1e-9 * loads[busiest]:
                    owners[i], loads[busiest], loads[q] = q, loads[busiest] - moved, loads[q] + moved
                    if j is not None:
                        owners[j] = busiest
                    return True
    return False


def round_robin_owners(shapes: Sequence[Shape], world: int) -> list[int]:
    """The plan by count (what the trainer did before), for comparison."""
    return [i % world for i in range(len(shapes))]


def rank_loads(shapes: Sequence[Shape], owners: Sequence[int], world: int,
               cost: Callable[[int, int], float]) -> list[float]:
    loads = [0.0] * world
    for shape, owner in zip(shapes, owners):
        loads[owner] += cost(*shape)
    return loads


def imbalance(loads: Sequence[float]) -> float:
    """The busiest rank's load over the mean (1.0: perfectly even; the step waits for the max)."""
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean else 1.0


def describe_plan(shapes: Sequence[Shape], world: int, cost: Callable[[int, int], float]) -> str:
    """One line: the balanced plan's busiest rank against the mean, and round robin's."""
    balanced = imbalance(rank_loads(shapes, assign_owners(shapes, world, cost), world, cost))
    counted = imbalance(rank_loads(shapes, round_robin_owners(shapes, world), world, cost))
    return (f"muon owners: {len(shapes)} matrices on {world} ranks, busiest rank {balanced:.3f}x the mean "
            f"(round robin: {counted:.3f}x)")
