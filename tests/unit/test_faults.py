"""Fault rehearsal rules: which fault fires where, how the spec refuses a fault that names no
worker, and how each start of a worker group becomes at most one recovery or resize event."""

import time
from pathlib import Path

import pytest
import yaml

from elastune.batch_plan import BatchSchedule
from elastune.errors import SpecError
from elastune.spec import validate_spec
from elastune.spec.scaling import DelayRank, KillRank
from elastune.train.faults import FaultInjector, due
from elastune.train.progress import describe_event
from elastune.train.recovery import RecoveryTracker
from elastune.train.sink import RunSink
from tests.helpers import derived, ev, row

QUICKSTART = yaml.safe_load((Path(__file__).resolve().parents[2] / "jobs" / "quickstart.yaml").read_text())


def test_due_matches_rank_step_and_point():
    faults = [
        KillRank(action="kill_rank", rank=1, at_step=7),
        KillRank(action="kill_rank", rank=0, at_step=7, point="start"),
        DelayRank(action="delay_rank", rank=1, at_step=7, seconds=1.0),
    ]
    assert due(faults, 1, 7, "mid") == [0]
    assert due(faults, 1, 7, "start") == [2]  # a delay happens as the step starts
    assert due(faults, 0, 7, "start") == [1]
    assert due(faults, 1, 8, "mid") == [] and due(faults, 2, 7, "mid") == []


def test_a_stall_until_join_ends_at_the_replacements_join_and_no_later_than_its_seconds():
    sink = RunSink.__ray_actor_class__()
    sink.event(ev("join", time=1.0, replica=1))
    assert not sink.rejoined()  # joins before any kill are the run's first workers
    sink.event(ev("fault", time=2.0, action="kill_rank", rank=1))
    sink.event(ev("fault", time=2.5, action="delay_rank", rank=0))
    assert not sink.rejoined()
    sink.event(ev("join", time=3.0, replica=1))
    assert sink.rejoined()
    sink.event(ev("fault", time=4.0, action="kill_node", rank=2))
    assert not sink.rejoined()  # the next kill wants its own replacement

    asked = []
    stall = DelayRank(action="delay_rank", rank=0, at_step=3, seconds=30.0, until_join=True)
    injector = FaultInjector([stall], 0, lambda key: True, lambda e: None, rejoined=lambda: asked.append(1) or len(asked) >= 3)
    started = time.monotonic()
    injector.at(3, "start")
    assert len(asked) == 3 and time.monotonic() - started < 1.0  # released at the third look, not after 30 s
    never = FaultInjector(
        [DelayRank(action="delay_rank", rank=0, at_step=3, seconds=0.3, until_join=True)],
        0,
        lambda key: True,
        lambda e: None,
        rejoined=lambda: False,
    )
    started = time.monotonic()
    never.at(3, "start")
    assert 0.3 <= time.monotonic() - started < 1.0  # no join: the seconds bound it


def test_a_fault_must_name_a_worker(tmp_path):
    raw = {
        **QUICKSTART,
        "scaling": {"min_workers": 1, "max_workers": 2},
        "faults": [{"action": "kill_rank", "rank": 2, "at_step": 3}],
    }
    with pytest.raises(SpecError, match=r"faults.0.rank \(2\) names no worker"):
        validate_spec(raw)


def test_restart_becomes_one_recovery_event():
    tracker = RecoveryTracker(BatchSchedule(12))
    first = ev("start", time=10.0, world_size=3, resumed_from_step=None)
    assert derived(tracker, [first], [row(step=1, time=11.0)]) == []
    fault = ev("fault", action="kill_rank", time=20.0, rank=1, step=7, point="mid")
    noticed = [
        ev("collective_failed", time=t, rank=r, step=7, error="Connection closed by peer") for r, t in ((2, 20.4), (0, 20.3))
    ]
    restart = ev("start", time=32.0, world_size=2, resumed_from_step=6, resumed_from_tier=0, lost_steps=1)
    assert derived(tracker, [fault, *noticed, restart], []) == []  # recovered only once a step completes
    (event,) = derived(tracker, [], [row(step=7, time=35.5)])
    assert event.cause == "fault: kill rank 1 at step 7 (mid)" and (event.world_size_before, event.world_size_after) == (
        3,
        2,
    )
    assert event.detection_seconds == 0.3  # the first survivor whose reduction failed
    assert (event.lost_steps, event.lost_samples, event.restart_seconds, event.mttr_seconds) == (1, 12, 12.0, 15.5)
    assert derived(tracker, [], [row(step=8, time=36.0)]) == []


