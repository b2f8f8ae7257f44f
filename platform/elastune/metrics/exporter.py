"""The per-job metrics exporter: a Ray actor on the driver's node (the head node, for jobs
submitted to a cluster) serving the catalogue's metrics at http://HOST:PORT/metrics.

Workers never call it. Their metrics rows and events already reach the run sink without blocking
a step (batched, fire and forget); the driver, which drains the sink every poll, hands the same
rows and events to the exporter, and `RunMetrics.observe` turns them into metric values. So the
worker-side cost of metrics is the cost of the rows it sends anyway (tests/bench/bench_metrics.py).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

import ray
from elastune import events as ev
from elastune.metrics.catalogue import CATALOGUE, RUN, Metric
from elastune.metrics.noise import NoiseScale


def build(metric: Metric, registry: CollectorRegistry):
    """The prometheus_client object for a catalogue entry (the only way one is made)."""
    if metric.kind == "counter":
        return Counter(metric.name, metric.help, metric.labels, registry=registry)
    if metric.kind == "gauge":
        return Gauge(metric.name, metric.help, metric.labels, registry=registry)
    assert metric.buckets is not None  # the catalogue gives every histogram its buckets (tests/unit/test_metrics.py)
    return Histogram(metric.name, metric.help, metric.labels, buckets=metric.buckets, registry=registry)


class RunMetrics:
    """One run's metrics: the rules that turn its rows and events into values.

    `tokens_per_sample`: predicted tokens per sample (token-window data), None when unknown.
    """

    def __init__(self, job: str, run: str, tokens_per_sample: int | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        self.m = {metric.name: build(metric, self.registry) for metric in CATALOGUE}
        self.job, self.run = job, run
        self.tokens_per_sample = tokens_per_sample
        self.ranks = 0  # ranks with a micro-batch series, to drop those a smaller world no longer has
        self.noise = NoiseScale()
        self.memory_world = 0  # the world size of the group whose workers' state bytes are shown
        for metric in CATALOGUE:  # counts start at 0 (a run with no failure has 0 failures, not no series)
            if metric.kind != "gauge" and metric.labels == RUN:
                self._(metric.name)

    def _(self, name: str, **labels: str):
        return self.m[name].labels(job=self.job, run=self.run, **labels)

    def observe(self, rows: list[ev.Row], events: list[ev.Event]) -> None:
        for row in rows:
            self._row(row)
        for event in events:
            handler = EXPORTED[type(event)]
            if handler is not None:
                handler(self, event)

    def observe_trial(self, trial: str, rows: list[ev.Row], events: list[ev.Event]) -> None:
        """A tuning trial's rows (its newest loss and learning rate) and its `exploit` events;
        a trial's exploit count exists, at 0, from its first observation."""
        exploits = self._("elastune_exploits", trial=trial)
        for row in rows[-1:]:
            self._("elastune_trial_loss", trial=trial).set(row.loss)
            self._("elastune_trial_learning_rate", trial=trial).set(row.lr)
        exploits.inc(sum(isinstance(e, ev.Exploit) for e in events))

    def _row(self, row: ev.Row) -> None:
        G = row.global_batch_size
        self._("elastune_steps").inc()
        self._("elastune_samples").inc(G)
        if self.tokens_per_sample:
            self._("elastune_tokens").inc(G * self.tokens_per_sample)
        for name, key in (
            ("elastune_step", "step"),
            ("elastune_samples_seen", "samples_seen"),
            ("elastune_loss", "loss"),
            ("elastune_learning_rate", "lr"),
            ("elastune_global_batch_size", "global_batch_size"),
            ("elastune_world_size", "world_size"),
            ("elastune_samples_per_second", "samples_per_s"),
            ("elastune_grad_norm", "grad_norm"),
            ("elastune_loss_scale", "loss_scale"),
            ("elastune_eval_loss", "eval_loss"),
        ):
            if (value := getattr(row, key)) is not None:
                self._(name).set(value)
        if row.loss_scale is not None and row.grad_norm is None:
            self._("elastune_skipped_steps").inc()
        b_simple = self.noise.update(row.noise)
        self._("elastune_gradient_noise_scale").set(math.nan if b_simple is None else b_simple)  # NaN: no estimate yet
        counts = row.micro_batches
        for rank, count in enumerate(counts):
            self._("elastune_micro_batches", rank=str(rank)).set(count)
        for rank in range(len(counts), self.ranks):
            self.m["elastune_micro_batches"].remove(self.job, self.run, str(rank))
        self.ranks = len(counts)
        self._("elastune_step_seconds").observe(row.step_seconds)
        if row.snapshot_stall_seconds is not None:
            self._("elastune_snapshot_stall_seconds").observe(row.snapshot_stall_seconds)

    def _recovery(self, event: ev.Recovery) -> None:
        self._("elastune_worker_failures").inc()
        if event.mttr_seconds is not None:
            self._("elastune_recovery_seconds").observe(event.mttr_seconds)
        if event.detection_seconds is not None:
            self._("elastune_failure_detection_seconds").observe(event.detection_seconds)
        self._("elastune_lost_steps").inc(event.lost_steps)
        self._("elastune_lost_samples").inc(event.lost_samples)

    def _resize(self, event: ev.Resize) -> None:
        self._("elastune_resizes").inc()

    def _memory(self, event: ev.Memory) -> None:
        held = {"params": event.param_bytes, "grads": event.grad_bytes, "optimizer": event.optimizer_bytes}
        if event.world_size != self.memory_world:  # another group: its workers report afresh, the old ones' go
            self.m["elastune_worker_state_bytes"].clear()
            self.memory_world = event.world_size
        for state, value in held.items():
            self._("elastune_worker_state_bytes", rank=str(event.replica), state=state).set(value)

    def _population(self, event: ev.Population) -> None:
        self._("elastune_population_size").set(event.size)

    def _checkpoint(self, event: ev.Checkpoint) -> None:
        self._("elastune_checkpoints").inc()
        self._("elastune_checkpoint_persist_seconds").observe(event.seconds)
        self._("elastune_checkpoint_bytes").inc(event.bytes)
        self._("elastune_checkpoint_last_durable_step").set(event.step)
        self._("elastune_checkpoint_last_durable_timestamp_seconds").set(event.time)


