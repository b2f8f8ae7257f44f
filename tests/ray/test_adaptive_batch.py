"""An adaptive batch on real Ray Train workers: the uninterrupted run (2 workers) against a new
run at 3 workers resuming its checkpoint from partway, and against `elastune run` of the
uninterrupted run's replay.yaml (its decisions as phases, the rule off).

Every rank decides from the same reduced statistics, so the decisions need no message; the
resumed run takes the history and the smoothed noise scale up from the checkpoint's meta and
decides on from there. Its noise estimates differ from the uninterrupted run's only by summation
order (another world size), which could move a decision only if the target sat within about 1e-7
of a rounding edge between micro-batch counts."""

from __future__ import annotations

import os
import shutil

import pytest
import yaml

from elastune.spec import validate_spec
from tests.ray.jobs import run, spec_for
from tests.ray.live_cases import assert_read_once

BUDGET = 624  # samples
RESUME = 30  # the resumed run starts from the uninterrupted run's durable checkpoint of this step (372 samples)
ADAPTIVE = {"max": 36, "fraction": 1.0, "every_samples": 72, "smoothing_samples": 48}
GOODPUT = {"max": 48, "goodput": True, "every_samples": 72, "smoothing_samples": 48}


def adaptive(tmp, data, name: str, workers: int, rule: dict = ADAPTIVE):
    raw = spec_for(tmp, data, name, workers, 1).to_dict()
    raw["batch"]["adaptive"] = dict(rule)
    raw["stop"] = {"max_samples": BUDGET}
    raw["schedule"]["horizon_samples"] = BUDGET
    raw["checkpoint"]["keep_last"] = 10
    raw["eval"] = None
    return validate_spec({k: v for k, v in raw.items() if v is not None})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, stdlib_dataset):
    """The uninterrupted run; a run at 3 workers resuming a copy of its checkpoint of step RESUME
    (what a 2-worker run stopped there leaves); `elastune run` of its replay.yaml."""
    tmp = tmp_path_factory.mktemp("adaptive")
    whole, whole_rows, whole_events = run(adaptive(tmp, stdlib_dataset, "whole", 2))
    (tmp / "resumed" / "ckpt").mkdir(parents=True)
    saved = f"step-{RESUME:09d}"
    shutil.copytree(tmp / "whole" / "ckpt" / saved, tmp / "resumed" / "ckpt" / saved)
    resumed = run(adaptive(tmp, stdlib_dataset, "resumed", 3))
    replay = yaml.safe_load((whole.run_dir / "replay.yaml").read_text())
    _, replayed, _ = run(validate_spec(replay))
    goodput = run(adaptive(tmp, stdlib_dataset, "goodput", 3, GOODPUT))
    return {
        "whole": (whole, whole_rows, whole_events),
        "resumed": resumed,
        "replayed": replayed,
        "replay": replay,
        "goodput": goodput,
    }


def changes(events):
    return [(e["samples_seen"], e["global_batch_size"]) for e in events if e["kind"] == "batch_change"]


def test_the_batch_moves_and_each_step_trains_the_batch_decided(runs):
    _, rows, events = runs["whole"]
    moved = changes(events)
    assert len(moved) >= 2, moved  # the test is about a batch that moves
    batches = [r["global_batch_size"] for r in rows]
    for samples, batch in moved:
        (after,) = [i for i, r in enumerate(rows) if r["samples_seen"] - r["global_batch_size"] == samples]
        assert batches[after] == batch and batches[after - 1] != batch  # the step that starts there trains it
    assert rows[-1]["samples_seen"] >= BUDGET and rows[-2]["samples_seen"] < BUDGET
    # samples seen advance by each step's own batch: every sample position once
    assert [r["samples_seen"] for r in rows] == [sum(batches[: i + 1]) for i in range(len(rows))]
    gaps = [b - a for a, b in zip([0] + [s for s, _ in moved], [s for s, _ in moved])]
    assert min(gaps) >= ADAPTIVE["every_samples"]