def test_steps_done_after_the_newest_snapshot_count_as_lost():
    """Snapshots every 4 steps: the service last heard of step 4, but the survivors' reductions
    failed in step 7, so steps 5 and 6 were completed and are run again."""
    tracker = RecoveryTracker(BatchSchedule(12))
    tracker.observe([ev("start", time=10.0, world_size=3, resumed_from_step=None)], [row(step=1, time=11.0)])
    noticed = ev("collective_failed", time=20.3, rank=0, step=7, error="Connection closed by peer")
    restart = ev("start", time=32.0, world_size=3, resumed_from_step=4, resumed_from_tier=0, lost_steps=0)
    tracker.observe([noticed, restart], [])
    (event,) = derived(tracker, [], [row(step=5, time=35.0)])
    assert (event.lost_steps, event.lost_samples, event.resumed_from_step) == (2, 24, 4)


def test_a_group_restarted_bigger_without_a_fault_is_a_resize_with_its_cost():
    # Ray Train's elastic policy saw capacity for a third worker and restarted the group at 3.
    tracker = RecoveryTracker(BatchSchedule(12))
    tracker.observe(
        [ev("start", time=10.0, world_size=2, resumed_from_step=None, micro_batches=[3, 3])],
        [row(step=1, time=11.0)],
    )
    bigger = ev(
        kind="start",
        time=40.0,
        world_size=3,
        resumed_from_step=7,
        resumed_from_tier=0,
        lost_steps=0,
        last_staged_at=30.0,
        micro_batches=[2, 2, 2],
    )
    assert derived(tracker, [bigger], []) == []
    (event,) = derived(tracker, [], [row(step=8, time=42.5)])
    assert event.kind == "resize" and event.cause.startswith("capacity for 3 workers")
    assert (event.world_size_before, event.world_size_after, event.step) == (2, 3, 7)
    assert (event.lost_steps, event.lost_samples, event.restart_seconds, event.mttr_seconds) == (0, 0, 10.0, 12.5)
    assert describe_event(event) == (
        "Resized 2 -> 3 workers at step 7; micro-batches per rank 2,2,2; global batch stays 12. "
        "Lost 0 step(s); training again 12.5 s after the old group stopped."
    )


def test_a_group_restarted_smaller_without_a_fault_is_a_recovery():
    tracker = RecoveryTracker(BatchSchedule(12))
    tracker.observe([ev("start", time=10.0, world_size=3, resumed_from_step=None, micro_batches=[2, 2, 2])], [])
    smaller = ev(
        kind="start",
        time=40.0,
        world_size=2,
        resumed_from_step=9,
        resumed_from_tier=0,
        lost_steps=0,
        last_staged_at=30.0,
        micro_batches=[3, 3],
    )
    tracker.observe([smaller], [])
    (event,) = derived(tracker, [], [row(step=10, time=41.0)])
    assert event.kind == "recovery" and event.cause == "worker group restarted"
    assert (event.world_size_before, event.world_size_after) == (3, 2)


def test_a_run_resumed_at_another_world_size_starts_with_a_resize():
    tracker = RecoveryTracker(BatchSchedule(24))
    start = {
        "kind": "start",
        "time": 5.0,
        "world_size": 3,
        "resumed_from_step": 20,
        "resumed_from_tier": 1,
        "saved_world_size": 2,
        "micro_batches": [2, 2, 2],
    }
    (event,) = derived(tracker, [ev(**start)], [])
    assert describe_event(event) == "Resized 2 -> 3 workers at step 20; micro-batches per rank 2,2,2; global batch stays 24."
    same = {**start, "saved_world_size": 3}
    assert derived(RecoveryTracker(BatchSchedule(24)), [ev(**same)], []) == []


def test_error_texts_print_as_they_are(capsys):
    from rich.console import Console

    error = "[/__w/pytorch/third_party/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:43218"
    console = Console(width=400, force_terminal=False)
    console.print(describe_event(ev("collective_failed", rank=0, step=7, error=error)))
    console.print(describe_event(ev("warning", message=error)))
    out = capsys.readouterr().out
    assert out.count(error) == 2 and "Rank 0 saw step 7's reduction fail" in out and "Warning: " in out
