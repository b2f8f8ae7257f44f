"""Reading a search's lineage.json: which member's intervals a member's state went through.

A member's state at the end of a search passed through one member per interval: itself back to
its last exploit, then its donor's, back to the donor's own exploit, and so on. Its curves along
that path (`stitched`) are what replaying its schedule from scratch trains.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from elastune.events import Row, read_rows


def read_lineage(tune_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(tune_dir) / "lineage.json").read_text())


def path_of(lineage: dict[str, Any], member: str) -> list[dict[str, Any]]:
    """The segments (one per interval, first to last) whose state `member` ends with."""
    by_key = {(s["member"], s["generation"]): s for s in lineage["segments"]}
    donor_of = {(e["recipient"], e["generation"]): e["donor"] for e in lineage["exploits"]}
    last = max(g for (_, g) in by_key)
    out, current = [], member
    for generation in range(last, -1, -1):
        out.append(by_key[(current, generation)])
        current = donor_of.get(
            (current, generation - 1), current
        )  # exploited after the interval before: its state was the donor's
    return out[::-1]


def stitched(lineage: dict[str, Any], member: str) -> list[Row]:
    """Metrics rows of `member`'s lineage, in order: each interval's steps, from the run
    directories of the member that trained it (a later run's row of a step, redone after a
    restart, replaces an earlier one's)."""
    out: list[Row] = []
    for segment in path_of(lineage, member):
        steps: dict[int, Row] = {}
        for run_dir in segment["run_dirs"]:
            for row in read_rows(Path(run_dir)):
                if segment["from_samples"] < row.samples_seen <= segment["to_samples"]:
                    steps[row.step] = row
        out += [steps[s] for s in sorted(steps)]
    return out
