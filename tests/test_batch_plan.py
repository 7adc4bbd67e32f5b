"""The batch plan (prx.run.batch_plan): the split of the global batch and the out-of-memory advice."""

import pytest
import torch

from prx.config import ConfigError, preset
from prx.run.batch_plan import BatchPlan


def test_batch_plan():
    plan = BatchPlan.derive(256, 8, 16)
    assert (plan.local_batch, plan.micro_batch, plan.accumulation) == (32, 16, 2)
    assert BatchPlan.derive(256, 8).accumulation == 1
    assert "256 = 8 process(es) x micro-batch 16 x 2" in plan.describe()
    with pytest.raises(ConfigError, match="not divisible by 3 processes"):
        BatchPlan.derive(256, 3)
    with pytest.raises(ConfigError, match="parallel.micro_batch=12"):
        BatchPlan.derive(256, 8, 12)
    assert plan.micro_batches() == [slice(0, 16), slice(16, 32)]


def test_out_of_memory_names_a_smaller_micro_batch_and_checkpointing():
    cfg = preset("prx_small_512")
    err = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")
    message = str(BatchPlan.derive(256, 8, 32).out_of_memory(err, cfg))
    assert "micro-batch 32 per process at 512 px (CUDA out of memory. Tried to allocate 20.00 GiB)" in message
    assert "--set parallel.micro_batch=16" in message and "activation_checkpointing=full" in message
    assert "more detail" not in message
    tight = BatchPlan.derive(8, 8, 1)  # nothing smaller than 1 sample
    assert "micro_batch" not in str(tight.out_of_memory(err, cfg))
