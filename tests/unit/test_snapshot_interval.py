"""checkpoint.interval: how far apart `snapshot_every_steps: auto` puts tier-0 snapshots, against
closed forms (the cost budget, its minimality, the power-of-two nesting)."""

from __future__ import annotations

import random

import pytest

from elastune.checkpoint.interval import MAX_GAP_S, SMOOTHING, SNAPSHOT_BUDGET, SnapshotPace, snapshot_due, snapshot_interval


@pytest.mark.parametrize(
    ("cost", "step", "cap", "want"),
    [
        (0.0, 0.05, 100, 1),  # free: every step
        (0.001, 0.05, 100, 1),  # exactly 2 % of one step
        (0.00101, 0.05, 100, 2),  # just over
        (0.005, 0.05, 100, 8),  # 2 % of 5 steps: the next power of two
        (0.004, 0.05, 100, 4),  # 2 % of exactly 4 steps
        (10.0, 0.05, 100, 64),  # capped at the largest power of two <= every_steps
        (10.0, 0.05, 1, 1),
        (10.0, 0.05, 128, 128),
        (10.0, 1.0, 1000, 16),  # 30 s of training at most between two: 16 one-second steps
        (10.0, 31.0, 1000, 1),  # steps longer than that: every step
    ],
)
def test_the_interval_is_the_smallest_power_of_two_within_budget(cost, step, cap, want):
    assert snapshot_interval(cost, step, cap) == want


def test_the_interval_keeps_the_budget_and_no_smaller_one_would():
    rng = random.Random(7)
    for _ in range(2000):
        cost, step, cap = rng.uniform(0, 2), rng.uniform(1e-3, 5), rng.randint(1, 5000)
        k = snapshot_interval(cost, step, cap)
        assert k & (k - 1) == 0 and 1 <= k <= cap and (k == 1 or k * step <= MAX_GAP_S)
        if k * 2 <= cap and k * 2 * step <= MAX_GAP_S:  # not capped: within the budget
            assert cost <= SNAPSHOT_BUDGET * k * step
        if k > 1:  # half as far apart would cost more than the budget
            assert cost > SNAPSHOT_BUDGET * (k // 2) * step


def test_while_the_interval_moves_no_gap_exceeds_the_largest():
    """Powers of two and multiples: a multiple of the largest interval is due at every smaller one."""
    rng = random.Random(3)
    for _ in range(200):
        top = 1 << rng.randint(0, 6)
        due = [s for s in range(1, 2000) if snapshot_due(s, 1 << rng.randint(0, top.bit_length() - 1))]
        assert all(b - a <= top for a, b in zip([0, *due], due))
    assert not snapshot_due(5, None) and snapshot_due(6, 3) and not snapshot_due(7, 3)


def test_a_rank_offers_its_figures_once_it_has_both():
    pace = SnapshotPace("auto", cap=64)
    assert (pace.interval, pace.offer()) == (1, (0.0, 0.0, 0.0))
    pace.settle([0.0, 0.0, 0.0], step_s=0.05, costs=[])  # nobody knows a cost yet: every step
    assert (pace.interval, pace.offer()) == (1, (0.0, 0.0, 0.0))
    pace.settle([0.0, 0.0, 0.0], step_s=0.07, costs=[0.01, 0.02])
    cost = (1 - SMOOTHING) * 0.01 + SMOOTHING * 0.02
    step = (1 - SMOOTHING) * 0.05 + SMOOTHING * 0.07
    assert pace.offer() == pytest.approx((cost, step, 1.0), rel=1e-15)
    # The group's figures, not this rank's, set the interval: the mean over the ranks that offered.
    pace.settle([0.012, 0.1, 2.0], step_s=0.05, costs=[])
    assert pace.interval == snapshot_interval(0.006, 0.05, 64) == 8


@pytest.mark.parametrize("fixed", [1, 5, None])
def test_a_fixed_interval_or_none_stays(fixed):
    pace = SnapshotPace(fixed, cap=64)
    pace.settle([1.0, 0.01, 1.0], step_s=0.01, costs=[1.0])
    assert pace.interval == fixed
