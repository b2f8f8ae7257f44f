"""WSD decay branches on Ray Tune (`tune.mode: wsd_branches`): one constant-lr trunk, a decay
branch forked at each budget's fork point from a clone of the trunk's checkpoint; the trunk
joined to a branch is, step for step, the plain WSD run of that budget; the report draws them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from elastune.spec import validate_spec
from elastune.train.run_dir import read_jsonl
from elastune.tune.driver import run_tune
from tests.helpers import report_in_chromium
from tests.ray.jobs import run, spec_for

G = 12


@pytest.fixture(scope="module")
def branches(tmp_path_factory, stdlib_dataset):
    tmp = tmp_path_factory.mktemp("branches")
    raw = spec_for(tmp, stdlib_dataset, "wsdb", 1, 1).to_dict()
    raw["stop"] = {"max_samples": 120}
    raw["schedule"] = {"name": "wsd", "warmup_samples": 24, "decay_fraction": 0.5, "decay_shape": "sqrt"}
    raw["checkpoint"] = {"every_steps": 1000, "keep_last": 1}
    raw["metrics"] = {"enabled": False}
    # One budget (the trunk to its fork at 72 samples, then the branch): the flow with several
    # budgets, the trunk going on beside a branch, is tests/unit/test_tune_branches.py's.
    raw["tune"] = {"mode": "wsd_branches", "budgets": [120]}
    spec = validate_spec(raw)
    outcome = run_tune(spec, os.getcwd(), console=Console(width=200))
    assert outcome.status == "succeeded", outcome.error
    record = json.loads((outcome.tune_dir / "branches.json").read_text())
    alone = {**spec.to_dict(), "name": "wsd-120", "tune": None, "checkpoint": {"path": str(tmp / "alone"), "every_steps": 1000}}
    _, reference, _ = run(validate_spec(alone))
    return record, reference, outcome.tune_dir


def test_the_branch_forks_where_its_decay_starts_from_a_clone_of_the_trunk(branches):
    record, *_ = branches
    assert record["forks"] == [[72, 120]]  # decay from 24 + 0.5 * (120 - 24) = 72
    assert [(t["from_samples"], t["to_samples"]) for t in record["trunk"]] == [(0, 72)]
    assert [(b["fork"], b["budget"]) for b in record["branches"]] == [(72, 120)]
    assert record["samples_trained"] == 120 and record["cost_vs_one_run"] == 1.0


def test_the_trunk_and_a_branch_are_the_wsd_run_of_that_budget(branches):
    record, reference, _ = branches
    rows = [r for t in record["trunk"] for r in read_jsonl(Path(t["run_dir"]) / "metrics.jsonl")]
    branch = next(b for b in record["branches"] if b["budget"] == 120)
    rows += read_jsonl(Path(branch["run_dir"]) / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in reference] == list(range(1, 120 // G + 1))
    for got, want in zip(rows, reference):
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)


def test_the_report_draws_the_budget_table_and_curves(branches, chromium, tmp_path):
    *_, tune_dir = branches
    dom = report_in_chromium(chromium, tune_dir, tmp_path)
    assert dom.count("<svg") == 2 and "budget (samples)" in dom and "1.00x one run of the largest budget" in dom
