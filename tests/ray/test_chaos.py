"""Chaos: one live run with three worker kills at random ranks, steps and points (seeded, so a
failure reproduces) and two resizes, as replacements rejoin after a straggling step. The run keeps
every guarantee of the single-failure tests: each step once at the uninterrupted run's loss, each
sample read where the sampler puts it, the same final state, no step lost. Its
`scaling.max_failures` is 2: three failures, each after progress, do not end a live run
(train.failure_policy), where a budget of replacements would have ended it at the third."""

from __future__ import annotations

import random

import pytest

from tests.ray.jobs import run
from tests.ray.live_cases import STEPS, assert_read_once, assert_same_final_state, assert_tracks, job

SEED = 2026
HOLD_S = 25  # at most (below the 30 s collective timeout): each straggler holds until the replacement has joined


def chaos(seed: int) -> tuple[list[dict], list[int]]:
    """Three kills, the first two each followed by a straggler two steps later (so the
    replacement rejoins: a resize), the last left to the end of the run. Returns the faults and
    the world size each step should train at."""
    rng = random.Random(seed)
    k1 = rng.randint(3, 7)
    k2 = rng.randint(k1 + 4, k1 + 7)
    k3 = rng.randint(k2 + 4, STEPS - 2)
    faults, world = [], [3] * STEPS
    for i, step in enumerate((k1, k2, k3)):
        rank = rng.randrange(3)
        faults.append({"action": "kill_rank", "rank": rank, "at_step": step, "point": rng.choice(["start", "mid"])})
        last = STEPS if i == 2 else step + 2
        if i < 2:
            faults.append(
                {"action": "delay_rank", "rank": (rank + 1) % 3, "at_step": step + 2, "seconds": HOLD_S, "until_join": True}
            )
        world[step - 1 : last] = [2] * (last - step + 1)
    return faults, world


@pytest.fixture(scope="module")
def chaotic(tmp_path_factory, stdlib_dataset):
    faults, world = chaos(SEED)
    spec = job(tmp_path_factory.mktemp("chaos"), stdlib_dataset, "chaos", faults)
    spec = spec.model_validate({**spec.to_dict(), "scaling": {**spec.to_dict()["scaling"], "max_failures": 2}})
    _, rows, events = run(spec)
    return spec, rows, events, faults, world


def test_chaos_keeps_every_guarantee(uninterrupted, chaotic, stdlib_dataset):
    reference_spec, reference = uninterrupted
    spec, rows, _, faults, world = chaotic
    assert_tracks(reference, rows)
    assert [r["world_size"] for r in rows] == world, faults
    assert_read_once(rows, stdlib_dataset, spec.seed)
    assert_same_final_state(reference_spec, spec)


def test_three_recoveries_and_two_resizes(chaotic):
    _, _, events, faults, _ = chaotic
    kills = [f for f in faults if f["action"] == "kill_rank"]
    recoveries = [e for e in events if e["kind"] == "recovery"]
    assert [e["step"] for e in recoveries] == [f["at_step"] for f in kills]
    assert all(e["lost_steps"] == 0 and (e["world_size_before"], e["world_size_after"]) == (3, 2) for e in recoveries)
    assert [e["cause"].split(" at step")[0] for e in recoveries] == [f"fault: kill rank {f['rank']}" for f in kills]
    resizes = [e for e in events if e["kind"] == "resize"]
    assert [(e["world_size_before"], e["world_size_after"], e["step"]) for e in resizes] == [
        (2, 3, f["at_step"] + 2) for f in kills[:2]
    ]


def test_failures_with_progress_between_them_do_not_end_a_live_run(chaotic):
    spec, _, events, faults, _ = chaotic
    decisions = [e for e in events if e["kind"] == "failure_policy"]
    kills = [f for f in faults if f["action"] == "kill_rank"]
    assert spec.scaling.max_failures == 2 < len(kills) == len(decisions)
    assert all(d["retry"] and d["in_a_row"] == 1 for d in decisions), decisions
    assert [d["step"] for d in decisions] == sorted(d["step"] for d in decisions) and len({d["step"] for d in decisions}) == len(
        kills
    )
