"""Resize up and down with spare capacity (`recovery: restart`, min_workers 2 < max_workers 3), on
a multi-node local cluster that starts with room for two workers.

Rank 0 stalls at the start of step 8 while a third node joins; Ray Train's elastic policy (checked
every `scaling.resize_check_seconds`) restarts the group at 3, which resumes from the in-memory
snapshot of step 7. At step 18 the node of rank 1 is lost for good (its raylet SIGKILLed, no
capacity back): the group restarts at 2 from step 17. The global batch is the same at every
size, so the run tracks the uninterrupted 3-worker run exactly, and no step is lost either way.

Ray Train's placement timeout is 10 s here instead of 60 (docs/elastic.md: after a node loss its
elastic policy first asks for the old size again and waits that long), with room in the failure
budget for the timeouts.
"""

from __future__ import annotations

import pytest

from tests.ray.live_cases import STEPS, assert_read_once, assert_same_final_state, assert_tracks, job, on_cluster

HOLD_AT, KILL_AT = 8, 18


@pytest.fixture(scope="module")
def resized(tmp_path_factory, stdlib_dataset):
    tmp = tmp_path_factory.mktemp("resize")
    faults = [
        # Long enough that only the resize ends it: without one, step 8 would run at 2 workers.
        {"action": "delay_rank", "rank": 0, "at_step": HOLD_AT, "seconds": 90},
        {"action": "kill_node", "rank": 1, "at_step": KILL_AT, "point": "mid"},
    ]
    spec = job(tmp, stdlib_dataset, "resize", faults, recovery="restart")
    scaling = {**spec.to_dict()["scaling"], "min_workers": 2, "resize_check_seconds": 1, "max_failures": 6}
    spec = spec.model_validate({**spec.to_dict(), "scaling": scaling})
    rows, events, out = on_cluster("resize", tmp, spec, env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"})
    return spec, rows, events, out


def test_grows_into_new_capacity_and_shrinks_off_a_lost_node_with_the_uninterrupted_losses(uninterrupted, resized):
    _, reference = uninterrupted
    _, rows, _, _ = resized
    assert_tracks(reference, rows)
    assert [r["world_size"] for r in rows] == [2] * (HOLD_AT - 1) + [3] * (KILL_AT - HOLD_AT) + [2] * (STEPS - KILL_AT + 1)


def test_every_sample_read_once_and_the_same_final_state(uninterrupted, resized, stdlib_dataset):
    spec, rows, _, _ = resized
    assert_read_once(rows, stdlib_dataset, spec.seed)
    assert_same_final_state(uninterrupted[0], spec)


def test_one_resize_and_one_recovery_each_losing_nothing(resized):
    _, _, events, out = resized
    (added,) = out["nodes_added"]
    (resize,) = [e for e in events if e["kind"] == "resize"]
    assert resize["cause"].startswith("capacity for 3 workers")
    assert (resize["world_size_before"], resize["world_size_after"], resize["step"], resize["lost_steps"]) == (
        2,
        3,
        HOLD_AT - 1,
        0,
    )
    assert resize["time"] > added
    (recovery,) = [e for e in events if e["kind"] == "recovery"]
    assert recovery["cause"].startswith(f"fault: kill the node of rank 1 at step {KILL_AT}")
    assert (recovery["world_size_before"], recovery["world_size_after"], recovery["lost_steps"]) == (3, 2, 0)
