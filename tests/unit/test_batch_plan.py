import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from elastune.batch_plan import BatchSchedule, batch_plan
from elastune.errors import BatchPlanError


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


def _walked(schedule: BatchSchedule, steps: int | None = None, samples: int | None = None, start: int = 0) -> int:
    """Reference: one step at a time, each at the batch in force when it starts."""
    seen, taken = start, 0
    while (steps is None or taken < steps) and (samples is None or seen < samples):
        seen, taken = seen + schedule.at(seen), taken + 1
    return seen if steps is not None else taken


def test_a_batch_schedule_in_closed_form():
    s = BatchSchedule(12, ((96, 24),))  # 8 steps of 12, then 24
    assert (s.at(0), s.at(95), s.at(96)) == (12, 12, 24)
    assert (s.samples_after(8), s.samples_after(9), s.samples_after(14)) == (96, 120, 240)
    assert (s.steps_to(96), s.steps_to(97), s.steps_to(120), s.steps_to(240)) == (8, 9, 9, 14)
    # A change inside a step takes over at the next step's start: 0, 10, 20, 30 (G 10), then 34, ...
    t = BatchSchedule(10, ((25, 4),))
    assert (t.samples_after(3), t.samples_after(4), t.steps_to(33), t.steps_to(30)) == (30, 34, 4, 3)
    assert t.samples_after(2, start=30) == 38 and BatchSchedule(7).steps_to(0) == 0


def test_a_batch_schedule_agrees_with_stepping_one_step_at_a_time():
    rng = random.Random(1)
    for _ in range(2000):
        changes, at = [], 0
        for _ in range(rng.randint(0, 4)):
            at += rng.randint(1, 300)
            changes.append((at, rng.randint(1, 50)))
        s = BatchSchedule(rng.randint(1, 50), tuple(changes))
        steps, samples, start = rng.randint(0, 60), rng.randint(0, 1500), rng.randint(0, 400)
        assert s.samples_after(steps) == _walked(s, steps=steps)
        assert s.samples_after(steps, start) == _walked(s, steps=steps, start=start)
        assert s.steps_to(samples) == _walked(s, samples=samples)


def test_steps_to_the_budget_follow_the_phases_batch():
    from elastune.spec import validate_spec

    spec = validate_spec(
        {
            "name": "t",
            "model": {"recipe": "byte_gpt", "options": {"context": 16, "width": 16, "num_heads": 2}},
            "data": {"path": "d", "window": 17},
            "batch": {"global_batch_size": 12, "micro_batch_size": 4},
            "optimizer": {"name": "adamw", "lr": 1e-3},
            "stop": {"max_samples": 240},
            "phases": [{"from_samples": 96, "global_batch_size": 24}],
        }
    )
    assert spec.max_steps == 8 + (240 - 96) // 24 == 14  # not 240 / 12
