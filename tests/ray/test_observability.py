"""What people look at, against a real run: a real Prometheus (Debian's package) on loopback finds
the run's exporter through the file_sd target the run writes, scrapes it every second and
evaluates dashboards/rules; then every query of every panel of the training, elasticity and
checkpoint dashboards, every template variable and every recording rule returns at least one
series over the run's time range (as a dashboard shows it). At its end the run waits for one
more scrape, so the last samples hold its final values. The run's HTML report renders its plots in headless
Chromium, and `elastune runs ls` lists the run.

The run is conftest's `observed`: 3 workers, restart mode, rank 1 SIGKILLed mid-step 7 (a recovery,
so failure and MTTR panels have data), durable checkpoints every 10 steps. The tuning dashboard reads trial metrics
that only a search emits: tests/ray/test_tune.py proves it the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import dashboard_queries, report_in_chromium

ROOT = Path(__file__).resolve().parents[2]
PROVEN = ("training", "elasticity", "checkpoints")


@pytest.fixture(scope="module")
def scraped(observed):
    query, outcome, rows, events = observed
    if isinstance(query, str):
        pytest.skip(query)
    return query, rows, events, outcome.run_dir


def over_the_run(query, events, expr: str) -> list:
    """`expr` evaluated every second from the run's start to a few seconds after its end."""
    return query("/api/v1/query_range", query=expr, start=events[0]["time"], end=events[-1]["time"] + 5, step=1)["result"]


def test_the_run_had_a_recovery_and_durable_checkpoints(scraped):
    _, rows, events, _ = scraped
    assert [e["kind"] for e in events].count("recovery") == 1 and any(e["kind"] == "checkpoint" for e in events)
    assert len(rows) == 16


@pytest.mark.parametrize("dashboard", PROVEN)
def test_every_panel_query_returns_series(scraped, dashboard):
    query, _, events, _ = scraped
    empty = [(title, expr) for title, expr in dashboard_queries(dashboard) if not over_the_run(query, events, expr)]
    assert not empty, f"panels without data: {empty}"


def test_every_recording_rule_and_template_variable_returns_series(scraped):
    query, _, events, _ = scraped
    rules = yaml.safe_load((ROOT / "dashboards" / "rules" / "elastune.rules.yml").read_text())
    records = [r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r]
    empty = [r for r in records if not over_the_run(query, events, r)]
    assert not empty, f"recording rules without data: {empty}"
    assert query("/api/v1/label/job/values", **{"match[]": "elastune_steps_total"}) == ["killed"]
    runs = query("/api/v1/label/run/values", **{"match[]": 'elastune_steps_total{job=~"killed"}'})
    assert len(runs) == 1


def test_the_report_renders_its_plots_in_headless_chromium(observed, chromium, tmp_path):
    dom = report_in_chromium(chromium, observed[1].run_dir, tmp_path)
    assert dom.count("<svg") == 5 and "fault: kill rank 1 at step 7" in dom  # with the batch and noise scale plot


def test_runs_ls_lists_the_run_with_its_failure(observed):
    _, outcome, rows, _ = observed
    run_dir = outcome.run_dir
    done = subprocess.run(
        [sys.executable, "-m", "elastune", "runs", "ls", "--output-dir", str(run_dir.parent.parent), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    (line,) = [json.loads(x) for x in done.stdout.splitlines()]
    assert (line["job"], line["status"], line["steps"], line["failures"]) == ("killed", "succeeded", 16, 1)
    assert line["final_loss"] == rows[-1]["loss"]


def test_the_final_scrape_holds_the_final_values(scraped):
    query, rows, events, _ = scraped
    (steps,) = over_the_run(query, events, "elastune_steps_total")
    assert float(steps["values"][-1][1]) == len(rows)
    (failures,) = over_the_run(query, events, "elastune_worker_failures_total")
    assert float(failures["values"][-1][1]) == 1
