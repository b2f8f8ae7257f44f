"""The run directory: runs/<job>/<run-id>/ with the resolved spec, metrics, events and result.

spec.yaml       the spec exactly as run (overrides applied, paths resolved)
metrics.jsonl   one line per step: step, samples_seen, loss, lr, world_size, global_batch_size, ...
events.jsonl    starts, resumes, resizes, checkpoints, the end; each with `time` and `kind`
result.json     status, steps, samples, final loss, seconds
ray/            Ray Train's own run storage
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


class RunDir:
    def __init__(self, path: Path):
        self.path = path
        self.path.mkdir(parents=True, exist_ok=True)

    @classmethod
    def create(cls, output_dir: str, job: str, run_id: str) -> RunDir:
        return cls(Path(output_dir) / job / run_id)

    def write_spec(self, spec_dict: dict[str, Any]) -> None:
        (self.path / "spec.yaml").write_text(yaml.safe_dump(spec_dict, sort_keys=False))

    def append_metrics(self, rows: Iterable[dict[str, Any]]) -> None:
        _append(self.path / "metrics.jsonl", rows)

    def append_events(self, events: Iterable[dict[str, Any]]) -> None:
        _append(self.path / "events.jsonl", events)

    def write_result(self, result: dict[str, Any]) -> None:
        (self.path / "result.json").write_text(json.dumps(result, indent=2) + "\n")


def _append(path: Path, items: Iterable[dict[str, Any]]) -> None:
    lines = [json.dumps(item, sort_keys=True) + "\n" for item in items]
    if lines:
        with path.open("a") as f:
            f.writelines(lines)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(path: Path) -> dict[str, Any]:
    """One run directory in a line: job, run, status, steps, final loss, failures survived,
    resizes, started (unix time). A run without result.json is still running, or was stopped
    before it could write one ("unfinished")."""
    result = json.loads((path / "result.json").read_text()) if (path / "result.json").is_file() else None
    events = read_jsonl(path / "events.jsonl")
    rows = read_jsonl(path / "metrics.jsonl")
    last = rows[-1] if rows else {}
    return {
        "job": path.parent.name,
        "run": path.name,
        "status": result["status"] if result else "unfinished",
        "steps": last.get("step", 0),
        "final_loss": last.get("loss"),
        "failures": sum(e["kind"] == "recovery" for e in events),
        "resizes": sum(e["kind"] == "resize" for e in events),
        "started": events[0]["time"] if events else path.stat().st_mtime,
        "path": str(path),
    }


def list_runs(output_dir: str | Path) -> list[dict[str, Any]]:
    """Every run directory under `output_dir` (OUTPUT_DIR/JOB/RUN/ with a spec.yaml), oldest first."""
    runs = [summarize(spec.parent) for spec in Path(output_dir).glob("*/*/spec.yaml")]
    return sorted(runs, key=lambda r: r["started"])
