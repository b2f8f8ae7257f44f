"""Fault rehearsal rules: which fault fires where, how the spec refuses a fault that names no
worker, and how a restart becomes one recovery event."""

from pathlib import Path

import pytest
import yaml

from elastune.errors import SpecError
from elastune.spec import validate_spec
from elastune.spec.models import DelayRank, KillRank
from elastune.train.driver import RecoveryTracker
from elastune.train.faults import due

QUICKSTART = yaml.safe_load((Path(__file__).resolve().parents[2] / "jobs" / "quickstart.yaml").read_text())


def test_due_matches_rank_step_and_point():
    faults = [KillRank(action="kill_rank", rank=1, at_step=7), KillRank(action="kill_rank", rank=0, at_step=7, point="start"),
              DelayRank(action="delay_rank", rank=1, at_step=7, seconds=1.0)]  # fmt: skip
    assert due(faults, 1, 7, "mid") == [0]
    assert due(faults, 1, 7, "start") == [2]  # a delay happens as the step starts
    assert due(faults, 0, 7, "start") == [1]
    assert due(faults, 1, 8, "mid") == [] and due(faults, 2, 7, "mid") == []


def test_a_fault_must_name_a_worker(tmp_path):
    raw = {**QUICKSTART, "scaling": {"min_workers": 1, "max_workers": 2}, "faults": [{"action": "kill_rank", "rank": 2, "at_step": 3}]}
    with pytest.raises(SpecError, match=r"faults.0.rank \(2\) names no worker"):
        validate_spec(raw)


def test_restart_becomes_one_recovery_event():
    tracker = RecoveryTracker(global_batch_size=12)
    first = {"kind": "start", "time": 10.0, "world_size": 3, "resumed_from_step": None}
    assert tracker.observe([first], [{"step": 1, "time": 11.0}]) == []
    fault = {"kind": "fault", "action": "kill_rank", "time": 20.0, "rank": 1, "step": 7, "point": "mid"}
    restart = {"kind": "start", "time": 32.0, "world_size": 2, "resumed_from_step": 6, "resumed_from_tier": 0, "lost_steps": 1}
    assert tracker.observe([fault, restart], []) == []  # recovered only once a step completes
    (event,) = tracker.observe([], [{"step": 7, "time": 35.5}])
    assert event["cause"] == "fault: kill rank 1 at step 7 (mid)" and (event["world_size_before"], event["world_size_after"]) == (3, 2)
    assert (event["lost_steps"], event["lost_samples"], event["restart_seconds"], event["mttr_seconds"]) == (1, 12, 12.0, 15.5)
    assert tracker.observe([], [{"step": 8, "time": 36.0}]) == []
