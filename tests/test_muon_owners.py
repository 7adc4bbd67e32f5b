"""Muon owners balanced by Newton-Schulz FLOP (prx/muon_owners.py) at PRX small's real shapes."""

import pytest
import torch

from kernels.ref import newton_schulz_flops
from prx.config import preset
from prx.model.denoiser import PRX
from prx.muon_owners import assign_owners, describe_plan, imbalance, rank_loads, round_robin_owners
from prx.optim import build_optimizer, is_muon_parameter


def cost(rows, cols):  # what the optimizer weighs by default: Gram Newton-Schulz, 5 steps, symmetric kernels
    return newton_schulz_flops(rows, cols, 5, symmetric=True, method="gram")


@pytest.fixture(scope="module")
def prx_shapes():
    """The 112 block matrices in the optimizer's bank order (same-shape matrices together)."""
    with torch.device("meta"):
        model = PRX(preset("prx_small_512").model)
    banks = {}
    for name, p in model.named_parameters():
        if is_muon_parameter(name, p):
            banks.setdefault(tuple(p.shape), []).append(name)
    return [shape for shape, names in banks.items() for _ in names]


@pytest.mark.parametrize("world, round_robin", [(8, 1.0), (16, 1.0), (32, 1.253)])
def test_the_busiest_rank_is_within_a_few_percent_of_the_mean(prx_shapes, world, round_robin):
    owners = assign_owners(prx_shapes, world, cost)
    assert len(prx_shapes) == 112 and sorted(set(owners)) == list(range(world))
    balanced = imbalance(rank_loads(prx_shapes, owners, world, cost))
    counted = imbalance(rank_loads(prx_shapes, round_robin_owners(prx_shapes, world), world, cost))
    print(describe_plan(prx_shapes, world, cost))
    assert balanced <= 1.01
    assert counted == pytest.approx(round_robin, abs=5e-4)  # what round robin gave: 1.253x at 32 ranks


def test_the_optimizer_logs_the_plan_it_uses():
    cfg = preset("prx_small_512")
    with torch.device("meta"):
        optimizer = build_optimizer(PRX(cfg.model), cfg)
    assert optimizer.describe_owners(32) == (
        "muon owners: 112 matrices on 32 ranks, busiest rank 1.004x the mean (round robin: 1.253x)")


def test_costliest_first_to_the_least_loaded_rank():
    shapes = [(2, 2), (4, 4), (3, 3), (1, 1)]  # cost: the area
    area = lambda r, c: r * c  # noqa: E731
    # 16 -> rank 0; 9 -> rank 1; 4 -> rank 1 (9 < 16); 1 -> rank 1 (13 < 16)
    assert assign_owners(shapes, 2, area) == [1, 0, 1, 1]
    assert rank_loads(shapes, [1, 0, 1, 1], 2, area) == [16, 14]
    assert assign_owners(shapes, 1, area) == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        assign_owners(shapes, 0, area)
