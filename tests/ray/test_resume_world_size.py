"""Resume at another world size and layout: 2 replicated workers to step 14, then 3 ZeRO-1
workers to step 28, tracks the uninterrupted 3-worker replicated run (conftest's `uninterrupted`)
step for step (loss within 1e-5 relative, final parameters too)."""

from __future__ import annotations

import pytest

from elastune.checkpoint.checkpointer import Checkpointer
from tests.helpers import rel_err
from tests.ray.jobs import STEPS, run, spec_for

HALF = STEPS // 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory, stdlib_dataset, uninterrupted):
    tmp = tmp_path_factory.mktemp("resume")
    reference_spec, reference = uninterrupted
    _, first, _ = run(spec_for(tmp, stdlib_dataset, "elastic", 2, HALF))
    _, second, events = run(spec_for(tmp, stdlib_dataset, "elastic", 3, STEPS, layout="zero1"))
    return tmp, (reference_spec, reference), first + second, events


def test_resumed_run_continues_at_the_exact_step(runs):
    _, _, rows, events = runs
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["world_size"] for r in rows] == [2] * HALF + [3] * (STEPS - HALF)
    assert [r["samples_seen"] for r in rows] == [12 * s for s in range(1, STEPS + 1)]
    start = next(e for e in events if e["kind"] == "start")
    assert start["resumed_from_step"] == HALF and start["saved_world_size"] == 2 and start["micro_batches"] == [2, 2, 2]
    assert start["saved_layout"] == "replicated" and start["resumed_from_tier"] == 1  # a new run: its service starts empty
    assert start["load_bytes"] > 0 and start["load_seconds"] >= 0
    saves = [e for e in events if e["kind"] == "checkpoint"]
    assert [e["step"] for e in saves] == [20, STEPS]  # every 10 steps, and the end
    # ZeRO-1: every rank hands over its own slice (one writer is for replicated states only).
    assert all(len(e["stall_seconds"]) == len(e["rank_bytes"]) == 3 and sum(e["rank_bytes"]) == e["bytes"] for e in saves)
    assert any(e["kind"] == "resume" and e["step"] == HALF for e in events)
    resize = next(e for e in events if e["kind"] == "resize")
    assert (resize["world_size_before"], resize["world_size_after"], resize["step"]) == (2, 3, HALF)


def test_loss_curve_matches_uninterrupted_run(runs):
    _, (_, reference), rows, _ = runs
    assert len(reference) == STEPS
    for ref, got in zip(reference, rows):
        assert got["lr"] == pytest.approx(ref["lr"], rel=1e-12)
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), f"step {got['step']}"
    assert rows[-1]["loss"] < rows[0]["loss"]  # it trained


def test_final_parameters_match_uninterrupted_run(runs):
    tmp, (reference_spec, _), _, _ = runs
    ref = Checkpointer(reference_spec.checkpoint_path).load_latest_valid()
    got = Checkpointer(str(tmp / "elastic" / "ckpt")).load_latest_valid()
    assert ref[0].step == got[0].step == STEPS
    assert got[0].layout["world_size"] == 3
    for name, want in ref[1].items():
        if want.is_floating_point():
            assert rel_err(got[1][name], want) <= 1e-5, name


def test_fresh_starts_over(runs, stdlib_dataset):
    tmp = runs[0]
    _, rows, events = run(spec_for(tmp, stdlib_dataset, "elastic", 1, 2), fresh=True)
    assert [r["step"] for r in rows] == [1, 2]
    assert any(e["kind"] == "fresh" for e in events)
