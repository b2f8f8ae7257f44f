"""Resume at another world size and layout: 2 fully sharded (FSDP2) workers, rank 1 SIGKILLed in
the middle of step 5 (the group restarts from its in-memory snapshot, still sharded), to step 9;
then 3 replicated workers to step 19; then 2 fully sharded workers again to step 28. The whole
tracks the uninterrupted 3-worker replicated run (conftest's `uninterrupted`) step for step:
every step once, loss and held-out loss within 1e-5 relative, final parameters too."""

from __future__ import annotations

import pytest

from elastune.checkpoint.checkpointer import Checkpointer
from tests.helpers import rel_err
from tests.ray.jobs import STEPS, run, spec_for
from tests.ray.live_cases import assert_evaluated_once

FIRST, SECOND = 9, 19
KILL_AT = 5


def sharded(spec, faults=()):
    """`spec` in the fsdp layout (without a noise-scale estimate: off by default there)."""
    raw = spec.to_dict()
    raw["scaling"]["layout"] = "fsdp"
    raw["faults"] = list(faults)
    return spec.model_validate(raw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, stdlib_dataset, uninterrupted):
    tmp = tmp_path_factory.mktemp("resume")
    reference_spec, reference = uninterrupted
    kill = {"action": "kill_rank", "rank": 1, "at_step": KILL_AT, "point": "mid"}
    _, first, first_events = run(sharded(spec_for(tmp, stdlib_dataset, "elastic", 2, FIRST), [kill]))
    _, second, events = run(spec_for(tmp, stdlib_dataset, "elastic", 3, SECOND))
    _, third, third_events = run(sharded(spec_for(tmp, stdlib_dataset, "elastic", 2, STEPS)))
    return tmp, (reference_spec, reference), first + second + third, (first_events, events, third_events)


def test_every_step_once_through_a_kill_and_two_layout_changes(runs):
    _, _, rows, (first, second, third) = runs
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["world_size"] for r in rows] == [2] * FIRST + [3] * (SECOND - FIRST) + [2] * (STEPS - SECOND)
    assert [r["samples_seen"] for r in rows] == [12 * s for s in range(1, STEPS + 1)]
    (recovery,) = [e for e in first if e["kind"] == "recovery"]
    assert recovery["resumed_from_tier"] == 0 and recovery["resumed_from_step"] < KILL_AT  # a sharded snapshot
    start = next(e for e in second if e["kind"] == "start")
    assert (start["resumed_from_step"], start["saved_world_size"], start["saved_layout"]) == (FIRST, 2, "fsdp")
    assert start["resumed_from_tier"] == 1 and start["micro_batches"] == [2, 2, 2]  # a new run: its service starts empty
    start = next(e for e in third if e["kind"] == "start")
    assert (start["resumed_from_step"], start["saved_world_size"], start["saved_layout"]) == (SECOND, 3, "replicated")
    # Sharded: every rank hands over its own rows (one writer is for replicated states only).
    saves = [e for e in third if e["kind"] == "checkpoint"]
    assert [e["step"] for e in saves] == [20, STEPS]
    assert all(len(e["rank_bytes"]) == 2 and sum(e["rank_bytes"]) == e["bytes"] and min(e["rank_bytes"]) > 0 for e in saves)


def test_loss_curve_matches_uninterrupted_run(runs):
    _, (_, reference), rows, _ = runs
    assert len(reference) == STEPS
    for ref, got in zip(reference, rows):
        assert got["lr"] == pytest.approx(ref["lr"], rel=1e-12)
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), f"step {got['step']}"
    assert rows[-1]["loss"] < rows[0]["loss"]  # it trained
    assert_evaluated_once(reference, rows, STEPS)  # sharded evaluations too (every rank runs as many passes)


def test_final_parameters_match_uninterrupted_run(runs):
    tmp, (reference_spec, _), _, _ = runs
    ref = Checkpointer(reference_spec.checkpoint_path).load_latest_valid()
    got = Checkpointer(str(tmp / "elastic" / "ckpt")).load_latest_valid()
    assert ref[0].step == got[0].step == STEPS
    assert (got[0].layout["world_size"], got[0].layout["kind"]) == (2, "fsdp")
    for name, want in ref[1].items():
        if want.is_floating_point():
            assert rel_err(got[1][name], want) <= 1e-5, name


def test_fresh_starts_over(runs, stdlib_dataset):
    tmp = runs[0]
    _, rows, events = run(spec_for(tmp, stdlib_dataset, "elastic", 1, 2), fresh=True)
    assert [r["step"] for r in rows] == [1, 2]
    assert any(e["kind"] == "fresh" for e in events)


def test_each_worker_reports_the_training_state_it_holds(runs):
    """Memory events against the checkpoint's own tensors: replicated workers hold everything
    (gradients twice: the noise scale's second buffer), fsdp's two workers share it row by row."""
    tmp, _, _, (first, second, third) = runs
    _, tensors = Checkpointer(str(tmp / "elastic" / "ckpt")).load_latest_valid()
    names = [k.removesuffix("/exp_avg") for k in tensors if k.endswith("/exp_avg")]  # AdamW: one per parameter
    whole = sum(4 * tensors[f"{n}/exp_avg"].numel() for n in names)
    adam = 2 * whole + 4 * len(names)  # two fp32 moments and a float32 step count per parameter

    def memory(events):
        return sorted(
            (e["replica"], e["param_bytes"], e["grad_bytes"], e["optimizer_bytes"]) for e in events if e["kind"] == "memory"
        )

    assert memory(second) == [(r, whole, 2 * whole, adam) for r in range(3)]
    sharded = memory(third)
    assert [m[0] for m in sharded] == [0, 1]
    assert sum(m[1] for m in sharded) == whole and sum(m[2] for m in sharded) == whole  # every row once
    assert sum(m[3] for m in sharded) == 2 * whole + 2 * 4 * len(names)  # each rank keeps a step count per parameter
    assert max(m[1] for m in sharded) <= 0.6 * whole  # about half each (rows of ceil(d0 / 2))
    assert memory(first) == sorted(sharded * 2)  # the same shares again in the group after the kill
