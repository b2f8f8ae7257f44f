"""Population-based training's rules (tune.pbt): who exploits whom, how hyperparameters move,
and how the learning rate follows a changed global batch."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastune.tune.pbt import Dimension, exploit_pairs, explore, ranked, scaled_lr

SPACE = (
    Dimension("lr", "log", 1e-4, 1e-1),
    Dimension("warmup_fraction", "linear", 0.0, 0.2),
    Dimension("decay_steps", "int", 10, 1000),
    Dimension("schedule", "choice", choices=("constant", "cosine", "linear", "wsd")),
)


def test_ranked_is_best_first_with_a_stable_tie_break():
    assert ranked({"a": 2.0, "b": 1.0, "c": 2.0}) == ["b", "a", "c"]
    assert ranked({"a": 2.0, "b": 1.0, "c": 2.0}, mode="max") == ["a", "c", "b"]


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.text("abcdefgh", min_size=1, max_size=4), st.floats(-1e6, 1e6), min_size=1, max_size=40),
    st.sampled_from([0.1, 0.25, 0.5]),
    st.integers(0, 2**32),
)
def test_the_bottom_quantile_exploits_the_top_and_nobody_else(fitness, quantile, seed):
    pairs = exploit_pairs(fitness, quantile, random.Random(seed))
    order = ranked(fitness)
    k = int(len(order) * quantile)
    assert [r for r, _ in pairs] == order[len(order) - k :]  # exactly the bottom k, each once
    assert all(donor in order[:k] for _, donor in pairs)  # donors from the top k only
    assert all(fitness[donor] <= fitness[recipient] for recipient, donor in pairs)  # never a worse donor


def test_a_crippled_trial_is_always_a_recipient():
    fitness = {f"t{i}": 1.0 + i / 100 for i in range(8)} | {"crippled": 1e9}
    for seed in range(20):
        recipients = [r for r, _ in exploit_pairs(fitness, 0.25, random.Random(seed))]
        assert "crippled" in recipients
    with pytest.raises(ValueError, match="quantile 0.6"):
        exploit_pairs(fitness, 0.6, random.Random(0))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32))
def test_explore_stays_in_range_and_keeps_what_is_not_searched(seed):
    rng = random.Random(seed)
    donor = {"lr": 3e-3, "warmup_fraction": 0.05, "decay_steps": 200, "schedule": "cosine", "weight_decay": 0.1}
    new = explore(donor, SPACE, rng)
    assert 1e-4 <= new["lr"] <= 1e-1 and 0.0 <= new["warmup_fraction"] <= 0.2
    assert isinstance(new["decay_steps"], int) and 10 <= new["decay_steps"] <= 1000
    assert new["schedule"] in ("constant", "cosine", "linear", "wsd") and new["weight_decay"] == 0.1


def test_perturbing_a_log_dimension_multiplies_by_a_factor():
    lr = Dimension("lr", "log", 1e-4, 1e-1)
    seen = Counter(round(lr.perturb(1e-2, random.Random(s), (0.8, 1.2)) / 1e-2, 9) for s in range(200))
    assert set(seen) == {0.8, 1.2} and min(seen.values()) > 60  # both directions, about evenly
    assert lr.perturb(0.095, random.Random(1), (1.2, 1.2)) == 0.1  # clipped to the range
    # Resampling a log dimension spreads evenly over decades, not over the linear range.
    samples = [lr.sample(random.Random(s)) for s in range(3000)]
    below_1e3 = sum(x < 1e-3 for x in samples) / len(samples)
    assert below_1e3 == pytest.approx(1 / 3, abs=0.03)


def test_the_learning_rate_follows_the_batch_by_the_declared_rule():
    assert scaled_lr(0.1, 256, 512, "linear") == pytest.approx(0.2)
    assert scaled_lr(1e-3, 256, 1024, "sqrt") == pytest.approx(2e-3)
    assert scaled_lr(1e-3, 256, 64, "sqrt") == pytest.approx(5e-4)
    assert scaled_lr(1e-3, 256, 1024, "none") == 1e-3
    assert math.isclose(scaled_lr(scaled_lr(0.1, 32, 96, "linear"), 96, 32, "linear"), 0.1)
