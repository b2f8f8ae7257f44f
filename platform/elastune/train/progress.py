"""The driver's live view of a run: a progress bar on a terminal, periodic lines elsewhere."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ProgressView:
    def __init__(self, console: Console, total_steps: int, every_s: float = 5.0):
        self.console = console
        self.total = total_steps
        self.every_s = every_s
        self._last_line = 0.0
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

    def update(self, row: dict[str, Any]) -> None:
        stats = describe_row(row)
        if self._bar is not None:
            self._bar.update(self._task, completed=row["step"], stats=stats)
            return
        now = time.monotonic()
        if now - self._last_line >= self.every_s or row["step"] == self.total:
            self._last_line = now
            self.console.print(f"step {row['step']}/{self.total}  {stats}", highlight=False, soft_wrap=True)

    def say(self, message: str) -> None:
        self.console.print(message, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def describe_row(row: dict[str, Any]) -> str:
    sps = row.get("samples_per_s")
    return (
        f"loss {row['loss']:.4f}  lr {row['lr']:.3g}  {sps:,.0f} samples/s  world {row['world_size']}"
        if sps
        else f"loss {row['loss']:.4f}  lr {row['lr']:.3g}  world {row['world_size']}"
    )


FREE_TEXT = ("cause", "error", "message", "reason", "skipped", "uri", "plan")


def describe_event(event: dict[str, Any]) -> str | None:
    """A sentence for the events a user should see (console markup); None for the rest."""
    kind = event["kind"]
    # Error texts carry brackets ("[/path/pair.cc:553] Connection closed"), which are markup.
    event = {**event, **{k: escape(str(event[k])) for k in FREE_TEXT if event.get(k) is not None}}
    if kind == "start":
        line = f"Worker group up: {event['world_size']} worker(s); {event['plan']}"
        if event.get("resumed_from_step") is not None:
            line += (
                f"; resumed at step {event['resumed_from_step']} ({event['resumed_samples_seen']} samples), "
                f"checkpoint saved by {event['saved_world_size']} worker(s), "
                f"{event['load_bytes'] / 1e6:.2f} MB loaded in {event['load_seconds']:.2f} s"
            )
        return line + "."
    if kind == "resize":
        counts = ",".join(map(str, event["micro_batches"]))
        line = (
            f"Resized {event['world_size_before']} -> {event['world_size_after']} workers at step {event['step']}; "
            f"micro-batches per rank {counts}; global batch stays {event['global_batch_size']}."
        )
        if "mttr_seconds" in event:  # Ray Train restarted the group to resize it
            line += (
                f" Lost {event['lost_steps']} step(s); training again {event['mttr_seconds']:.1f} s after the old group stopped."
            )
        return line
    if kind == "fault":
        what = {
            "kill_rank": f"killing rank {event['rank']}",
            "kill_node": f"killing the node of rank {event['rank']}",
            "delay_rank": f"delaying rank {event['rank']} {event.get('seconds')} s",
        }[event["action"]]
        if event.get("skipped"):
            where = f"(spec faults.{event['index']}): {what} at step {event['step']}"
            return f"[yellow]Fault skipped[/yellow] {where}: {event['skipped']}."
        return f"[yellow]Fault[/yellow] (spec faults.{event['index']}): {what} at step {event['step']}."
    if kind == "recovery" and event.get("recovery") == "live":
        counts = ",".join(map(str, event["micro_batches"]))
        return (
            f"Recovered from {event['cause']}: the {event['world_size_after']} survivor(s) of {event['world_size_before']} "
            f"carried on at step {event['resumed_from_step'] + 1} with the same global batch ({counts} micro-batches per rank), "
            f"lost 0 steps, training again {event['mttr_seconds']:.2f} s after it."
        )
    if kind == "recovery":
        return (
            f"Recovered from {event['cause']}: {event['world_size_before']} -> {event['world_size_after']} workers, "
            f"resumed at step {event['resumed_from_step']} (tier "
            f"{event['resumed_from_tier']}), lost {event['lost_steps']} step(s), "
            f"new workers up in {event['restart_seconds']:.1f} s, training again {event['mttr_seconds']:.1f} s after the failure."
        )
    if kind == "preemption":
        when = f", deadline in {event['deadline'] - event['time']:.0f} s" if event.get("deadline") else ""
        saved = f"; making step {event['persisted_step']} durable now" if event.get("persisted_step") is not None else ""
        return f"[yellow]Preemption notice[/yellow] for node(s) {', '.join(n[:12] for n in event['nodes'])}{when}{saved}."
    if kind == "collective_failed":
        return f"Rank {event['rank']} saw step {event['step']}'s reduction fail: {event['error']}"
    if kind == "leave":
        return f"Rank {event['replica']} left after step {event['step']}: {event['reason']}."
    if kind == "warning":
        return f"[yellow]Warning[/yellow]: {event['message']}"
    if kind == "checkpoint":
        stalls = ", ".join(f"{x:.2f}" for x in event["stall_seconds"])
        return (
            f"Checkpoint step {event['step']}: {event['bytes'] / 1e6:.2f} MB in {event['seconds']:.2f} s "
            f"(per-rank stall {stalls} s) -> {event['uri']}"
        )
    return None
