"""Live recovery (`scaling.recovery: live`), the 3 -> 2 -> 3 numerics test: three workers train;
rank 1 is SIGKILLed in the middle of step 10; the two survivors run step 10 again at once with
the same global batch; a straggling step 20 gives Ray Train's replacement time to start, and from
step 21 three workers train again. Against an uninterrupted 3-worker run: the same loss at every
step (1e-5 relative), the same final parameters (1e-5), and every step read exactly the samples
the stateless sampler puts there, once."""

from __future__ import annotations

import pytest

from tests.ray.live_cases import G, STEPS, assert_read_once, assert_same_final_state, assert_tracks, job
from tests.ray.test_resume_world_size import run

KILL_AT, HOLD_AT = 10, 20


@pytest.fixture(scope="module")
def live(tmp_path_factory, stdlib_dataset):
    faults = [
        {"action": "kill_rank", "rank": 1, "at_step": KILL_AT, "point": "mid"},
        # A straggler long enough for the replacement to start (Ray Train notices the dead worker
        # within its 2 s health check and starts another in a few seconds): it joins after step 20.
        {"action": "delay_rank", "rank": 0, "at_step": HOLD_AT, "seconds": 20},
    ]
    spec = job(tmp_path_factory.mktemp("live"), stdlib_dataset, "live", faults)
    _, rows, events = run(spec)
    return spec, rows, events


def test_every_step_once_with_the_uninterrupted_losses(uninterrupted, live):
    _, reference = uninterrupted
    _, rows, _ = live
    assert_tracks(reference, rows)
    assert [r["world_size"] for r in rows] == [3] * (KILL_AT - 1) + [2] * (HOLD_AT - KILL_AT + 1) + [3] * (STEPS - HOLD_AT)


def test_every_sample_read_once_where_the_sampler_puts_it(live, stdlib_dataset):
    spec, rows, _ = live
    assert_read_once(rows, stdlib_dataset, spec.seed)


def test_final_parameters_match(uninterrupted, live):
    assert_same_final_state(uninterrupted[0], live[0])


def test_survivors_carry_on_and_the_replacement_joins(live):
    *_, events = live
    joins = [e for e in events if e["kind"] == "join"]
    assert sorted(e["replica"] for e in joins) == [0, 1, 1, 2]  # survivors never restarted; one replacement for 1
    replacement = max((e for e in joins if e["replica"] == 1), key=lambda e: e["time"])
    assert replacement["resumed_from_tier"] == 0 and KILL_AT <= replacement["step"] <= HOLD_AT
    (recovery,) = [e for e in events if e["kind"] == "recovery"]
    assert recovery["recovery"] == "live" and recovery["cause"].startswith("fault: kill rank 1 at step 10")
    assert (recovery["world_size_before"], recovery["world_size_after"], recovery["resumed_from_step"]) == (3, 2, KILL_AT - 1)
    assert recovery["lost_steps"] == 0 and recovery["lost_samples"] == 0 and recovery["micro_batches"] == [3, 3]
    assert 0 <= recovery["detection_seconds"] <= recovery["mttr_seconds"]
    (resize,) = [e for e in events if e["kind"] == "resize"]
    assert (resize["world_size_before"], resize["world_size_after"], resize["step"]) == (2, 3, HOLD_AT)
    assert resize["micro_batches"] == [2, 2, 2] and resize["global_batch_size"] == G
