import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from elastune.errors import BatchPlanError
from elastune.train.batch_plan import batch_plan


@given(st.integers(1, 500), st.integers(1, 64), st.data())
def test_plan_partitions_the_global_batch(g, m, data):
    m = min(m, g)
    k = math.ceil(g / m)
    w = data.draw(st.integers(1, k))
    plan = batch_plan(g, m, w)
    covered = []
    for rank in range(w):
        for mb in plan.for_rank(rank):
            covered.extend(range(mb.start, mb.start + mb.size))
            assert 1 <= mb.size <= m
    assert covered == list(range(g))  # every position once, in order, across ranks
    counts = plan.counts()
    assert sum(counts) == k and max(counts) - min(counts) <= 1


def test_non_divisor_split_gives_unequal_counts():
    plan = batch_plan(24, 4, 5)
    assert plan.counts() == [2, 1, 1, 1, 1]
    assert plan.describe() == "global batch 24 = 6 micro-batches of <= 4 over 5 worker(s) (2,1,1,1,1 per rank)"


def test_last_micro_batch_may_be_short():
    plan = batch_plan(10, 4, 2)
    assert [mb.size for mb in plan.micro_batches] == [4, 4, 2]


@pytest.mark.parametrize("w", [0, 7])
def test_world_size_outside_range_names_the_numbers(w):
    with pytest.raises(BatchPlanError, match=r"only 6 micro-batches, so 1 <= world size <= 6"):
        batch_plan(24, 4, w)


def test_micro_larger_than_global_is_refused():
    with pytest.raises(BatchPlanError, match=r"micro_batch_size \(8\) exceeds global_batch_size \(4\)"):
        batch_plan(4, 8, 1)
