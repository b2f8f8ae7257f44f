"""A worker SIGKILLed in the middle of a step (spec `faults:`): the run goes on from the newest
in-memory snapshot (snapshots spaced as `snapshot_every_steps: auto` spaces them: the steps
after it are lost and run again, their rows never reach the run directory twice), and tracks the
uninterrupted run step for step. The killed run is conftest's `observed` (a real Prometheus
scrapes it for test_observability.py). Every-step snapshots losing no step: test_resize.py."""

from __future__ import annotations

import pytest

from tests.ray.conftest import OBSERVED_STEPS
from tests.ray.live_cases import assert_evaluated_once

STEPS = OBSERVED_STEPS


@pytest.fixture(scope="module")
def runs(uninterrupted, observed):
    """The killed run against the uninterrupted one (same spec and schedule but for the fault)."""
    _, reference = uninterrupted
    _, outcome, rows, events = observed
    return reference[:STEPS], rows, events, outcome.run_dir


def test_every_step_once_and_the_same_losses(runs):
    reference, rows, _, _ = runs
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # nothing lost, nothing twice
    for want, got in zip(reference, rows):
        assert abs(got["loss"] - want["loss"]) <= 1e-5 * abs(want["loss"]), (got["step"], got["loss"], want["loss"])


def test_the_killed_step_evaluates_once(runs):
    """Step 7 evaluates; rank 1 died in its middle, after its share of the evaluation and before
    the reduction that carries it: the evaluation is lost with the step and taken again."""
    reference, rows, _, _ = runs
    assert_evaluated_once(reference, rows, STEPS)


def test_the_last_scrape_passes_promtool_and_agrees_with_the_run(runs, promtool):
    import subprocess

    from prometheus_client.parser import text_string_to_metric_families

    from elastune.metrics.catalogue import series_names

    _, rows, events, run_dir = runs
    text = (run_dir / "metrics.prom").read_text()
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    got = {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if "rank" not in s.labels and "le" not in s.labels
    }
    assert set(got) <= series_names()
    assert got["elastune_steps_total"] == STEPS and got["elastune_samples_total"] == STEPS * rows[-1]["global_batch_size"]
    assert got["elastune_loss"] == rows[-1]["loss"] and got["elastune_world_size"] == 3
    (recovery,) = [e for e in events if e["kind"] == "recovery"]
    assert got["elastune_worker_failures_total"] == 1 and got["elastune_lost_steps_total"] == 2
    assert got["elastune_recovery_seconds_sum"] == recovery["mttr_seconds"]
    assert got["elastune_failure_detection_seconds_count"] == 1
    # The noise scale: every step (6 micro-batches) carried its estimates, and the gauge is their
    # running ratio replayed from the rows.
    from elastune.metrics.noise import NoiseScale

    assert all(r["noise"] is not None for r in rows)
    replay = NoiseScale()
    for r in rows:
        value = replay.update(r["noise"])
    if value is None:  # no estimate yet: NaN, so the series exists
        assert got["elastune_gradient_noise_scale"] != got["elastune_gradient_noise_scale"]
    else:
        assert got["elastune_gradient_noise_scale"] == pytest.approx(value, rel=1e-9)


def test_recovery_resumes_from_the_newest_snapshot_and_counts_the_steps_lost(runs):
    _, rows, events, _ = runs
    fault = [e for e in events if e["kind"] == "fault"]
    assert len(fault) == 1 and (fault[0]["rank"], fault[0]["step"]) == (1, 7)  # once, though step 7 ran twice
    (recovery,) = [e for e in events if e["kind"] == "recovery"]
    # The snapshot before the kill is step 4's: steps 5 and 6 were done once in vain.
    assert recovery["resumed_from_step"] == 4 and recovery["resumed_from_tier"] == 0
    assert recovery["lost_steps"] == 2 and recovery["lost_samples"] == 2 * rows[0]["global_batch_size"]
    assert (recovery["world_size_before"], recovery["world_size_after"]) == (3, 3)
    assert 0 < recovery["restart_seconds"] <= recovery["mttr_seconds"]
    # The survivors saw their reduction of step 7 fail: that is when the group noticed the kill.
    noticed = [e for e in events if e["kind"] == "collective_failed"]
    assert noticed and all(e["step"] == 7 and e["rank"] != 1 for e in noticed)
    assert 0 <= recovery["detection_seconds"] < recovery["restart_seconds"]
