"""The rules of live recovery that need no processes: how quorum changes and failed steps become
events, how the driver narrows a recovery to the injected fault's time, how the sink keeps one
row per step and one report per event, what the spec refuses, and the sample tally."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from elastune.batch_plan import BatchSchedule
from elastune.data.sampler import positions, sample_indices, tally
from elastune.errors import SpecError
from elastune.spec import validate_spec
from elastune.train.group import Membership
from elastune.train.progress import describe_event
from elastune.train.recovery import RecoveryTracker
from elastune.train.sink import RunSink
from tests.helpers import Clock, derived, ev, row

QUICKSTART = yaml.safe_load((Path(__file__).resolve().parents[2] / "jobs" / "quickstart.yaml").read_text())


def test_a_failed_step_then_a_commit_is_one_live_recovery():
    clock = Clock(100.0, 103.5, 104.2)
    m = Membership(clock)  # created at t=100
    assert m.committed(9, 3, (2, 2, 2), 12) == []  # t=103.5: first step seen
    m.failed(10, 3, started_at=103.6, error="Connection closed by peer")  # detected at t=104.2
    clock.set(105.0)
    (event,) = m.committed(10, 2, (3, 3), 12)
    assert event.kind == "recovery" and event.recovery == "live" and event.step == 10
    assert event.cause == "worker lost during step 10 (Connection closed by peer)"
    assert (event.world_size_before, event.world_size_after, event.resumed_from_step) == (3, 2, 9)
    assert (event.lost_steps, event.lost_samples, event.micro_batches) == (0, 0, (3, 3))
    assert event.detection_seconds == pytest.approx(0.6) and event.mttr_seconds == pytest.approx(1.4)
    assert "carried on at step 10 with the same global batch (3,3 micro-batches per rank)" in describe_event(event)
    assert m.committed(11, 2, (3, 3), 12) == []  # one event per failure


def test_a_worker_gone_between_steps_is_a_recovery_and_a_joiner_is_a_resize():
    clock = Clock(50.0)
    m = Membership(clock)
    m.committed(4, 3, (2, 2, 2), 12)
    clock.set(51.5)
    (lost,) = m.committed(5, 2, (3, 3), 12)  # nobody failed a step: the quorum was just smaller
    assert lost.kind == "recovery" and lost.cause == "worker left before step 5"
    assert lost.failed_at == 50.0 and lost.detection_seconds is None and lost.mttr_seconds == 1.5
    (joined,) = m.committed(6, 3, (2, 2, 2), 12)
    assert joined.kind == "resize" and (joined.world_size_before, joined.world_size_after, joined.step) == (2, 3, 5)
    assert describe_event(joined) == "Resized 2 -> 3 workers at step 5; micro-batches per rank 2,2,2; global batch stays 12."


def test_a_worker_that_starts_late_reports_no_change():
    m = Membership()
    assert m.committed(20, 3, (2, 2, 2), 12) == []  # a replacement knows no earlier quorum


def test_the_driver_narrows_a_live_recovery_to_the_fault_time():
    tracker = RecoveryTracker(BatchSchedule(12))
    fault = ev("fault", action="kill_rank", time=20.3, rank=1, step=10, point="mid")
    recovery = ev(
        kind="recovery",
        recovery="live",
        time=21.4,
        failed_at=20.0,
        detection_seconds=0.5,
        mttr_seconds=1.4,
        cause="worker lost during step 10",
    )
    (_, narrowed) = tracker.observe([fault, recovery], [])  # a narrowed copy in its place, nothing added
    assert narrowed.cause == "fault: kill rank 1 at step 10 (mid)"
    assert (narrowed.failed_at, narrowed.detection_seconds, narrowed.mttr_seconds) == (20.3, 0.2, 1.1)
    assert recovery.cause == "worker lost during step 10" and recovery.failed_at == 20.0  # the input is left as it was


def test_a_fault_before_this_survivors_step_start_still_explains_the_recovery():
    """Ranks start a step at slightly different moments: the victim may have crashed before the
    survivor that reports stamped its step start, but never before the survivor's last commit."""
    tracker = RecoveryTracker(BatchSchedule(12))
    fault = ev("fault", action="kill_rank", time=20.3, rank=2, step=3, point="mid")
    recovery = ev(
        kind="recovery",
        recovery="live",
        time=21.4,
        failed_at=20.35,
        failed_after=20.2,
        detection_seconds=0.5,
        mttr_seconds=1.05,
        cause="worker lost during step 3",
    )
    (_, narrowed) = tracker.observe([fault, recovery], [])
    assert narrowed.cause == "fault: kill rank 2 at step 3 (mid)" and narrowed.failed_at == 20.3
    before = replace(recovery, failed_after=20.31)  # a crash before the last commit: another failure
    (_, kept) = tracker.observe([fault, before], [])
    assert kept.cause == "worker lost during step 3"


