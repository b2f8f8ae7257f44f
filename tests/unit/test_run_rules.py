"""The pure rules a run starts and ends by: what it does with the checkpoint it finds
(train.resume), when a live run gives up (train.failure_policy), who may write a checkpoint root
(checkpoint.lease), and what a stop signal exits with."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from elastune.checkpoint.checkpointer import Checkpointer
from elastune.checkpoint.format import Manifest
from elastune.checkpoint.lease import LEASE, TTL_S, Holder, Lease, this_process, verdict
from elastune.errors import IncompatibleCheckpoint, LeaseHeld
from elastune.spec import validate_spec
from elastune.train.failure_policy import decide_live
from elastune.train.resume import ModelState, plan_resume, saved_spec, spec_changes
from elastune.train.stopping import exit_code

SPEC = validate_spec(yaml.safe_load((Path(__file__).resolve().parents[2] / "jobs" / "quickstart.yaml").read_text()))
SHAPES = {"tok.weight": [256, 64], "blocks.0.qkv.weight": [192, 64], "ln_f.weight": [64]}


def manifest(shapes=SHAPES, samples=320, spec=SPEC, optimizer="adamw") -> Manifest:
    tensors = {f"model/{n}": {"dtype": "F32", "shape": s, "fragments": []} for n, s in shapes.items()}
    return Manifest(
        10, samples, "h", {"kind": "replicated"}, tensors, meta={"spec": saved_spec(spec), "optimizer": {"name": optimizer}}
    )


def test_a_fitting_checkpoint_resumes_and_says_what_changed():
    assert plan_resume(None, ModelState(SHAPES), SPEC, "x") is None
    same = plan_resume(manifest(), ModelState(SHAPES), SPEC, "x")
    assert (same.step, same.samples_seen, same.changes, same.complete) == (10, 320, (), False)
    raw = SPEC.to_dict()
    raw["optimizer"]["lr"] = 0.002
    raw["schedule"] = {"name": "cosine", "warmup_samples": 1600}
    raw["scaling"] = {"min_workers": 1, "max_workers": 4}  # elasticity is free: not a change worth a word
    raw["stop"] = {"max_steps": 600}
    changed = plan_resume(manifest(), ModelState(SHAPES), validate_spec(raw), "x")
    assert changed.changes == (
        "optimizer.lr 0.003 -> 0.002",
        "schedule.decay_fraction 0.2 -> (unset)",
        "schedule.decay_shape 'sqrt' -> (unset)",
        "schedule.horizon_samples 9600 -> 19200",
        "schedule.min_lr_ratio 0.1 -> 0.0",
        "schedule.name 'wsd' -> 'cosine'",
    ), changed.changes


def test_a_checkpoint_holding_the_whole_budget_is_complete():
    assert plan_resume(manifest(samples=SPEC.budget_samples), ModelState(SHAPES), SPEC, "x").complete
    assert not plan_resume(manifest(samples=SPEC.budget_samples - 1), ModelState(SHAPES), SPEC, "x").complete


@pytest.mark.parametrize(
    "shapes,words",
    [
        (
            {**SHAPES, "tok.weight": [256, 96]},
            "tensor model/tok.weight has shape [256, 64] in the checkpoint and [256, 96] in the model",
        ),
        ({**SHAPES, "blocks.1.qkv.weight": [192, 64]}, "model/blocks.1.qkv.weight is not in it"),
        ({n: s for n, s in SHAPES.items() if n != "ln_f.weight"}, "it holds model/ln_f.weight"),
    ],
)
def test_a_checkpoint_of_another_model_is_refused_naming_the_tensor_and_both_fixes(shapes, words):
    with pytest.raises(IncompatibleCheckpoint) as refused:
        plan_resume(manifest(), ModelState(shapes), SPEC, "checkpoint /c/step-000000010")
    message = str(refused.value)
    assert words in message and "--fresh" in message and "checkpoint.path" in message and "not corrupt" in message, message
    assert refused.value.exit_code == 2


def test_tied_copies_other_tools_save_are_not_another_model():
    saved = {**SHAPES, "head.weight": [256, 64]}
    assert plan_resume(manifest(saved), ModelState(SHAPES, frozenset({"head.weight"})), SPEC, "x") is not None


def test_another_optimizers_state_is_refused():
    with pytest.raises(IncompatibleCheckpoint, match="holds sgd optimizer state"):
        plan_resume(manifest(optimizer="sgd"), ModelState(SHAPES), SPEC, "x")


def test_spec_changes_name_every_differing_leaf_and_skip_what_says_nothing_of_the_state():
    a = {
        "optimizer": {"lr": 1, "betas": [0.9, 0.95]},
        "batch": {"global_batch_size": 32},
        "output_dir": "a",
        "stop": {"max_steps": 1},
    }
    b = {
        "optimizer": {"lr": 1, "betas": [0.9, 0.99]},
        "batch": {"global_batch_size": 64, "micro_batch_size": 8},
        "output_dir": "b",
    }
    assert spec_changes(a, b) == (
        "batch.global_batch_size 32 -> 64",
        "batch.micro_batch_size (unset) -> 8",
        "optimizer.betas [0.9, 0.95] -> [0.9, 0.99]",
    )


def test_a_live_run_gives_up_only_on_failures_without_progress_between_them():
    # Twelve failures, each after progress: never gives up (the measured multi-kill run).
    steps: list[int | None] = []
    for k in range(12):
        steps.append(10 * (k + 1))
        decision = decide_live(steps, 3)
        assert decision.retry and decision.in_a_row == 1, decision
    # A double failure (two at one step) counts two; a fourth in a row without progress ends it.
    for in_a_row in (2, 3):
        steps.append(120)
        assert decide_live(steps, 3).retry and decide_live(steps, 3).in_a_row == in_a_row
    steps.append(120)
    decision = decide_live(steps, 3)
    assert (
        not decision.retry
        and decision.in_a_row == 4
        and "stayed 120" in decision.reason
        and "scaling.max_failures (3)" in decision.reason
    )
    assert decide_live(steps, -1).retry  # -1 never gives up
    assert not decide_live([None, None], 1).retry and "before any step committed" in decide_live([None, None], 1).reason
    assert decide_live([None, None], 0).retry is False and decide_live([None], 0).retry is False
    # Property: the decision depends only on the trailing run of equal steps.
    for history in itertools.product([None, 1, 2], repeat=5):
        run = len(history) - next((i for i in range(len(history) - 1, -1, -1) if history[i] != history[-1]), -1) - 1
        assert decide_live(list(history), 2).retry == (run <= 2), history


def test_stop_signals_exit_as_shells_report_them():
    assert (exit_code(2), exit_code(15)) == (130, 143)


# ------------------------------------------------------------------ the lease


def holder(**changes) -> Holder:
    base = dict(run_id="r1", job="j", host="h", boot_id="b", pid=10, pid_started="99", taken_at=0.0, renewed_at=100.0)
    return Holder(**{**base, **changes})


@pytest.mark.parametrize(
    "current,alive,now,want",
    [
        (None, None, 100.0, "free"),
        (holder(run_id="me", pid=1), None, 100.0, "mine"),
        (holder(), True, 100.0, "held"),  # its process runs
        (holder(), False, 100.0, "gone"),  # same host, its process is gone (or its pid is another process now)
        (holder(), None, 100.0 + TTL_S - 1, "held"),  # another host, renewed within TTL
        (holder(), None, 100.0 + TTL_S + 1, "gone"),  # another host, silent for longer than TTL
        (holder(), True, 100.0 + TTL_S + 1, "gone"),  # silence ends it even where the process is there (hung)
    ],
)
def test_lease_verdicts(current, alive, now, want):
    assert verdict(current, holder(run_id="me", pid=1), now, lambda h: alive) == want


def test_one_root_one_writer_and_a_gone_holder_is_taken_over(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "root"))
    first = Lease(ckpt.storage, this_process("run-1", "job-a"))
    first.acquire()
    with pytest.raises(LeaseHeld) as refused:
        Lease(ckpt.storage, this_process("run-2", "job-b")).acquire()
    assert (
        "run run-1 of job job-a" in str(refused.value)
        and f"pid {os.getpid()}" in str(refused.value)
        and "checkpoint.path" in str(refused.value)
    )
    first.release()
    assert not (tmp_path / "root" / LEASE).exists()
    # A holder whose process ended without releasing (killed): provably gone on this host.
    code = (
        "from elastune.checkpoint.lease import Lease, this_process; from elastune.checkpoint.storage import Storage;"
        f"Lease(Storage.from_uri({str(tmp_path / 'root')!r}), this_process('run-3', 'job-c')).acquire()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    taker = Lease(ckpt.storage, this_process("run-4", "job-d"))
    taker.acquire()
    assert taker.took_over is not None and taker.took_over.run_id == "run-3"
    assert taker.read().run_id == "run-4"
