"""Node loss: a live job on a multi-node local cluster (head + three 1-CPU worker nodes, one
worker each) loses the node of rank 1 in the middle of step 10 (its raylet SIGKILLed, so every
process there goes). The survivors carry on without waiting for Ray (the lighthouse drops the
dead worker within a second); a fresh node arrives as soon as the loss is recorded, Ray Train
places the replacement there, and it joins after the straggling step 20. The run tracks the
uninterrupted 3-worker run exactly as the worker-loss test does, and its in-memory snapshots,
kept on the driver's node, outlive the lost node."""

from __future__ import annotations

import pytest

from tests.ray.live_cases import STEPS, assert_read_once, assert_same_final_state, assert_tracks, job, on_cluster

KILL_AT, HOLD_AT = 10, 20


@pytest.fixture(scope="module")
def node_loss(tmp_path_factory, stdlib_dataset):
    tmp = tmp_path_factory.mktemp("node-loss")
    faults = [
        {"action": "kill_node", "rank": 1, "at_step": KILL_AT, "point": "mid"},
        {"action": "delay_rank", "rank": 0, "at_step": HOLD_AT, "seconds": 25, "until_join": True},
    ]
    spec = job(tmp, stdlib_dataset, "node-loss", faults)
    rows, events, out = on_cluster("node-loss", tmp, spec)
    return spec, rows, events, out


def test_shrinks_at_once_and_grows_back_with_the_uninterrupted_losses(uninterrupted, node_loss):
    _, reference = uninterrupted
    _, rows, _, _ = node_loss
    assert_tracks(reference, rows)
    assert [r["world_size"] for r in rows] == [3] * (KILL_AT - 1) + [2] * (HOLD_AT - KILL_AT + 1) + [3] * (STEPS - HOLD_AT)


def test_every_sample_read_once_and_the_same_final_state(uninterrupted, node_loss, stdlib_dataset):
    spec, rows, _, _ = node_loss
    assert_read_once(rows, stdlib_dataset, spec.seed)
    assert_same_final_state(uninterrupted[0], spec)


def test_the_node_loss_is_one_live_recovery(node_loss):
    _, _, events, out = node_loss
    (fault,) = [e for e in events if e["kind"] == "fault" and e["action"] == "kill_node"]
    assert not fault.get("skipped") and len(out["nodes_added"]) == 1
    (recovery,) = [e for e in events if e["kind"] == "recovery"]
    assert recovery["cause"].startswith("fault: kill the node of rank 1 at step 10")
    assert (recovery["world_size_before"], recovery["world_size_after"], recovery["lost_steps"]) == (3, 2, 0)
    joins = [e for e in events if e["kind"] == "join"]
    assert sorted(e["replica"] for e in joins) == [0, 1, 1, 2]  # the replacement ran on the new node
    assert max(e["time"] for e in joins) > out["nodes_added"][0]