def test_the_sink_keeps_each_step_once_and_each_keyed_event_once():
    sink = RunSink.__ray_actor_class__()
    sink.record([row(step=1), row(step=2)], True)
    sink.record([row(step=1), row(step=2), row(step=3)], True)  # another participant's copy
    sink.event(ev("recovery"), "recovery-10")
    sink.event(ev("recovery"), "recovery-10")
    sink.event(ev("warning"))
    sink.event(ev("warning"))
    rows, events = sink.drain()
    assert [r.step for r in rows] == [1, 2, 3]
    assert [e.kind for e in events] == ["recovery", "warning", "warning"]
    assert [sink.arrive("go"), sink.arrive("go"), sink.arrived("go"), sink.arrived("other")] == [1, 2, 2, 0]


@pytest.mark.parametrize("layout", ["zero1", "fsdp"])
def test_live_recovery_needs_the_replicated_layout(layout):
    raw = {**QUICKSTART, "scaling": {"min_workers": 1, "max_workers": 2, "layout": layout, "recovery": "live"}}
    with pytest.raises(SpecError, match="recovery live needs layout replicated"):
        validate_spec(raw)


@pytest.mark.parametrize(
    ("section", "setting", "field"),
    [
        ("step", {"precision": "fp16"}, "step.precision: bf16"),
        ("step", {"reduce_dtype": "bf16"}, "step.reduce_dtype: fp32"),
        ("metrics", {"noise_scale": True}, "remove metrics.noise_scale"),
    ],
)
def test_fsdp_refuses_what_it_does_not_do_naming_the_setting(section, setting, field):
    from tests.helpers import spec_problems

    raw = {**QUICKSTART, "scaling": {"min_workers": 2, "max_workers": 2, "layout": "fsdp"}, "metrics": {"noise_scale": False}}
    raw[section] = {**raw.get(section, {}), **setting}
    message = spec_problems(raw)
    assert "fsdp" in message and field in message and "layout: replicated" in message, message
    ok = {**QUICKSTART, "scaling": {"min_workers": 2, "max_workers": 2, "layout": "fsdp"}}
    assert validate_spec(ok).scaling.layout == "fsdp" and not validate_spec(ok).noise_scale  # off by default in fsdp
    assert validate_spec({**ok, "scaling": {**ok["scaling"], "layout": "zero1"}}).noise_scale  # on by default elsewhere


def test_tally_adds_up_across_any_split_and_tells_samples_apart():
    idx = sample_indices(positions(240, 0, 24), 1000, seed=3)
    whole = tally(idx)
    for cut in (0, 5, 11, 24):  # what two ranks read, added
        a, b = tally(idx[:cut]), tally(idx[cut:])
        assert tuple(x + y for x, y in zip(a, b)) == whole
    assert whole[0] == 24 and whole[1] == int(idx.sum())
    twice = np.concatenate([idx[:-1], idx[:1]])  # one sample read twice, another never
    assert tally(twice) != whole
    assert tally(np.array([], dtype=np.int64)) == (0, 0, 0)


