"""SIGINT and SIGTERM while a run trains (Ctrl-C; `elastune stop`, Ray's job stop and a pod's
termination send SIGTERM): the first asks the run to stop the way a preemption notice does (the
driver makes the newest complete in-memory step durable, writes every row up to it, ends the
workers and says where the run stands); a second ends the process at once, quietly.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

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
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def __enter__(self) -> "StopRequest":
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
