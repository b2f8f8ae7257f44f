from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from elastune.batch_plan import batch_plan
from elastune.data.sampler import permute, positions, sample_indices


@given(st.integers(1, 3000), st.integers(0, 2**32), st.integers(0, 50))
def test_permutation_is_a_bijection(n, seed, epoch):
    out = permute(np.arange(n), n, seed, epoch)
    assert sorted(out.tolist()) == list(range(n))


def test_epochs_and_seeds_give_different_orders():
    a = permute(np.arange(1000), 1000, 0, 0)
    assert not np.array_equal(a, permute(np.arange(1000), 1000, 0, 1))
    assert not np.array_equal(a, permute(np.arange(1000), 1000, 1, 0))
    assert np.array_equal(a, permute(np.arange(1000), 1000, 0, 0))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(20, 400),
    g=st.integers(1, 40),
    m=st.integers(1, 16),
    seed=st.integers(0, 1000),
    worlds=st.lists(st.integers(1, 40), min_size=1, max_size=30),
)
def test_any_sequence_of_world_sizes_reads_each_sample_once_per_epoch(n, g, m, seed, worlds):
    m = min(m, g)
    k = -(-g // m)
    reads: Counter = Counter()
    samples_seen, step = 0, 0
    while samples_seen < 2 * n:  # two whole epochs, world size changing between steps
        plan = batch_plan(g, m, 1 + (worlds[step % len(worlds)] - 1) % k)
        for rank in range(plan.world_size):
            for mb in plan.for_rank(rank):
                pos = positions(samples_seen, mb.start, mb.size)
                for p, idx in zip(pos, sample_indices(pos, n, seed)):
                    reads[(int(p) // n, int(idx))] += 1
        samples_seen += g
        step += 1
    for epoch in (0, 1):
        got = sorted(idx for (e, idx), c in reads.items() if e == epoch and c == 1)
        assert got == list(range(n)), f"epoch {epoch}: some sample read twice or never"
    assert all(c == 1 for c in reads.values())


def test_a_step_straddling_an_epoch_boundary_reads_both_epochs():
    idx = sample_indices(np.arange(8, 12), 10, seed=3)
    expected = np.concatenate([permute(np.array([8, 9]), 10, 3, 0), permute(np.array([0, 1]), 10, 3, 1)])
    assert idx.tolist() == expected.tolist()
