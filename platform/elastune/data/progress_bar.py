"""A bar per phase while a dataset is prepared (`elastune data prepare`, a run that prepares its
data.source): on a terminal only; logs get the summary line that follows."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from elastune.data.prepare import OnProgress

STEPS = 500  # redraws per phase at most: a JSONL source reports every line


@contextlib.contextmanager
def preparing(console: Console) -> Iterator[OnProgress | None]:
    """Yields the `on_progress` to hand `prepare` (None off a terminal)."""
    if not console.is_terminal:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        tasks: dict[str, TaskID] = {}
        shown: dict[str, int] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase], shown[phase] = bar.add_task(phase, total=total), 0
            if done == total or done - shown[phase] >= total // STEPS:
                bar.update(tasks[phase], completed=done)
                shown[phase] = done

        yield update
