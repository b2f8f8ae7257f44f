"""Population-based search (`elastune tune`) on Ray Tune, each member one run that stays up, and
a search that survives its driver: the search starts in a process of its own, which is SIGKILLed
with its embedded Ray as soon as the first interval has closed, and `elastune tune` run again
resumes it. A crippled member (a huge peak lr) is exploited at the first boundary; each recipient
continues from its donor's exact state (same state hash, same next-step loss as the donor's own
next step), the second boundary's exploit loaded in place from the donor's memory; the resumed
search decides as an uninterrupted population fed the same fitness; Tune holds only pointers to
the checkpoints; the best member's schedule, written as a job spec, replays from scratch step for
step across the driver's death; and the search's report draws its lineage in headless Chromium.
The job's batch is adaptive (batch.adaptive, its fraction searched too): each member's batch
moves at boundaries only, to batches that divide them; a recipient takes its donor's batch history
with its state, and best.yaml holds the best lineage's batch changes.
A real Prometheus scrapes the resumed search's exporter: every query of the Tuning dashboard
returns series, with the exploits counted for their recipients."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
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

G, INTERVAL, BUDGET = 12, 60, 180  # three intervals, the first of 5 steps
# Members start at the job's fraction (tests/ray/tune_cli.py fixes their first values): 30 x B_simple
# (about 1 to 2 this early in this model) moves the batch to 20 (the most, and a divisor of 60) at
# the second boundary (every_samples 120: the first two intervals keep 5 steps, which the kill's
# timing needs); the fraction is searched too (explored at the exploits).
ADAPTIVE = {"max": 20, "fraction": 30.0, "every_samples": 120, "smoothing_samples": 36}
GOOD_LR, CRIPPLED_LR = 0.01, 50.0


@pytest.fixture(scope="module")
def search(tmp_path_factory, stdlib_dataset):
    """The search, killed after its first interval and resumed here, the resumed one scraped by a
    real Prometheus; yields (outcome, lineage, query or skip reason, (start, end) times of the
    resumed search, what it printed, the job spec)."""
    tmp = tmp_path_factory.mktemp("tune")
    raw = spec_for(tmp, stdlib_dataset, "pbt", 1, 1).to_dict()
    raw["stop"] = {"max_samples": BUDGET}
    raw["schedule"].pop("horizon_samples")
    raw["checkpoint"] = {"every_steps": 1000, "keep_last": 1}
    raw["batch"]["adaptive"] = ADAPTIVE
    raw["tune"] = {
        "population": 2,
        "quantile": 0.5,
        "interval_samples": INTERVAL,
        "fitness": "eval_loss",  # ranked by held-out loss at each interval's end (the job's eval: 24 windows)
        "resample_probability": 0.0,
        "search": {
            "optimizer.lr": {"scale": "log", "low": 0.001, "high": 0.1},
            "batch.adaptive.fraction": {"scale": "log", "low": 10.0, "high": 60.0},
        },
    }
    spec_file = tmp / "pbt.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "tests.ray.tune_cli", str(spec_file), str(GOOD_LR), str(CRIPPLED_LR)]
    with prometheus_scraping(tmp / "runs" / "prometheus-targets", tmp) as query:
        with (tmp / "killed.log").open("w") as log:
            first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                lineage_file = _await(lambda: next((tmp / "runs" / "pbt").glob("tune-*/lineage.json"), None), first)
                # The first interval closed, and its rows are in the members' run directories (the
                # driver writes what the sink holds every 0.25 s: a driver killed sooner loses them).
                _await(lambda: "closes" in read_lineage(lineage_file.parent) and _rows_through(tmp, INTERVAL), first)
            finally:
                for pid in [first.pid, *descendants(first.pid)]:  # the driver and the embedded Ray it started
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                first.wait()
        killed = read_lineage(lineage_file.parent)
        assert not (lineage_file.parent / "result.json").exists() and len(killed["closes"]) == 1, killed
        began = time.time()
        console = Console(width=200, record=True)
        outcome = run_tune(validate_spec(yaml.safe_load(spec_file.read_text())), os.getcwd(), console=console)
        assert outcome.status == "succeeded", outcome.error
        yield outcome, read_lineage(outcome.tune_dir), query, (began, time.time()), console.export_text(), raw


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc: Ray's daemons leave the driver's process group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _rows_through(tmp: Path, samples: int) -> bool:
    runs = list((tmp / "runs" / "pbt").glob("tune-*/runs/pbt-m*/*/metrics.jsonl"))
    return len(runs) == 2 and all(any(r["samples_seen"] == samples for r in read_jsonl(f)) for f in runs)


def _await(found, process: subprocess.Popen, timeout: float = 300):
    """Poll `found()` until it is truthy (the search writes its lineage as it goes), while `process` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):  # lineage.json is replaced whole; a read may race its first write
            if value := found():
                return value
        assert process.poll() is None, "the search ended before it was killed"
        time.sleep(0.02)
    raise AssertionError(f"not seen within {timeout} s")


