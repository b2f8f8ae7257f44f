"""SIGINT and SIGTERM while a run trains (Ctrl-C; `elastune stop`, Ray's job stop and a pod's
termination send SIGTERM): the first asks the run to stop the way a preemption notice does (the
driver makes the newest complete in-memory step durable, writes every row up to it, ends the
workers and says where the run stands); a second ends the process at once, quietly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from types import FrameType
from typing import Any

import ray
from elastune.checkpoint.checkpointer import Checkpointer
from elastune.train.progress import ProgressView

SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_GRACE_S = 25.0  # how long a stop waits for the newest step to become durable (a pod gets 30 s by default)


def exit_code(signum: int) -> int:
    """What a process ended by `signum` exits with, as shells report it: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signum


class StopRequest:
    """While entered (on the main thread only: Python delivers signals there), the first SIGINT
    or SIGTERM sets `signum`; a second one exits the process at once with its exit code."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}  # what signal.signal returned: a handler, SIG_DFL/SIG_IGN or None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)  # replaces Ray's own (it dumps a stack trace)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            os._exit(exit_code(signum))
        self.signum = signum


def begin_stop(stop: StopRequest, service, sink, view: ProgressView, ckpt: Checkpointer) -> dict[str, Any]:
    """A stop signal: the service takes no more snapshots and makes the newest complete one
    durable; then Ray Train's run is ended. Rows are kept up to that step (the newest durable one
    when there is no snapshot), the step a rerun resumes from."""
    step = ray.get(service.freeze.remote())
    if step is None:
        steps = ckpt.committed_steps()
        step = steps[-1] if steps else 0
    view.say(f"{stop.name}: stopping; the run resumes from step {step} (again to end at once).")
    controller = ray.get(sink.controller.remote())
    if controller is not None:
        controller.abort.remote()  # the workers stop while the step is written; abort_controller waits for it
    return {"keep_rows_to": step}


def abort_controller(sink, thread: threading.Thread, grace_s: float = 3.0) -> None:
    """End Ray Train's run (its controller stops every worker) and wait for the fit thread: a
    process that disconnects from Ray while a fit still waits on it exits with status 1.

    The controller takes an abort between its steps; one busy placing a replacement for which no
    capacity exists takes it only when that placement times out (a minute), so after `grace_s` it
    is killed instead (its workers go with it)."""
    controller = ray.get(sink.controller.remote())
    if controller is not None:
        controller.abort.remote()
        thread.join(grace_s)
        if thread.is_alive():
            ray.kill(controller, no_restart=True)
            # The abort stopped Ray Train's placement group cleaner, and a killed controller removes
            # nothing: release its worker groups' CPUs here (removing one twice is harmless).
            for group in ray.get(sink.placement_groups.remote()):
                with contextlib.suppress(Exception):
                    ray.util.remove_placement_group(group)
    thread.join(10 * grace_s)
