"""`runs ls`'s account of run directories, and the report of one, from the files a run writes."""

from __future__ import annotations

import json

import pytest
import yaml

from elastune.errors import ElastuneError
from elastune.report import render, write_report
from elastune.train.run_dir import list_runs


def make_run(root, job, run, steps, status=None, events=()):
    """A run directory as version 1 wrote it (no format.json; events with fewer fields): the
    format stays readable."""
    d = root / job / run
    d.mkdir(parents=True)
    (d / "spec.yaml").write_text(yaml.safe_dump({"name": job}))
    write_lines(d / "events.jsonl", [{"time": 100.0 + len(run), "kind": "start", "world_size": 2}, *events])
    write_lines(
        d / "metrics.jsonl",
        [
            {
                "time": 101.0 + s,
                "step": s,
                "samples_seen": 8 * s,
                "loss": 5.0 - s / 10,
                "lr": 0.01 * s,
                "world_size": 2,
                "global_batch_size": 8,
                "micro_batches": [1, 1],
                "step_seconds": 0.1,
                "samples_per_s": 80.0,
                "snapshot_stall_seconds": 0.001,
            }
            for s in range(1, steps + 1)
        ],
    )
    if status:
        (d / "result.json").write_text(json.dumps({"status": status}))
    return d


def write_lines(path, objects):
    path.write_text("".join(json.dumps(o) + "\n" for o in objects))


def test_runs_ls_tells_finished_failed_and_unfinished_runs_apart(tmp_path):
    recovery = {
        "time": 103.5,
        "kind": "recovery",
        "cause": "fault: kill rank 1 at step 3 (mid)",
        "step": 2,
        "world_size_before": 2,
        "world_size_after": 2,
        "lost_steps": 0,
        "mttr_seconds": 12.5,
        "failed_at": 103.0,
    }
    make_run(tmp_path, "a", "r-1", 5, "succeeded", [recovery])
    make_run(tmp_path, "a", "r-22", 2, "failed")
    make_run(tmp_path, "b", "r-333", 3)
    (tmp_path / "prometheus-targets").mkdir()  # not a run
    runs = list_runs(tmp_path)
    assert [(r["job"], r["status"], r["steps"], r["failures"]) for r in runs] == [
        ("a", "succeeded", 5, 1),
        ("a", "failed", 2, 0),
        ("b", "unfinished", 3, 0),
    ]
    assert runs[0]["final_loss"] == pytest.approx(4.5)


def test_the_report_is_one_self_contained_page(tmp_path):
    recovery = {
        "time": 103.5,
        "kind": "recovery",
        "cause": "fault: kill <rank> 1",
        "step": 2,
        "world_size_before": 2,
        "world_size_after": 1,
        "lost_steps": 0,
        "mttr_seconds": 12.5,
        "failed_at": 103.0,
    }
    run = make_run(
        tmp_path,
        "a",
        "r-1",
        6,
        "succeeded",
        [recovery, {"time": 104.0, "kind": "checkpoint", "step": 5, "seconds": 0.2, "bytes": 10}],
    )
    page = render(run)
    assert page.count("<svg") == 4 and "<script" not in page and "<?xml" not in page
    assert "fault: kill &lt;rank&gt; 1" in page and "12.50" in page  # text is escaped
    assert write_report(run) == run / "report.html"
    with pytest.raises(ElastuneError, match="not a run directory"):
        write_report(tmp_path)


def test_runs_ls_and_the_report_show_the_last_held_out_loss(tmp_path):
    from elastune.events import Row
    from elastune.train.run_dir import RunDir, summarize

    run = RunDir.create(str(tmp_path), "a", "r-1")
    run.write_spec({"name": "a"})
    rows = [
        Row(
            time=100.0 + s,
            step=s,
            samples_seen=8 * s,
            loss=5.0 - s / 10,
            lr=0.01,
            world_size=2,
            global_batch_size=8,
            micro_batches=(1, 1),
            step_seconds=0.1,
            eval_loss={1: 5.5, 3: 5.25}.get(s),
        )
        for s in range(1, 5)
    ]
    run.append_metrics(rows)
    assert summarize(run.path)["eval_loss"] == 5.25
    page = render(run.path)
    assert "held-out loss" in page and "5.2500" in page
