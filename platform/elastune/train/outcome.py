"""How a run ended (`RunOutcome`, what `elastune run` reports and exits with), decided from the
last row, the checkpoint root and the error, if any."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from elastune.checkpoint.checkpointer import Checkpointer
from elastune.errors import ElastuneError
from elastune.events import Row
from elastune.spec.models import JobSpec
from elastune.train.run_dir import RunDir


@dataclass
class RunOutcome:
    """How a run ended. `status`: succeeded (trained to its stop; the final step durable),
    not_durable (trained to its stop, but the final step could not be made durable: see
    `durable_step` and `error`), complete (its checkpoint already held the whole budget; nothing
    ran), stopped (by `signal`, after making the newest step durable), failed."""

    run_dir: Path | None
    status: str
    steps: int
    samples_seen: int
    final_loss: float | None
    seconds: float
    error: str | None = None
    durable_step: int | None = None  # the newest checkpoint at the run's checkpoint root when it ended
    signal: int | None = None
    uri: str = ""


def conclude(
    spec: JobSpec,
    run_dir: RunDir,
    last: Row | None,
    start: dict[str, int],
    started: float,
    error: BaseException | None,
    gave_up: str | None,
    reports: list[dict[str, Any]],
    signum: int | None,
) -> RunOutcome:
    """The run's outcome, with the newest checkpoint its root holds: a run that trained to its stop
    but could not make its last step durable says so (not_durable), with the write's error.
    `last`: the newest step's row (None: no step completed, and the run is where it `start`ed)."""
    ckpt = Checkpointer(spec.checkpoint_path)
    steps = ckpt.committed_steps()
    durable = steps[-1] if steps else None
    step = last.step if last else start["step"]
    reached = RunOutcome(
        run_dir=run_dir.path,
        status="succeeded",
        steps=step,
        samples_seen=last.samples_seen if last else start["samples_seen"],
        final_loss=last.loss if last else None,
        seconds=round(time.time() - started, 3),
        durable_step=durable,
        uri=ckpt.uri,
    )
    if signum is not None:
        return replace(reached, status="stopped", signal=signum)
    if error is not None:
        return replace(reached, status="failed", error=gave_up or failure_reason(error))
    if durable != step:
        failed = next((r["error"] for r in reversed(reports) if r.get("step") == step and "error" in r), "it was not written")
        return replace(reached, status="not_durable", error=f"the final step {step} is not durable: {failed}")
    return reached


def failure_reason(error: BaseException) -> str:
    """The user-facing cause of a failed fit: our own error's message when a worker raised one.

    Ray Train's WorkerGroupError keeps each rank's exception in `worker_failures`.
    """
    pending: list[BaseException] = [error]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, ElastuneError):
            return exc.message
        pending += [e for e in (exc.__cause__, exc.__context__) if e is not None]
        pending += list(getattr(exc, "worker_failures", {}).values())
    return f"{type(error).__name__}: {error}"
