"""Population-based search (`elastune tune`) on Ray Tune: a crippled member (a huge peak lr) is
exploited after the first interval, the recipient continues from the donor's exact state (same
state hash, same next-step loss), Tune holds only pointers to the checkpoints, the best member's
schedule, written as a job spec, replays from scratch step for step, and the search's report
draws its lineage in headless Chromium. A real Prometheus scrapes the search's exporter: every
query of the Tuning dashboard returns series, with the exploit counted for its recipient."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

import elastune.tune.search as search_module
from elastune.spec import validate_spec
from elastune.train.run_dir import read_jsonl
from elastune.tune.driver import run_tune
from elastune.tune.lineage import read_lineage, stitched
from elastune.tune.population import base_values
from tests.helpers import dashboard_queries, report_in_chromium
from tests.ray.conftest import prometheus_scraping
from tests.ray.jobs import run, spec_for

G, INTERVAL, BUDGET = 12, 60, 120  # two intervals of 5 steps
GOOD_LR, CRIPPLED_LR = 0.01, 50.0


@pytest.fixture(scope="module")
def search(tmp_path_factory, stdlib_dataset):
    """The search, scraped by a real Prometheus; yields (outcome, lineage, query or skip reason, (start, end) times)."""
    tmp = tmp_path_factory.mktemp("tune")
    raw = spec_for(tmp, stdlib_dataset, "pbt", 1, 1).to_dict()
    raw["stop"] = {"max_samples": BUDGET}
    raw["schedule"].pop("horizon_samples")
    raw["checkpoint"] = {"every_steps": 1000, "keep_last": 1}
    raw["tune"] = {
        "population": 2,
        "quantile": 0.5,
        "interval_samples": INTERVAL,
        "fitness": "eval_loss",  # ranked by held-out loss at each interval's end (the job's eval: 24 windows)
        "resample_probability": 0.0,
        "search": {"optimizer.lr": {"scale": "log", "low": 0.001, "high": 0.1}},
    }
    spec = validate_spec(raw)
    start = [base_values(spec) | {"optimizer.lr": GOOD_LR}, base_values(spec) | {"optimizer.lr": CRIPPLED_LR}]
    with prometheus_scraping(tmp / "runs" / "prometheus-targets", tmp) as query, pytest.MonkeyPatch.context() as mp:
        mp.setattr(search_module, "initial_values", lambda spec, rng: start)  # the population's starting values, not random draws
        began = time.time()
        outcome = run_tune(spec, os.getcwd(), console=Console(width=200))
        assert outcome.status == "succeeded", outcome.error
        yield outcome, read_lineage(outcome.tune_dir), query, (began, time.time())


def segment_rows(lineage, member, generation):
    seg = next(s for s in lineage["segments"] if (s["member"], s["generation"]) == (member, generation))
    return read_jsonl(Path(seg["run_dir"]) / "metrics.jsonl"), read_jsonl(Path(seg["run_dir"]) / "events.jsonl")


def test_the_crippled_member_is_exploited(search):
    _, lineage, *_ = search
    assert [(e["recipient"], e["donor"], e["generation"], e["samples"]) for e in lineage["exploits"]] == [
        ("m1", "m0", 0, INTERVAL)
    ]
    assert lineage["boundaries"] == [INTERVAL, BUDGET]
    exploit = lineage["exploits"][0]
    assert exploit["recipient_fitness"] > 2 * exploit["donor_fitness"]  # the huge lr really crippled it


def test_fitness_is_the_held_out_loss_where_each_interval_ends(search, stdlib_dataset):
    """Each segment's fitness against the mean per-window loss of the 24 held-out windows, taken
    here in one batch from the tensors of the checkpoint the segment ended with."""
    import math

    import numpy as np
    import torch

    from elastune.checkpoint.checkpointer import Checkpointer
    from elastune.data.dataset import TokenWindows
    from elastune.recipes import load_recipe

    outcome, lineage, *_ = search
    spec = validate_spec(yaml.safe_load((outcome.tune_dir / "best.yaml").read_text()))
    recipe = load_recipe(spec.model, os.getcwd(), spec.data.path)
    windows = TokenWindows(stdlib_dataset, "eval").take(np.arange(24))
    checked = set()
    for segment in lineage["segments"]:
        pointer = segment["checkpoint"]
        ckpt = Checkpointer(pointer["uri"])
        if pointer["step"] not in ckpt.committed_steps():  # retention (keep_last: 1) has removed it since
            continue
        checked.add((segment["member"], segment["generation"]))
        manifest = ckpt.read_manifest(pointer["step"])
        assert manifest.samples_seen == segment["to_samples"]
        model = recipe.build_model()
        tensors = ckpt.load(manifest, [n for n in manifest.tensors if n.startswith("model/")])
        loaded = model.load_state_dict({n.removeprefix("model/"): t for n, t in tensors.items()}, strict=False)
        assert not loaded.unexpected_keys and loaded.missing_keys == ["head.weight"]  # tied to the embedding
        model.eval()
        with torch.no_grad():
            want = recipe.sample_losses(model, windows).double().mean().item()
        want = want if math.isfinite(want) else math.inf
        assert segment["fitness"] == pytest.approx(want, rel=1e-5), segment["member"]
        assert segment["eval_loss"] == segment["fitness"] or not math.isfinite(want)
    assert {("m0", 1), ("m1", 1)} <= checked  # both members' last intervals at least


def test_the_recipient_continues_from_the_donors_exact_state(search):
    _, lineage, *_ = search
    exploit = lineage["exploits"][0]
    # Content hashes read the bytes through each checkpoint's own fragments (test_tune_population
    # shows one tells a clone that points at the wrong bytes).
    assert exploit["recipient_checkpoint"]["content_hash"] == exploit["donor_checkpoint"]["content_hash"]
    assert (
        exploit["donor_checkpoint"]["content_hash"]
        == next(s for s in lineage["segments"] if s["member"] == "m0")["checkpoint"]["content_hash"]
    )
    donor, _ = segment_rows(lineage, "m0", 1)
    recipient, events = segment_rows(lineage, "m1", 1)
    start = next(e for e in events if e["kind"] == "start")
    assert (start["resumed_from_step"], start["resumed_samples_seen"]) == (INTERVAL // G, INTERVAL)
    assert recipient[0]["step"] == donor[0]["step"] == INTERVAL // G + 1
    assert recipient[0]["loss"] == pytest.approx(donor[0]["loss"], rel=1e-6)  # same params, same samples, same randomness
    # Explore moved the recipient's peak lr a step away from the donor's (perturbed, not resampled).
    assert exploit["values"]["optimizer.lr"] in (pytest.approx(GOOD_LR * 0.8), pytest.approx(GOOD_LR * 1.2))
    assert recipient[0]["lr"] != pytest.approx(donor[0]["lr"])


def test_tune_holds_pointers_not_tensors(search):
    outcome, *_ = search
    tune_storage = outcome.tune_dir / "ray"
    pointers = list(tune_storage.rglob("elastune-checkpoint.json"))
    assert len(pointers) == 4  # one per member per interval
    assert not list(tune_storage.rglob("*.safetensors"))


def test_the_best_schedule_replays_exactly(search):
    outcome, lineage, *_ = search
    best = lineage["best"]
    replay = validate_spec(yaml.safe_load((outcome.tune_dir / "best.yaml").read_text()))
    _, rows, _ = run(replay)
    want = stitched(lineage, best["member"])  # typed rows (events.Row)
    assert [r["step"] for r in rows] == [r.step for r in want] == list(range(1, BUDGET // G + 1))
    for got, ref in zip(rows, want):
        assert got["lr"] == pytest.approx(ref.lr, rel=1e-12)
        assert got["loss"] == pytest.approx(ref.loss, rel=1e-6)


def test_the_search_report_draws_the_lineage(search, chromium, tmp_path):
    outcome, *_ = search
    dom = report_in_chromium(chromium, outcome.tune_dir, tmp_path)
    assert dom.count("<svg") == 3  # lineage tree, stitched loss, stitched lr
    assert "m0 -&gt; m1" in dom and "optimizer.lr 0.01 -&gt;" in dom and "elastune run best.yaml" in dom


def test_every_tuning_panel_query_returns_series(search):
    _, _, query, (began, ended) = search
    if isinstance(query, str):
        pytest.skip(query)
    over = lambda expr: query("/api/v1/query_range", query=expr, start=began, end=ended + 5, step=1)["result"]  # noqa: E731
    empty = [(title, expr) for title, expr in dashboard_queries("tuning") if not over(expr)]
    assert not empty, f"panels without data: {empty}"
    exploits = {r["metric"]["trial"]: float(r["values"][-1][1]) for r in over("elastune_exploits_total")}
    assert exploits == {"m0": 0.0, "m1": 1.0}
    assert {float(r["values"][-1][1]) for r in over("elastune_population_size")} == {2.0}
    assert {r["metric"]["trial"] for r in over("elastune_trial_loss")} == {"m0", "m1"}
