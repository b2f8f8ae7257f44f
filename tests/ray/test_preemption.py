"""Graceful preemption: on a multi-node local cluster, the node of rank 1 gets a preemption
notice (drained through Ray's GCS, as a cloud autoscaler does, with an 8 s deadline) during step
9 and is removed at the deadline. Before the deadline the run has a durable checkpoint of its newest
step and rank 1 has left at a step boundary; the others carry on without a failed step, tracking
the uninterrupted run exactly."""

from __future__ import annotations

import pytest

from tests.ray.live_cases import assert_read_once, assert_same_final_state, assert_tracks, job, on_cluster


@pytest.fixture(scope="module")
def preempted(tmp_path_factory, stdlib_dataset):
    tmp = tmp_path_factory.mktemp("preemption")
    faults = [
        # The notice comes as rank 1 stalls in step 9 (the others wait for it); it leaves at a
        # step boundary once its next snapshot hand-over brings the notice back.
        {"action": "delay_rank", "rank": 1, "at_step": 9, "seconds": 4},
        # Keeps the run going past the deadline, when the node is removed.
        {"action": "delay_rank", "rank": 0, "at_step": 20, "seconds": 8},
    ]
    spec = job(tmp, stdlib_dataset, "preemption", faults)
    rows, events, out = on_cluster("preemption", tmp, spec)
    return spec, rows, events, out


def test_durable_checkpoint_and_a_clean_leave_before_the_deadline(preempted):
    _, _, events, out = preempted
    drained = out["drained"]
    assert drained["accepted"] and drained["removed"] >= drained["deadline"]
    (notice,) = [e for e in events if e["kind"] == "preemption"]
    assert notice["nodes"] == [drained["node"]] and notice["time"] < drained["deadline"]
    saved = next(e for e in events if e["kind"] == "checkpoint" and e.get("reason") == "preemption")
    assert saved["step"] == notice["persisted_step"] >= 8 and saved["time"] < drained["deadline"]
    (leave,) = [e for e in events if e["kind"] == "leave"]
    assert leave["replica"] == 1 and leave["node"] == drained["node"] and leave["time"] < drained["deadline"]
    assert not [e for e in events if e["kind"] == "recovery" and e.get("detection_seconds") is not None]  # no step failed


def test_the_rest_carry_on_with_the_uninterrupted_losses(uninterrupted, preempted, stdlib_dataset):
    reference_spec, reference = uninterrupted
    spec, rows, events, _ = preempted
    assert_tracks(reference, rows)
    assert_read_once(rows, stdlib_dataset, spec.seed)
    assert_same_final_state(reference_spec, spec)
    (leave,) = [e for e in events if e["kind"] == "leave"]
    worlds = [r["world_size"] for r in rows]
    assert worlds[: leave["step"]] == [3] * leave["step"] and worlds[leave["step"]] == 2
