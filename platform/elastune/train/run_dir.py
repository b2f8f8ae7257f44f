"""The run directory: runs/<job>/<run-id>/ with the resolved spec, metrics, events and result.

spec.yaml       the spec exactly as run (overrides applied, paths resolved)
replay.yaml     batch.adaptive only: the spec with the batch changes so far as phases (`elastune run` retrains them)
metrics.jsonl   one `events.Row` per step: step, samples_seen, loss, lr, world_size, global_batch_size, ...
events.jsonl    one `events.Event` per line: starts, recoveries, resizes, checkpoints, the end; each with `time` and `kind`
format.json     the format version of the two (events.FORMAT)
result.json     status, steps, samples, final loss, seconds
ray/            Ray Train's own run storage

docs/run-directory.md describes every field.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from elastune import events as ev


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


class RunDir:
    def __init__(self, path: Path):
        self.path = path
        self.path.mkdir(parents=True, exist_ok=True)
        ev.write_format(path)

    @classmethod
    def create(cls, output_dir: str, job: str, run_id: str) -> RunDir:
        return cls(Path(output_dir) / job / run_id)

    def write_spec(self, spec_dict: dict[str, Any]) -> None:
        (self.path / "spec.yaml").write_text(yaml.safe_dump(spec_dict, sort_keys=False))

    def write_replay(self, spec_dict: dict[str, Any]) -> None:
        """replay.yaml, replaced whole (a reader never sees half of it)."""
        part = self.path / "replay.yaml.part"
        part.write_text(yaml.safe_dump(spec_dict, sort_keys=False))
        part.replace(self.path / "replay.yaml")

    def append_metrics(self, rows: Iterable[ev.Row]) -> None:
        ev.append_jsonl(self.path / "metrics.jsonl", rows)

    def append_events(self, events: Iterable[ev.Event]) -> None:
        ev.append_jsonl(self.path / "events.jsonl", events)

    def write_result(self, result: dict[str, Any]) -> None:
        (self.path / "result.json").write_text(json.dumps(result, indent=2) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """A .jsonl file's lines as plain JSON objects: the format as written (tests read it so)."""
    return ev.read_lines(path)


def summarize(path: Path) -> dict[str, Any]:
    """One run directory in a line: job, run, status, steps, final loss, the last held-out loss
    (None: no evaluation), failures survived, resizes, started (unix time). A run without
    result.json is still running, or was stopped before it could write one ("unfinished")."""
    result = json.loads((path / "result.json").read_text()) if (path / "result.json").is_file() else None
    events = ev.read_events(path)
    rows = ev.read_rows(path)
    last = rows[-1] if rows else None
    return {
        "job": path.parent.name,
        "run": path.name,
        "status": result["status"] if result else "unfinished",
        "steps": last.step if last else 0,
        "final_loss": last.loss if last else None,
        "eval_loss": next((r.eval_loss for r in reversed(rows) if r.eval_loss is not None), None),  # the last evaluation
        **{column: sum(isinstance(e, kinds) for e in events) for column, kinds in SUMMARY_COUNTS.items()},
        "started": events[0].time if events else path.stat().st_mtime,
        "path": str(path),
    }


# The event kinds `runs ls` counts, by column; the others it summarises by the run's status, steps
# and loss (NOT_COUNTED). tests/unit/test_events.py holds every kind to one of the two.
SUMMARY_COUNTS: dict[str, tuple[type[ev.Event], ...]] = {"failures": (ev.Recovery,), "resizes": (ev.Resize,)}
NOT_COUNTED: frozenset[type[ev.Event]] = frozenset(
    {
        ev.Start,
        ev.Join,
        ev.Memory,
        ev.Leave,
        ev.Finish,
        ev.CollectiveFailed,
        ev.Fault,
        ev.Checkpoint,
        ev.FailurePolicy,
        ev.Preemption,
        ev.RunWarning,
    }
    | {ev.LeaseTakenOver, ev.Fresh, ev.DataPrepared, ev.Resume, ev.End, ev.Population, ev.Exploit, ev.Boundary, ev.BatchChange}
)


def list_runs(output_dir: str | Path) -> list[dict[str, Any]]:
    """Every run directory under `output_dir` (OUTPUT_DIR/JOB/RUN/ with a spec.yaml), oldest first."""
    runs = [summarize(spec.parent) for spec in Path(output_dir).glob("*/*/spec.yaml")]
    return sorted(runs, key=lambda r: r["started"])
