"""An ElastuneJob's status as a pure function of what the operator observes: its RayJob's
status (KubeRay's jobDeploymentStatus and jobStatus) and the run's metrics (the exporter the
job serves on its head). Progress survives a scrape that fails: the last values stay."""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

CONDITIONS = ("Running", "Suspended", "Succeeded", "Failed")
# The status fields progress_of reads from the run's metrics (kept when a scrape fails).
PROGRESS = ("step", "samples", "worldSize", "loss", "evalLoss", "lastDurableCheckpoint", "failuresSurvived", "resizes")


def phase_of(rayjob_status: Mapping[str, Any] | None, suspend: bool) -> tuple[str, str]:
    """(phase, reason) from a RayJob's status; `suspend` is what the ElastuneJob asks."""
    if not rayjob_status:
        return ("Suspended" if suspend else "Pending"), "RayJobCreated"
    deployment = rayjob_status.get("jobDeploymentStatus", "")
    job = rayjob_status.get("jobStatus", "")
    if deployment in ("Suspending", "Suspended"):
        return "Suspended", deployment
    if job == "SUCCEEDED" or (deployment == "Complete" and job not in ("FAILED", "STOPPED")):
        return "Succeeded", job or deployment
    if job == "FAILED" or deployment in ("Failed", "ValidationFailed"):
        return "Failed", job or deployment
    if job == "STOPPED":
        return "Stopped", job
    if deployment == "Running" and job == "RUNNING":
        return "Running", job
    return "Starting", deployment or "Initializing"


def progress_of(metrics_text: str) -> dict[str, Any]:
    """The run's progress from its exporter's /metrics (docs/observability.md's catalogue)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name.startswith("elastune_") and "rank" not in sample.labels:
                values[sample.name] = sample.value
    out: dict[str, Any] = {}
    for field, metric in (
        ("step", "elastune_step"),
        ("samples", "elastune_samples_seen"),
        ("worldSize", "elastune_world_size"),
        ("failuresSurvived", "elastune_worker_failures_total"),
        ("resizes", "elastune_resizes_total"),
    ):
        if metric in values:
            out[field] = int(values[metric])
    for field, metric in (("loss", "elastune_loss"), ("evalLoss", "elastune_eval_loss")):
        if math.isfinite(values.get(metric, math.nan)):  # NaN until the first step or evaluation; JSON holds no NaN
            out[field] = values[metric]
    step, stamp = (
        values.get("elastune_checkpoint_last_durable_step"),
        values.get("elastune_checkpoint_last_durable_timestamp_seconds"),
    )
    if step is not None and step >= 0 and stamp:
        out["lastDurableCheckpoint"] = {"step": int(step), "time": rfc3339(stamp)}
    return out


def rfc3339(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def next_status(
    previous: Mapping[str, Any] | None,
    rayjob: Mapping[str, Any] | None,
    suspend: bool,
    progress: Mapping[str, Any] | None,
    generation: int | None,
    now: str,
) -> dict[str, Any]:
    """The status to write: phase and conditions from the RayJob, progress from the metrics
    (kept from `previous` when there are none), transition times kept while a condition holds."""
    previous = previous or {}
    rj_status = (rayjob or {}).get("status") or {}
    phase, reason = phase_of(rj_status, suspend)
    out: dict[str, Any] = {"phase": phase, "message": rj_status.get("message", "")}
    if rayjob:
        out["rayJob"] = rayjob["metadata"]["name"]
    for field, key in (("rayCluster", "rayClusterName"), ("dashboardURL", "dashboardURL")):
        if rj_status.get(key):
            out[field] = rj_status[key]
    for field in PROGRESS:
        value = (progress or {}).get(field, previous.get(field))
        if value is not None:
            out[field] = value
    if generation is not None:
        out["observedGeneration"] = generation
    out["conditions"] = conditions(previous.get("conditions") or [], phase, reason, out["message"], now)
    return out


def conditions(previous: list[Mapping[str, Any]], phase: str, reason: str, message: str, now: str) -> list[dict[str, Any]]:
    before = {c["type"]: c for c in previous}
    out = []
    for kind in CONDITIONS:
        status = "True" if phase == kind else "False"
        old = before.get(kind)
        since = old["lastTransitionTime"] if old and old.get("status") == status else now
        out.append(
            {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message if status == "True" else "",
                "lastTransitionTime": since,
            }
        )
    return out


def invalid_status(message: str, generation: int | None, previous: Mapping[str, Any] | None, now: str) -> dict[str, Any]:
    """A spec the operator refuses: nothing runs, the message says what to fix."""
    out: dict[str, Any] = {"phase": "Invalid", "message": message}
    if generation is not None:
        out["observedGeneration"] = generation
    out["conditions"] = conditions((previous or {}).get("conditions") or [], "Invalid", "InvalidSpec", message, now)
    return out