# What each event kind adds to the metrics (None: nothing; rows carry the run's figures, and
# `exploit` counts per trial through observe_trial). tests/unit/test_events.py holds every kind
# in events.KINDS to an entry here, and every handler to the catalogue metrics it sets.
EXPORTED: dict[type[ev.Event], Callable[[RunMetrics, Any], None] | None] = {
    ev.Recovery: RunMetrics._recovery,
    ev.Resize: RunMetrics._resize,
    ev.Population: RunMetrics._population,
    ev.Memory: RunMetrics._memory,
    ev.Checkpoint: RunMetrics._checkpoint,
    **dict.fromkeys(
        (
            ev.Start,
            ev.Join,
            ev.Leave,
            ev.Finish,
            ev.CollectiveFailed,
            ev.Fault,
            ev.FailurePolicy,
            ev.Preemption,
            ev.RunWarning,
            ev.LeaseTakenOver,
        ),
        None,
    ),
    **dict.fromkeys((ev.Fresh, ev.DataPrepared, ev.Resume, ev.End, ev.Exploit, ev.Boundary), None),
    ev.BatchChange: None,  # rows carry the batch (elastune_global_batch_size) and the noise scale
}


class ScrapeClock:
    """Registered with the run's registry, which collects it on every scrape: counts scrapes,
    adds no metric."""

    def __init__(self):
        self.scrapes = 0
        self.changed = threading.Condition()

    def describe(self):  # registering then does not collect (which would count as a scrape)
        return []

    def collect(self):
        with self.changed:
            self.scrapes += 1
            self.changed.notify_all()
        return iter(())


@ray.remote(num_cpus=0)  # one call at a time: rows apply in the order they were sent
class MetricsExporter:
    """Serves one run's metrics over HTTP from a thread of this actor."""

    def __init__(self, job: str, run: str, host: str, port: int, tokens_per_sample: int | None):
        self.metrics = RunMetrics(job, run, tokens_per_sample)
        self.clock = ScrapeClock()
        self.metrics.registry.register(self.clock)
        self.server, self.thread = start_http_server(port, addr=host, registry=self.metrics.registry)
        self.host = host

    def final_scrape(self, timeout_s: float) -> bool:
        """If anything has scraped this run, wait (up to `timeout_s`) until it scrapes once more:
        its last sample of the run then holds the final values. True if it did."""
        with self.clock.changed:
            seen = self.clock.scrapes
            if seen == 0:
                return False
            return self.clock.changed.wait_for(lambda: self.clock.scrapes > seen, timeout=timeout_s)

    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.server.server_port}"

    def observe(self, rows: list[ev.Row], events: list[ev.Event]) -> None:
        self.metrics.observe(rows, events)

    def observe_trial(self, trial: str, rows: list[ev.Row], events: list[ev.Event]) -> None:
        self.metrics.observe_trial(trial, rows, events)

    def shutdown(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def write_file_sd(folder: Path, job: str, run: str, address: str) -> Path:
    """A Prometheus file_sd target file for this run's exporter (`file_sd_configs: [{files:
    [FOLDER/*.json]}]` finds every run's); written atomically, as Prometheus rereads it on change."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{job}-{run}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps([{"targets": [address], "labels": {"elastune_job": job, "elastune_run": run}}], indent=2))
    tmp.replace(path)
    return path


# At the end of a run, how long to wait for a Prometheus that has been scraping it to scrape once
# more (so that its last sample holds the run's final values): covers scrape intervals up to 15 s.
FINAL_SCRAPE_S = 15.0


class RunExporter:
    """The driver's side of a run's exporter: start it on the driver's node, feed it what the
    driver drains from the sink, and at the end wait for a final scrape (if anything scrapes),
    keep the last scrape (run_dir/metrics.prom) and withdraw the file_sd target."""

    def __init__(
        self,
        job: str,
        run: str,
        host: str,
        port: int,
        tokens_per_sample: int | None,
        targets: Path,
        strategy=None,
        name: str | None = None,
    ):
        options = {"scheduling_strategy": strategy} if strategy is not None else {}
        if name is not None:  # others (a search's trials) find it by name
            options["name"] = name
        self.name = name
        actor_class: Any = MetricsExporter  # an actor class (@ray.remote); Ray's stubs type it as the plain class
        self.actor = actor_class.options(**options).remote(job, run, host, port, tokens_per_sample)
        self.address = ray.get(self.actor.address.remote())
        self.target = write_file_sd(targets, job, run, self.address)

    def observe(self, rows: list[ev.Row], events: list[ev.Event]) -> None:
        if rows or events:
            self.actor.observe.remote(rows, events)

    def close(self, out: Path, final_scrape_s: float = FINAL_SCRAPE_S) -> None:
        import urllib.request

        try:
            ray.get(self.actor.observe.remote([], []))  # everything sent before is applied
            ray.get(self.actor.final_scrape.remote(final_scrape_s))
            with urllib.request.urlopen(f"http://{self.address}/metrics", timeout=10) as page:
                out.write_bytes(page.read())
        finally:
            self.target.unlink(missing_ok=True)
            ray.get(self.actor.shutdown.remote())
            ray.kill(self.actor)
