"""The run sink: a tiny Ray actor that workers push metrics rows and events to, fire and forget.

The driver drains it to write the run directory and draw the progress bar. This keeps
`ray.train.report` (about 2 s per call on Ray 2.60) off the per-step path.
"""

from __future__ import annotations

import ray
from elastune.events import Event, Fault, Join, Row


@ray.remote(num_cpus=0, max_restarts=-1)
class RunSink:
    def __init__(self) -> None:
        self._rows: list[Row] = []
        self._events: list[Event] = []
        self._claimed: set[str] = set()
        self._last_step = 0
        self._arrived: dict[str, int] = {}
        self._kill_at = self._join_at = self._received = 0  # arrival order of the last kill fault and the last join
        self._controller = None  # Ray Train's controller of this run (train.controller.PublishController)
        self._placement_groups: list = []  # its worker groups' (the same)

    def record(self, rows: list[Row], once: bool = False) -> None:
        """Append metrics rows. `once`: several workers send the same steps (a live group's
        participants all do); keep each step's first row, in step order."""
        if once:
            rows = [r for r in rows if r.step > self._last_step]
        if rows:
            self._last_step = max(self._last_step, rows[-1].step)
        self._rows.extend(rows)

    def event(self, event: Event, key: str | None = None) -> None:
        """Append an event; one with a `key` only the first time that key is given in this run."""
        if key is None or self.claim(key):
            self._events.append(event)
            self._received += 1
            if isinstance(event, Join):
                self._join_at = self._received
            elif isinstance(event, Fault) and event.action.startswith("kill"):
                self._kill_at = self._received  # recorded before the kill (a killed worker says nothing afterwards)

    def rejoined(self) -> bool:
        """Whether a worker has joined since the run's last kill fault."""
        return self._join_at > self._kill_at > 0

    def claim(self, key: str) -> bool:
        """True for the first caller of `key` in this run, False after (e.g. a fault already fired)."""
        first = key not in self._claimed
        self._claimed.add(key)
        return first

    def arrive(self, key: str) -> int:
        """Count one more arrival at `key`; returns how many have arrived (this one included)."""
        self._arrived[key] = self._arrived.get(key, 0) + 1
        return self._arrived[key]

    def arrived(self, key: str) -> int:
        return self._arrived.get(key, 0)

    def last_step(self) -> int | None:
        """The newest step a row was recorded for: the run's progress."""
        return self._last_step or None

    def set_controller(self, controller) -> None:
        self._controller = controller

    def add_placement_group(self, group) -> None:
        """A worker group's placement group (train.controller.PublishController)."""
        self._placement_groups.append(group)

    def placement_groups(self) -> list:
        return list(self._placement_groups)

    def controller(self):
        return self._controller

    def drain(self) -> tuple[list[Row], list[Event]]:
        rows, events = self._rows, self._events
        self._rows, self._events = [], []
        return rows, events


def sink_name(run_id: str) -> str:
    return f"elastune-sink-{run_id}"