def segment_rows(lineage, member, generation):
    """The member's own metrics rows of one interval (its run directories, that interval's samples)."""
    seg = next(s for s in lineage["segments"] if (s["member"], s["generation"]) == (member, generation))
    rows = [r for d in seg["run_dirs"] for r in read_jsonl(Path(d) / "metrics.jsonl")]
    return [r for r in rows if seg["from_samples"] < r["samples_seen"] <= seg["to_samples"]]


def test_the_crippled_member_is_exploited(search):
    _, lineage, *_ = search
    first, second = lineage["exploits"]
    assert (first["recipient"], first["donor"], first["generation"], first["samples"]) == ("m1", "m0", 0, INTERVAL)
    assert second["samples"] == 2 * INTERVAL  # a population of 2 at quantile 0.5: the worse takes the better's state
    assert lineage["boundaries"] == [INTERVAL, 2 * INTERVAL, BUDGET]
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
        if pointer is None:  # a recipient's state at the boundary: replaced by the donor's before it was made durable
            continue
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
    assert {("m0", 2), ("m1", 2)} <= checked  # both members' last intervals at least


def test_the_recipient_continues_from_the_donors_exact_state(search):
    """At each exploit the recipient's next step has the donor's next step's loss (same parameters,
    samples and randomness) at its own lr; the first boundary's recipient loaded the donor's state
    from memory or (restarted by the resumed search) from the clone in its root, the second's,
    inside the resumed search, from the donor's memory (tier 0)."""
    _, lineage, *_ = search
    for exploit in lineage["exploits"]:
        # Content hashes read the bytes through each checkpoint's own fragments (test_tune_population
        # shows one tells a clone that points at the wrong bytes).
        assert exploit["recipient_checkpoint"]["content_hash"] == exploit["donor_checkpoint"]["content_hash"]
        generation, samples = exploit["generation"], exploit["samples"]
        ended = next(s for s in lineage["segments"] if (s["member"], s["generation"]) == (exploit["donor"], generation))
        assert exploit["donor_checkpoint"]["content_hash"] == ended["checkpoint"]["content_hash"]
        donor = segment_rows(lineage, exploit["donor"], generation + 1)
        recipient = segment_rows(lineage, exploit["recipient"], generation + 1)
        assert recipient[0]["step"] == donor[0]["step"] and donor[0]["samples_seen"] - donor[0]["global_batch_size"] == samples
        assert recipient[0]["global_batch_size"] == donor[0]["global_batch_size"]  # the donor's batch history came along
        assert recipient[0]["loss"] == pytest.approx(donor[0]["loss"], rel=1e-6)  # same params, same samples, same randomness
        assert recipient[0]["lr"] != pytest.approx(donor[0]["lr"])
        run_dirs = next(
            s for s in lineage["segments"] if (s["member"], s["generation"]) == (exploit["recipient"], generation + 1)
        )["run_dirs"]
        met = [
            e
            for d in run_dirs
            for e in read_jsonl(Path(d) / "events.jsonl")
            if e["kind"] == "boundary" and e["samples_seen"] == samples
        ]
        assert met and all(e["donor"] == exploit["donor"] for e in met)
        assert met[-1]["tier"] == (0 if generation else met[-1]["tier"]) and met[-1]["tier"] in (0, 1)
    # Explore moved the first recipient's peak lr a step away from the donor's (perturbed, not resampled).
    assert lineage["exploits"][0]["values"]["optimizer.lr"] in (pytest.approx(GOOD_LR * 0.8), pytest.approx(GOOD_LR * 1.2))


