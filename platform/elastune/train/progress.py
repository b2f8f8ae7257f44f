"""The driver's live view of a run: a progress bar on a terminal, periodic lines elsewhere."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from elastune import events as ev


class ProgressView:
    def __init__(self, console: Console, total_steps: int | None, every_s: float = 5.0):
        """`total_steps` None: not known ahead (an adaptive batch); lines then say samples and batch."""
        self.console = console
        self.total = total_steps
        self.every_s = every_s
        self._last_line = -math.inf  # the first row always gets its line (monotonic time may start near 0)
        self._bar: Progress | None = None
        if console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self._task = self._bar.add_task("train", total=total_steps, stats="starting workers...")
            self._bar.start()

    def update(self, row: ev.Row) -> None:
        """A line every `every_s` and for every step that evaluated (a bar on a terminal, with
        the evaluating steps' lines above it)."""
        stats = describe_row(row)
        if self._bar is not None:
            self._bar.update(self._task, completed=row.step, stats=stats)
            if row.eval_loss is not None:
                self.say(f"{self._where(row)}  {stats}")
            return
        now = time.monotonic()
        if now - self._last_line >= self.every_s or row.step == self.total or row.eval_loss is not None:
            self._last_line = now
            self.console.print(f"{self._where(row)}  {stats}", highlight=False, soft_wrap=True)

    def _where(self, row: ev.Row) -> str:
        if self.total is None:
            return f"step {row.step} ({row.samples_seen:,} samples, batch {row.global_batch_size})"
        return f"step {row.step}/{self.total}"

    def say(self, message: str) -> None:
        self.console.print(message, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def describe_row(row: ev.Row) -> str:
    sps = f"  {row.samples_per_s:,.0f} samples/s" if row.samples_per_s else ""
    held_out = f"  held-out {row.eval_loss:.4f}" if row.eval_loss is not None else ""
    return f"loss {row.loss:.4f}{held_out}  lr {row.lr:.3g}{sps}  world {row.world_size}"


def describe_event(event: ev.Event) -> str | None:
    """A sentence for the events a user should see (console markup); None for the rest."""
    return CONSOLE[type(event)](event)


def _text(value: object) -> str:
    """Free text as markup: error texts carry brackets ("[/path/pair.cc:553] Connection closed")."""
    return escape(str(value))


def _start(e: ev.Start) -> str:
    line = f"Worker group up: {e.world_size} worker(s); {_text(e.plan)}"
    if e.resumed_from_step is not None:
        line += (
            f"; resumed at step {e.resumed_from_step} ({e.resumed_samples_seen} samples), "
            f"checkpoint saved by {e.saved_world_size} worker(s), "
            f"{(e.load_bytes or 0) / 1e6:.2f} MB loaded in {e.load_seconds or 0:.2f} s"
        )
    return line + "."


def _resize(e: ev.Resize) -> str:
    counts = ",".join(map(str, e.micro_batches or ()))
    line = (
        f"Resized {e.world_size_before} -> {e.world_size_after} workers at step {e.step}; "
        f"micro-batches per rank {counts}; global batch stays {e.global_batch_size}."
    )
    if e.mttr_seconds is not None:  # Ray Train restarted the group to resize it
        line += f" Lost {e.lost_steps} step(s); training again {e.mttr_seconds:.1f} s after the old group stopped."
    return line


def _fault(e: ev.Fault) -> str:
    what = {
        "kill_rank": f"killing rank {e.rank}",
        "kill_node": f"killing the node of rank {e.rank}",
        "delay_rank": f"delaying rank {e.rank} {e.seconds} s",
    }[e.action]
    where = f"(spec faults.{e.index}): {what} at step {e.step}"
    if e.skipped:
        return f"[yellow]Fault skipped[/yellow] {where}: {_text(e.skipped)}."
    return f"[yellow]Fault[/yellow] {where}."


def _recovery(e: ev.Recovery) -> str:
    if e.recovery == "live":
        counts = ",".join(map(str, e.micro_batches or ()))
        return (
            f"Recovered from {_text(e.cause)}: the {e.world_size_after} survivor(s) of {e.world_size_before} "
            f"carried on at step {(e.resumed_from_step or 0) + 1} with the same global batch ({counts} micro-batches per rank), "
            f"lost 0 steps, training again {e.mttr_seconds or 0:.2f} s after it."
        )
    return (
        f"Recovered from {_text(e.cause)}: {e.world_size_before} -> {e.world_size_after} workers, "
        f"resumed at step {e.resumed_from_step} (tier {e.resumed_from_tier}), lost {e.lost_steps} step(s), "
        f"new workers up in {e.restart_seconds or 0:.1f} s, training again {e.mttr_seconds or 0:.1f} s after the failure."
    )


def _preemption(e: ev.Preemption) -> str:
    when = f", deadline in {e.deadline - e.time:.0f} s" if e.deadline else ""
    saved = f"; making step {e.persisted_step} durable now" if e.persisted_step is not None else ""
    return f"[yellow]Preemption notice[/yellow] for node(s) {', '.join(n[:12] for n in e.nodes)}{when}{saved}."


def _checkpoint(e: ev.Checkpoint) -> str:
    stalls = ", ".join(f"{x:.2f}" for x in e.stall_seconds)
    return f"Checkpoint step {e.step}: {e.bytes / 1e6:.2f} MB in {e.seconds:.2f} s (per-rank stall {stalls} s) -> {_text(e.uri)}"


def _quiet(e: ev.Event) -> None:
    return None


# How the console shows each kind (None: not shown; the run directory and the report have it).
# tests/unit/test_events.py holds every kind in events.KINDS to an entry here.
CONSOLE: dict[type[ev.Event], Callable[[Any], str | None]] = {
    ev.Start: _start,
    ev.Resize: _resize,
    ev.Fault: _fault,
    ev.Recovery: _recovery,
    ev.Preemption: _preemption,
    ev.Checkpoint: _checkpoint,
    ev.CollectiveFailed: lambda e: f"Rank {e.rank} saw step {e.step}'s reduction fail: {_text(e.error)}",
    ev.Leave: lambda e: f"Rank {e.replica} left after step {e.step}: {_text(e.reason)}.",
    ev.RunWarning: lambda e: f"[yellow]Warning[/yellow]: {_text(e.message)}",
    ev.LeaseTakenOver: lambda e: _text(e.message),
    ev.Fresh: lambda e: _text(e.message),
    ev.DataPrepared: lambda e: _text(e.message),
    ev.Resume: lambda e: _text(e.message),
    ev.Join: _quiet,  # a worker group's start says who is in it
    ev.Memory: _quiet,  # the exporter's (elastune_worker_state_bytes)
    ev.Finish: _quiet,  # the progress bar reaches its end
    ev.FailurePolicy: _quiet,  # a give-up decision is the run's error; a retry is a recovery to come
    ev.End: _quiet,  # `elastune run` prints the outcome
    ev.BatchChange: lambda e: (
        f"Batch {e.previous} -> {e.global_batch_size} from sample {e.samples_seen:,} (after step {e.step}): smoothed "
        f"noise scale {e.b_simple:.1f}, peak lr x{e.lr_factor:.3g}."
    ),
    ev.Population: _quiet,  # the tuner's own lines
    ev.Exploit: _quiet,
    ev.Boundary: lambda e: (
        f"Boundary at {e.samples_seen:,} samples (waited {e.waited_seconds:.2f} s): "
        + (
            f"took {_text(e.donor)}'s state ({'from its memory' if e.tier == 0 else 'from the clone in this root'}, "
            f"{e.load_seconds:.3f} s)"
            if e.donor
            else ("the search ended" if e.stop else "goes on")
        )
    ),
}