def test_a_finished_live_run_stops_waiting_for_a_replacement_that_cannot_be_placed():
    from elastune.train.recovery import FINISH_GRACE_S, stranded

    assert not stranded("live", None, now=1000.0)  # still training
    assert not stranded("live", 100.0, now=100.0 + FINISH_GRACE_S - 1)  # Ray Train gets its grace
    assert stranded("live", 100.0, now=100.0 + FINISH_GRACE_S)
    assert not stranded("restart", 100.0, now=10_000.0)  # a restart-mode run ends with its group


def test_losing_every_live_worker_at_once_is_one_recovery_and_a_replacement_is_none():
    from elastune.train.recovery import RecoveryTracker

    def step_row(step, t, world=3):
        return row(step=step, samples_seen=12 * step, time=t, world_size=world, micro_batches=[2] * world, global_batch_size=12)

    def join(replica, t, step):
        return ev("join", time=t, replica=replica, step=step, samples_seen=12 * step, resumed_from_tier=0)

    tracker = RecoveryTracker(BatchSchedule(12), live=True)
    starting = [join(r, 1.0, 0) for r in range(3)]
    assert derived(tracker, starting, [step_row(1, 2.0), step_row(2, 2.5)]) == []  # the first step: everyone is new
    # One replacement while two survivors train: not a loss of the group.
    assert derived(tracker, [join(1, 3.0, 2)], [step_row(3, 3.5), step_row(4, 4.0)]) == []
    kills = [ev("fault", action="kill_rank", time=4.2 + r / 100, rank=r, step=5, point="mid") for r in range(3)]
    assert derived(tracker, kills, []) == []
    # Ray Train starts a whole new group; two of it train the first step, the third heals in later.
    (event,) = derived(tracker, [join(0, 15.0, 4), join(2, 15.2, 4)], [step_row(5, 16.0, world=2)])
    assert event.kind == "recovery" and event.cause.startswith("fault: kill rank 0 at step 5 (mid); fault: kill rank 1")
    assert (event.world_size_before, event.world_size_after, event.resumed_from_step, event.resumed_from_tier) == (
        3,
        2,
        4,
        0,
    )
    assert (event.lost_steps, event.failed_at, event.restart_seconds, event.mttr_seconds) == (0, 4.2, 10.8, 11.8)
    assert derived(tracker, [join(1, 16.5, 5)], [step_row(6, 17.0)]) == []
    # Lost two steps past the newest complete snapshot, with no fault to name: the lost steps count
    # (the sink keeps the first row of steps 5 and 6; the first new one is 7).
    (event,) = derived(tracker, [join(r, 30.0, 4) for r in range(3)], [step_row(7, 31.0)])
    assert event.cause == "every worker of the live group was lost" and event.lost_steps == 2 and event.failed_at == 17.0
    assert event.lost_samples == 24


def test_placeable_workers_counts_whole_workers_per_alive_node():
    from elastune.cluster import placeable_workers, short_of_workers

    nodes = [
        {"Alive": True, "Resources": {"CPU": 1.0}},  # a small head: no 2-CPU worker fits
        {"Alive": True, "Resources": {"CPU": 5.0, "GPU": 1.0}},
        {"Alive": False, "Resources": {"CPU": 64.0}},  # dead nodes hold nothing
        {"Alive": True, "Resources": {"CPU": 4.0}},
    ]
    assert placeable_workers(nodes, 2, 0) == 0 + 2 + 0 + 2
    assert placeable_workers(nodes, 2, 1) == 1  # only one node has a GPU, for one worker
    assert placeable_workers(nodes, 0.5, 0) == 2 + 10 + 8
    assert short_of_workers(4, placeable_workers(nodes, 2, 0)) is None
    warning = short_of_workers(5, placeable_workers(nodes, 2, 0))
    assert "starts all 5 workers" in warning and "has room for 4 now" in warning and "max_workers: 4" in warning
    assert "has room for 1" in short_of_workers(3, placeable_workers(nodes, 2, 1)) and "max_workers: 1" in short_of_workers(3, 1)