def test_the_resumed_search_decides_as_an_uninterrupted_population(search, tmp_path):
    """The reference: a population that never stopped (same seed, same starting values), told
    each interval's fitness as the search recorded it. Its exploits (who, whom, the explored
    values: the random state the resumed search restored) and best member are the search's."""
    from elastune.tune.search import Population, SearchPlan

    outcome, lineage, _, _, printed, raw = search
    assert f"Resuming the unfinished search {outcome.tune_dir}" in printed.replace("\n", "")
    spec = validate_spec(raw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            search_module,
            "initial_values",
            lambda spec, rng: [base_values(spec) | {"optimizer.lr": lr} for lr in (GOOD_LR, CRIPPLED_LR)],
        )
        reference = Population(
            SearchPlan(validate_spec(yaml.safe_load((outcome.tune_dir / "spec.yaml").read_text())).to_dict(), str(tmp_path))
        )
    for generation in range(len(lineage["boundaries"])):
        for segment in (s for s in lineage["segments"] if s["generation"] == generation):
            reference.report(segment["member"], {"fitness": segment["fitness"]})
        for exploit in reference.close():
            reference.exploited(exploit, {}, {}, 0.0)

    def decisions(record):
        return [(e["recipient"], e["donor"], e["generation"], e["samples"], e["values"]) for e in record["exploits"]]

    assert len(lineage["exploits"]) == 2 and decisions(lineage) == decisions(reference.lineage)
    assert [(s["member"], s["values"]) for s in lineage["segments"]] == [
        (s["member"], s["values"]) for s in reference.lineage["segments"]
    ]
    assert (lineage["best"]["member"], lineage["best"]["history"]) == (
        reference.lineage["best"]["member"],
        reference.lineage["best"]["history"],
    )
    assert spec.tune.population == len(lineage["state"]["members"])


def test_members_batches_move_at_boundaries_only(search):
    """Each member's adaptive batch changed only at a boundary, to a batch dividing the interval,
    and the best lineage's changes are best.yaml's batch phases."""
    outcome, lineage, *_ = search
    changes = {
        (e["samples_seen"], e["global_batch_size"])
        for s in lineage["segments"]
        for d in s["run_dirs"]
        for e in read_jsonl(Path(d) / "events.jsonl")
        if e["kind"] == "batch_change"
    }
    assert changes and all(s == 2 * INTERVAL and INTERVAL % g == 0 and g > G for s, g in changes)
    best = yaml.safe_load((outcome.tune_dir / "best.yaml").read_text())
    assert "adaptive" not in best["batch"]
    moved = {(p["from_samples"], p["global_batch_size"]) for p in best["phases"] if "global_batch_size" in p}
    assert moved and moved <= changes


def test_tune_holds_pointers_not_tensors(search):
    outcome, *_ = search
    tune_storage = outcome.tune_dir / "ray"
    pointers = list(tune_storage.rglob("elastune-checkpoint.json"))
    assert len(pointers) == 2  # one per member
    assert not list(tune_storage.rglob("*.safetensors"))


def test_the_best_schedule_replays_exactly(search):
    outcome, lineage, *_ = search
    best = lineage["best"]
    replay = validate_spec(yaml.safe_load((outcome.tune_dir / "best.yaml").read_text()))
    _, rows, _ = run(replay)
    want = stitched(lineage, best["member"])  # typed rows (events.Row)
    assert [r["step"] for r in rows] == [r.step for r in want] == list(range(1, len(want) + 1))
    assert [r["global_batch_size"] for r in rows] == [r.global_batch_size for r in want]
    for got, ref in zip(rows, want):
        assert got["lr"] == pytest.approx(ref.lr, rel=1e-12)
        assert got["loss"] == pytest.approx(ref.loss, rel=1e-6)


def test_the_search_report_draws_the_lineage(search, chromium, tmp_path):
    outcome, *_ = search
    dom = report_in_chromium(chromium, outcome.tune_dir, tmp_path)
    assert dom.count("<svg") == 3  # lineage tree, stitched loss, stitched lr
    assert "m0 -&gt; m1" in dom and "optimizer.lr 0.01 -&gt;" in dom and "elastune run best.yaml" in dom


def test_every_tuning_panel_query_returns_series(search):
    _, lineage, query, (began, ended), *_ = search
    if isinstance(query, str):
        pytest.skip(query)
    over = lambda expr: query("/api/v1/query_range", query=expr, start=began, end=ended + 5, step=1)["result"]  # noqa: E731
    empty = [(title, expr) for title, expr in dashboard_queries("tuning") if not over(expr)]
    assert not empty, f"panels without data: {empty}"
    exploits: dict[str, float] = {}
    for r in over("elastune_exploits_total"):  # the killed search's exporter (same run label) counted less
        exploits[r["metric"]["trial"]] = max(exploits.get(r["metric"]["trial"], 0.0), float(r["values"][-1][1]))
    taken = [e["recipient"] for e in lineage["exploits"]]  # the killed search's count carried into the resumed one's
    assert exploits == {m: float(taken.count(m)) for m in ("m0", "m1")}
    assert {float(r["values"][-1][1]) for r in over("elastune_population_size")} == {2.0}
    assert {r["metric"]["trial"] for r in over("elastune_trial_loss")} == {"m0", "m1"}
