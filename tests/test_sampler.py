"""MicroBatchPlan: every sample once per epoch, rank slices that reassemble the global batch, exact resume."""

from __future__ import annotations

import numpy as np
import pytest

from fastbert.data.sampler import MicroBatchPlan, PlanError


def global_batches(plan_args: dict, world: int, steps: int) -> list[list[int]]:
    """The samples each optimizer step sees, gathered over ranks and micro-batches."""
    plans = [MicroBatchPlan(**plan_args, rank=r, world_size=world) for r in range(world)]
    out = []
    for step in range(steps):
        batch = []
        for plan in plans:
            for micro in range(plan.accumulation):
                batch += plan.indices(step * plan.accumulation + micro)[0].tolist()
        out.append(batch)
    return out


def test_one_rank_with_accumulation_equals_two_ranks():
    one = global_batches(dict(num_samples=103, global_batch=16, micro_batch=4, seed=5), world=1, steps=20)
    two = global_batches(dict(num_samples=103, global_batch=16, micro_batch=2, seed=5), world=2, steps=20)
    four = global_batches(dict(num_samples=103, global_batch=16, micro_batch=4, seed=5), world=4, steps=20)
    assert one == two == four


def test_each_epoch_visits_every_sample_once_and_nothing_is_dropped():
    plan = MicroBatchPlan(num_samples=103, global_batch=16, micro_batch=4, seed=5)
    stream = np.concatenate([plan.indices(p)[0] for p in range(4 * 13)])  # 208 draws: two epochs and 2 more
    assert sorted(stream[:103]) == list(range(103))
    assert sorted(stream[103:206]) == list(range(103))
    assert not np.array_equal(stream[:103], stream[103:206]), "each epoch has its own order"
    _, epochs = plan.indices(25)  # stream 100..103 straddles the epoch boundary
    assert epochs.tolist() == [0, 0, 0, 1]


@pytest.mark.parametrize("world", [1, 2])
def test_resume_mid_epoch_gives_exactly_the_remaining_order(world):
    args = dict(num_samples=57, global_batch=12, micro_batch=3, seed=11)
    for rank in range(world):
        plan = MicroBatchPlan(**args, rank=rank, world_size=world)
        full = [plan.indices(p)[0].tolist() for p in range(40)]
        state = plan.state_dict(next_position=17)
        resumed = MicroBatchPlan(**args, rank=rank, world_size=world)
        start = resumed.check_state(state)
        assert [resumed.indices(p)[0].tolist() for p in range(start, 40)] == full[17:]


def test_resume_refuses_a_different_plan():
    state = MicroBatchPlan(num_samples=57, global_batch=12, micro_batch=3, seed=11).state_dict(5)
    with pytest.raises(PlanError, match="seed=11 but this run has 12"):
        MicroBatchPlan(num_samples=57, global_batch=12, micro_batch=3, seed=12).check_state(state)


def test_indivisible_global_batch_is_named():
    with pytest.raises(PlanError, match="global batch 10 is not divisible by micro batch 3 x world size 2 = 6"):
        MicroBatchPlan(num_samples=50, global_batch=10, micro_batch=3, world_size=2)
