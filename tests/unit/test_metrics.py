"""The metric catalogue and the rules that turn a run's rows and events into metric values."""

from __future__ import annotations

import ast
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from elastune.events import Row
from elastune.metrics.catalogue import BY_NAME, CATALOGUE, series_names
from elastune.metrics.exporter import RunMetrics
from tests.helpers import ev

ROOT = Path(__file__).resolve().parents[2]


def scrape(metrics: RunMetrics) -> dict[tuple[str, tuple], float]:
    text = generate_latest(metrics.registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("job", "run"))))] = s.value
    return out


def row(step, world, **kw):
    counts = [2] * world
    fields = dict(
        time=float(step),
        step=step,
        samples_seen=12 * step,
        loss=3.0 - step / 10,
        lr=0.01,
        grad_norm=1.5,
        world_size=world,
        global_batch_size=12,
        micro_batches=tuple(counts),
        step_seconds=0.2,
        samples_per_s=60.0,
        snapshot_stall_seconds=0.001,
    )
    return Row(**{**fields, **kw})


def test_names_follow_prometheus_conventions():
    assert len(BY_NAME) == len(CATALOGUE)
    for m in CATALOGUE:
        assert m.name.startswith("elastune_") and m.name == m.name.lower(), m.name
        assert not m.name.endswith("_total"), f"{m.name}: prometheus_client adds _total to counters"
        assert m.kind in ("counter", "gauge", "histogram") and m.help.endswith(".") and m.labels[:2] == ("job", "run")
        if "seconds" in m.name or "duration" in m.name:
            assert m.name.endswith("_seconds") and m.kind in ("histogram", "gauge"), m.name
        if m.kind == "histogram":
            assert m.buckets and list(m.buckets) == sorted(m.buckets)


def test_rows_and_events_become_the_values_they_describe():
    metrics = RunMetrics("j", "r1", tokens_per_sample=16)
    before = scrape(metrics)
    assert before[("elastune_worker_failures_total", ())] == 0 and before[("elastune_lost_steps_total", ())] == 0
    metrics.observe([row(1, 3), row(2, 3)], [])
    metrics.observe(
        [row(3, 2)],
        [
            ev("recovery", time=5.0, mttr_seconds=1.2, detection_seconds=0.3, lost_steps=1, lost_samples=12),
            ev("resize", time=6.0),
            ev("checkpoint", time=7.0, step=3, seconds=0.05, bytes=1000),
            ev("warning", time=8.0, message="not a metric"),
        ],
    )
    got = scrape(metrics)
    assert got[("elastune_steps_total", ())] == 3 and got[("elastune_samples_total", ())] == 36
    assert got[("elastune_tokens_total", ())] == 36 * 16
    assert got[("elastune_step", ())] == 3 and got[("elastune_samples_seen", ())] == 36
    assert got[("elastune_loss", ())] == 2.7 and got[("elastune_world_size", ())] == 2
    # The world shrank to 2: rank 2's micro-batch series is gone, not left at its old value.
    assert got[("elastune_micro_batches", (("rank", "0"),))] == 2 and ("elastune_micro_batches", (("rank", "2"),)) not in got
    assert got[("elastune_step_seconds_count", ())] == 3 and abs(got[("elastune_step_seconds_sum", ())] - 0.6) < 1e-9
    assert got[("elastune_worker_failures_total", ())] == 1 and got[("elastune_resizes_total", ())] == 1
    assert got[("elastune_recovery_seconds_sum", ())] == 1.2 and got[("elastune_failure_detection_seconds_count", ())] == 1
    assert got[("elastune_lost_steps_total", ())] == 1 and got[("elastune_lost_samples_total", ())] == 12
    assert got[("elastune_checkpoint_bytes_total", ())] == 1000 and got[("elastune_checkpoint_last_durable_step", ())] == 3
    assert got[("elastune_checkpoint_last_durable_timestamp_seconds", ())] == 7.0


def test_state_bytes_are_per_worker_and_a_new_group_replaces_the_old_ones():
    metrics = RunMetrics("j", "r1")

    def memory(replica, world, params):
        fields = dict(replica=replica, step=1, world_size=world, layout="fsdp", grad_bytes=params, optimizer_bytes=2 * params)
        return ev("memory", time=1.0, param_bytes=params, **fields)

    metrics.observe([], [memory(r, 3, 100 + r) for r in range(3)])
    got = scrape(metrics)
    assert [got[("elastune_worker_state_bytes", (("rank", str(r)), ("state", "params")))] for r in range(3)] == [100, 101, 102]
    assert got[("elastune_worker_state_bytes", (("rank", "1"), ("state", "optimizer")))] == 202
    metrics.observe([], [memory(0, 2, 150), memory(1, 2, 151)])  # a group of 2 after a restart: rank 2 is gone
    got = scrape(metrics)
    assert {k[1][0][1] for k in got if k[0] == "elastune_worker_state_bytes"} == {"0", "1"}
    assert got[("elastune_worker_state_bytes", (("rank", "1"), ("state", "grads")))] == 151
    assert {name for name, _ in got} <= series_names()  # nothing outside the catalogue


def test_fp16_rows_give_the_loss_scale_and_count_skipped_steps():
    metrics = RunMetrics("j", "r1")
    metrics.observe([row(1, 2, loss_scale=1024.0, grad_norm=None), row(2, 2, loss_scale=512.0, grad_norm=2.0), row(3, 2)], [])
    got = scrape(metrics)
    assert got[("elastune_skipped_steps_total", ())] == 1 and got[("elastune_loss_scale", ())] == 512.0
    assert got[("elastune_grad_norm", ())] == 1.5  # a skipped step's missing norm never replaces a real one


def test_no_metric_is_defined_outside_the_catalogue():
    """prometheus_client's metric classes are constructed in one function (exporter.build), from
    catalogue entries only."""
    constructors = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}
    found = []
    for path in (ROOT / "platform").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in constructors:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found and all(f.startswith("platform/elastune/metrics/exporter.py") for f in found), found
    assert len(found) == 3  # one per kind, inside build()


def test_the_scrape_clock_counts_scrapes_only():
    from elastune.metrics.exporter import ScrapeClock

    metrics = RunMetrics("j", "r")
    clock = ScrapeClock()
    metrics.registry.register(clock)
    assert clock.scrapes == 0  # registering is not a scrape: a run nobody scrapes does not wait at its end
    before = generate_latest(metrics.registry)
    assert clock.scrapes == 1 and generate_latest(metrics.registry) == before  # and it adds no metric


def test_the_held_out_loss_is_a_gauge_only_where_a_run_evaluates():
    metrics = RunMetrics("j", "r1")
    metrics.observe([row(1, 2)], [])
    assert ("elastune_eval_loss", ()) not in scrape(metrics)  # no evaluation: no series
    metrics.observe([row(2, 2, eval_loss=3.25), row(3, 2)], [])
    assert scrape(metrics)[("elastune_eval_loss", ())] == 3.25  # a step without one leaves the last