def test_the_lr_follows_the_declared_rule(runs):
    """AdamW's default rule, sqrt: each step's lr / its schedule value is sqrt(batch / 12) x the peak."""
    from elastune.train.schedules import lr_multiplier

    whole, rows, _ = runs["whole"]
    spec = validate_spec(yaml.safe_load((whole.run_dir / "spec.yaml").read_text()))
    for r in rows:
        start = r["samples_seen"] - r["global_batch_size"]
        want = spec.optimizer.lr * (r["global_batch_size"] / 12) ** 0.5 * lr_multiplier(spec.schedule, start, BUDGET)
        assert r["lr"] == pytest.approx(want, rel=1e-12), r["step"]


def test_resumed_at_another_world_size_it_follows_the_same_history(runs):
    _, reference, ref_events = runs["whole"]
    second, rows, events = runs["resumed"]
    start = next(e for e in events if e["kind"] == "start")
    assert (start["resumed_from_step"], start["saved_world_size"], start["world_size"]) == (RESUME, 2, 3)
    cut = reference[RESUME - 1]["samples_seen"]
    before = [c for c in changes(ref_events) if c[0] <= cut]
    assert before and changes(events) == [c for c in changes(ref_events) if c[0] > cut] != []  # decided on both sides
    assert [r["step"] for r in rows] == [r["step"] for r in reference[RESUME:]] and {r["world_size"] for r in rows} == {3}
    for ref, got in zip(reference[RESUME:], rows):
        assert (got["samples_seen"], got["global_batch_size"]) == (ref["samples_seen"], ref["global_batch_size"])
        assert got["lr"] == pytest.approx(ref["lr"], rel=1e-12)
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), f"step {got['step']}"
    # Its replay.yaml holds the changes made before it (from the checkpoint's meta) and after.
    assert yaml.safe_load((second.run_dir / "replay.yaml").read_text())["phases"] == runs["replay"]["phases"]


def test_replaying_the_recorded_spec_trains_the_same_steps(runs):
    _, reference, events = runs["whole"]
    replay, replayed = runs["replay"], runs["replayed"]
    assert "adaptive" not in replay["batch"] and [p["from_samples"] for p in replay["phases"]] == [s for s, _ in changes(events)]
    assert len(replayed) == len(reference)
    for ref, got in zip(reference, replayed):
        assert (got["step"], got["samples_seen"], got["global_batch_size"], got["lr"]) == (
            ref["step"],
            ref["samples_seen"],
            ref["global_batch_size"],
            ref["lr"],
        )
        assert got["loss"] == ref["loss"], f"step {got['step']}"  # the same world size: the same arithmetic


def test_the_report_draws_batch_and_noise_scale(runs):
    from elastune.report import write_report

    whole, _, _ = runs["whole"]
    page = write_report(whole.run_dir).read_text()
    assert "Global batch and the smoothed gradient noise scale" in page and "Batch changes" in page
    assert os.path.getsize(whole.run_dir / "report.html") > 10_000


def test_goodput_chooses_from_the_step_figures_every_rank_agreed_on(runs, stdlib_dataset):
    """3 workers, the goodput rule: each change is the batch goodput_batch picks from the noise
    scale and step figures it recorded; every step read exactly its global batch (the ranks agreed
    on every batch: a rank on another plan would read other samples)."""
    from elastune.train.adaptive import goodput_batch

    _, rows, events = runs["goodput"]
    moved = [e for e in events if e["kind"] == "batch_change"]
    assert moved, "the goodput rule made no change"
    for e in moved:
        assert e["overhead_seconds"] is not None and e["micro_batch_seconds"] > 0
        want = goodput_batch(e["b_simple"], 12, 2, 3, 12, GOODPUT["max"], e["overhead_seconds"], e["micro_batch_seconds"])
        assert e["global_batch_size"] == want
        assert e["lr_factor"] == pytest.approx((want / 12) ** 0.5, rel=1e-12)
    assert {r["world_size"] for r in rows} == {3}
    assert_read_once(rows, stdlib_dataset, 5)  # each step's tally is the sampler's for its own batch
