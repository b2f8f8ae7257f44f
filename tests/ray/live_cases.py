"""What the live-recovery and node-loss runs share: the job, and the checks against the
uninterrupted 3-worker run (conftest's `uninterrupted` fixture)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from elastune.checkpoint.checkpointer import Checkpointer
from elastune.data.dataset import TokenWindows
from elastune.data.sampler import positions, sample_indices, tally
from elastune.train.run_dir import read_jsonl
from tests.helpers import rel_err
from tests.ray.jobs import STEPS, spec_for

G = 12  # spec_for's global batch


def job(tmp: Path, data: Path, name: str, faults: list[dict] | None = None, recovery: str = "live"):
    """3 workers, at least 2 (live) and a schedule horizon of exactly STEPS."""
    raw = spec_for(tmp, data, name, 3, STEPS).to_dict()
    raw["schedule"]["horizon_samples"] = G * STEPS
    if recovery == "live":
        raw["scaling"] |= {"min_workers": 2, "max_workers": 3, "recovery": "live"}
    raw["faults"] = faults or []
    return spec_for(tmp, data, name, 3, STEPS).model_validate(raw)


def assert_tracks(reference: list[dict], rows: list[dict]) -> None:
    """Every step once, in order, at the same lr and (1e-5 relative) loss as the reference."""
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["global_batch_size"] == G for r in rows)
    for want, got in zip(reference, rows):
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), f"step {got['step']}"


def assert_evaluated_once(reference: list[dict], rows: list[dict], steps: int) -> None:
    """One held-out loss at each evaluating step (1, 4, 7, ...: jobs.EVAL_EVERY) and none
    elsewhere, equal (1e-5 relative) to the uninterrupted run's: a step that failed took its
    evaluation down with it and evaluated again, never counted twice."""
    assert [r["step"] for r in rows if r["eval_loss"] is not None] == list(range(1, steps + 1, 3))
    for want, got in zip(reference[:steps], rows):
        if want["eval_loss"] is not None:
            assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5), f"step {got['step']}"


def assert_read_once(rows: list[dict], data: Path, seed: int) -> None:
    """Each step read exactly the samples the stateless sampler puts at its positions (its own
    global batch's: an adaptive batch changes it)."""
    n = len(TokenWindows(data))
    for r in rows:
        g = r["global_batch_size"]
        want = tally(sample_indices(positions(r["samples_seen"] - g, 0, g), n, seed))
        assert tuple(r["sample_tally"]) == want, f"step {r['step']}: read {r['sample_tally']}, the sampler says {want}"


def assert_same_final_state(reference_spec, spec) -> None:
    want_manifest, want = Checkpointer(reference_spec.checkpoint_path).load_latest_valid()
    got_manifest, got = Checkpointer(spec.checkpoint_path).load_latest_valid()
    assert got_manifest.step == want_manifest.step == STEPS
    assert set(got) == set(want)
    for name in want:
        assert rel_err(got[name], want[name]) <= 1e-5, name


def on_cluster(scenario: str, tmp: Path, spec, env: dict[str, str] | None = None) -> tuple[list[dict], list[dict], dict]:
    """Run `spec` in tests/ray/cluster_job.py's `scenario` (its own multi-node cluster, in a
    process of its own, with `env` added to its environment); the run's metrics rows, events,
    and what the script reports."""
    # 2 CPUs a worker, so that no worker fits on the 1-CPU head; one thread, as the reference's.
    spec = spec.model_validate(
        {**spec.to_dict(), "scaling": {**spec.to_dict()["scaling"], "cpus_per_worker": 2, "torch_threads": 1}}
    )
    (tmp / "spec.json").write_text(json.dumps(spec.to_dict()))
    script = Path(__file__).with_name("cluster_job.py")
    done = subprocess.run(
        [sys.executable, str(script), scenario, str(tmp / "spec.json"), str(tmp / "out.json")],
        capture_output=True,
        text=True,
        timeout=420,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads((tmp / "out.json").read_text())
    assert out["status"] == "succeeded", out["error"]
    run_dir = Path(out["run_dir"])
    return read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "events.jsonl"), out
