"""The index stream: deterministic, split across ranks, resumable from one integer."""

import pytest
import torch

from prx.data.stream import IndexStream
from prx.rng import mix_seed, per_sample_normal


def test_epochs_are_permutations_and_differ():
    s = IndexStream(10, 5, seed=0)
    first, second = s.next_batch() + s.next_batch(), s.next_batch() + s.next_batch()
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second


def test_ranks_split_the_global_batch():
    single = IndexStream(13, 6, seed=1)
    ranks = [IndexStream(13, 6, seed=1, rank=r, world_size=3) for r in range(3)]
    for _ in range(5):
        together = single.next_batch()
        parts = [s.next_batch() for s in ranks]
        assert sorted(sum(parts, [])) == sorted(together)
        assert all(len(p) == 2 for p in parts)


def test_resume_from_position():
    a = IndexStream(11, 4, seed=2)
    for _ in range(3):
        a.next_batch()
    b = IndexStream(11, 4, seed=2)
    b.load_state_dict(a.state_dict())
    assert [a.next_batch() for _ in range(4)] == [b.next_batch() for _ in range(4)]
    with pytest.raises(ValueError, match="saved for a dataset of 11"):
        IndexStream(12, 4, seed=2).load_state_dict(a.state_dict())


def test_per_sample_noise_depends_on_slot_not_on_batch():
    cpu = torch.device("cpu")
    full = per_sample_normal((2, 3), seed=0, step=5, slots=[0, 1, 2, 3], device=cpu)
    odd = per_sample_normal((2, 3), seed=0, step=5, slots=[1, 3], device=cpu)
    assert torch.equal(full[1::2], odd)
    assert not torch.equal(full[0], full[1])
    assert not torch.equal(per_sample_normal((2, 3), 0, 6, [0], cpu), full[:1])
    assert len({mix_seed(0, s) for s in range(1000)}) == 1000
