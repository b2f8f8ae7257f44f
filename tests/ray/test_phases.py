"""A run whose `phases` change the global batch reports the batch each step trained, everywhere:
rows, the progress total, and a recovery inside the second phase (its global batch and lost
samples are the second phase's, not the job's base batch)."""

from __future__ import annotations

import os

from rich.console import Console

from elastune.train.driver import run_job
from elastune.train.run_dir import read_jsonl
from tests.ray.jobs import spec_for

SWITCH = 96  # samples: 8 steps of 12, then steps of 24 to the budget
BUDGET = 240


def test_a_recovery_in_the_second_phase_reports_that_phases_batch(tmp_path, stdlib_dataset):
    raw = spec_for(tmp_path, stdlib_dataset, "phased", 2, 1).to_dict()
    raw["stop"] = {"max_samples": BUDGET}
    raw["phases"] = [{"from_samples": SWITCH, "global_batch_size": 24}]
    raw["checkpoint"]["snapshot_every_steps"] = 4  # snapshots at 4, 8 and the durable 10: the kill in 12 loses step 11
    raw["faults"] = [{"action": "kill_rank", "rank": 1, "at_step": 12, "point": "mid"}]
    spec = spec_for(tmp_path, stdlib_dataset, "phased", 2, 1).model_validate(raw)
    assert spec.max_steps == 8 + (BUDGET - SWITCH) // 24 == 14

    console = Console(record=True, width=200)
    outcome = run_job(spec, os.getcwd(), console=console)
    assert outcome.status == "succeeded", outcome.error
    rows, events = read_jsonl(outcome.run_dir / "metrics.jsonl"), read_jsonl(outcome.run_dir / "events.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 15))
    assert [r["global_batch_size"] for r in rows] == [12] * 8 + [24] * 6 and rows[-1]["samples_seen"] == BUDGET
    assert "step 14/14" in console.export_text()

    (recovery,) = [e for e in events if e["kind"] == "recovery"]
    assert (recovery["resumed_from_step"], recovery["lost_steps"]) == (10, 1)
    assert recovery["global_batch_size"] == 24 and recovery["lost_samples"] == 24
