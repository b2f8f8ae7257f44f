"""Every metric Elastune emits, in one place: name, type, help, labels (and buckets).

Nothing else defines a metric: the exporter registers exactly these, dashboards/ and the rules
read exactly these names, and tests hold all three to this list. Names follow Prometheus
conventions: an `elastune_` prefix, base units in the name (`_seconds`, `_bytes`), `_total` for
counters (prometheus_client adds the suffix to a counter's base name), histograms for durations.
Labels: `job` (the spec's name) and `run` (its run id) on everything; `rank` where a value is per
worker; `trial` on tuning metrics (a trial is a run of a tuning job).
"""

from __future__ import annotations

from dataclasses import dataclass

RUN = ("job", "run")

# Durations from milliseconds (a step of a small model, a snapshot stall) to minutes (a restart
# waiting out a placement timeout, a large durable write).
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass(frozen=True)
class Metric:
    name: str  # as scraped, without the _total/_bucket/_sum/_count suffixes prometheus_client adds
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = RUN
    buckets: tuple[float, ...] | None = None

    @property
    def series(self) -> tuple[str, ...]:
        """The names a scrape shows for it."""
        if self.kind == "counter":
            return (f"{self.name}_total", f"{self.name}_created")
        if self.kind == "histogram":
            return tuple(f"{self.name}{s}" for s in ("_bucket", "_sum", "_count", "_created"))
        return (self.name,)


CATALOGUE: tuple[Metric, ...] = (
    # Training
    Metric("elastune_steps", "counter", "Optimizer steps completed."),
    Metric("elastune_samples", "counter", "Training samples processed (global batch per step)."),
    Metric(
        "elastune_step",
        "gauge",
        "Optimizer step of the last step, counted from the start of training (a resumed run goes on from its checkpoint's).",
    ),
    Metric(
        "elastune_samples_seen", "gauge", "Samples trained from the start of training, across resumes (the schedule's clock)."
    ),
    Metric(
        "elastune_tokens",
        "counter",
        "Training tokens processed (samples times predicted tokens per sample; token-window data only).",
    ),
    Metric("elastune_loss", "gauge", "Mean per-sample training loss of the last step."),
    Metric("elastune_eval_loss", "gauge", "Mean per-sample loss over the held-out windows at the last evaluation (`eval:`)."),
    Metric("elastune_learning_rate", "gauge", "Learning rate of the last step."),
    Metric("elastune_global_batch_size", "gauge", "Samples per optimizer step (the same at every world size)."),
    Metric("elastune_micro_batches", "gauge", "Micro-batches the worker at this rank ran in the last step.", (*RUN, "rank")),
    Metric("elastune_world_size", "gauge", "Workers that trained the last step."),
    Metric(
        "elastune_worker_state_bytes",
        "gauge",
        "Training state the worker at this rank holds (state: params, grads or optimizer), as the layout divides it; "
        "taken after the worker's first step in its group.",
        (*RUN, "rank", "state"),
    ),
    Metric("elastune_step_seconds", "histogram", "Wall time of a step on the worker that reported it.", buckets=SECONDS_BUCKETS),
    Metric("elastune_samples_per_second", "gauge", "Throughput of the last step (global batch over its step time)."),
    Metric("elastune_grad_norm", "gauge", "L2 norm of the applied (reduced, pre-clip) gradient of the last step."),
    Metric("elastune_loss_scale", "gauge", "fp16 runs: the dynamic loss scale the last step ran with."),
    Metric(
        "elastune_skipped_steps",
        "counter",
        "fp16 runs: steps whose reduced gradient held an inf or nan, applied on no worker (the scale halves).",
    ),
    Metric(
        "elastune_gradient_noise_scale",
        "gauge",
        "Simple gradient noise scale B_simple = tr(Sigma) / |G|^2 of the last step, estimated from micro-batch and "
        "global-batch gradient norms (McCandlish et al.).",
    ),
    # Elasticity and faults
    Metric("elastune_worker_failures", "counter", "Failures recovered from (recovery events)."),
    Metric("elastune_resizes", "counter", "World-size changes without a failure (resize events)."),
    Metric(
        "elastune_recovery_seconds",
        "histogram",
        "Time to recover (MTTR): failure to the first step completed after it.",
        buckets=SECONDS_BUCKETS,
    ),
    Metric(
        "elastune_failure_detection_seconds", "histogram", "Failure to its detection by the workers.", buckets=SECONDS_BUCKETS
    ),
    Metric("elastune_lost_steps", "counter", "Completed steps lost to failures (run again after a restart)."),
    Metric("elastune_lost_samples", "counter", "Samples of the lost steps."),
    # Checkpoints
    Metric(
        "elastune_snapshot_stall_seconds",
        "histogram",
        "Time a step waited to hand its in-memory snapshot over (the snapshot's one writer, else rank 0).",
        buckets=SECONDS_BUCKETS,
    ),
    Metric(
        "elastune_checkpoint_persist_seconds",
        "histogram",
        "Time to write and commit a durable checkpoint.",
        buckets=SECONDS_BUCKETS,
    ),
    Metric("elastune_checkpoint_bytes", "counter", "Bytes written to durable checkpoints."),
    Metric("elastune_checkpoints", "counter", "Durable checkpoints committed."),
    Metric("elastune_checkpoint_last_durable_step", "gauge", "Step of the newest committed durable checkpoint."),
    Metric(
        "elastune_checkpoint_last_durable_timestamp_seconds",
        "gauge",
        "Unix time the newest durable checkpoint was committed (its age: time() minus this).",
    ),
    # Tuning (population-based search): a trial is one run of the tuning job
    Metric("elastune_trial_loss", "gauge", "Last reported training loss of a tuning trial.", (*RUN, "trial")),
    Metric("elastune_trial_learning_rate", "gauge", "Learning rate a tuning trial trains at now.", (*RUN, "trial")),
    Metric(
        "elastune_exploits", "counter", "Times a tuning trial took over a better trial's state (PBT exploit).", (*RUN, "trial")
    ),
    Metric("elastune_population_size", "gauge", "Trials in the tuning population."),
)

BY_NAME = {m.name: m for m in CATALOGUE}


def series_names() -> set[str]:
    """Every name a scrape of the exporter may show."""
    return {s for m in CATALOGUE for s in m.series}
