"""The run's vocabulary as a contract: every event kind is handled by every consumer (the console,
`runs ls`, the report, the exporter), every record survives its JSON form, and the run
directories written before the records were typed still read. A kind added to elastune.events
without a decision in each consumer fails here."""

from __future__ import annotations

import ast
import dataclasses
import json
import types
import typing
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from elastune.events import (
    FORMAT,
    KINDS,
    Checkpoint,
    Event,
    Fault,
    Recovery,
    Resize,
    Row,
    event_from_json,
    read_events,
    read_rows,
    row_from_json,
    to_json,
)
from elastune.metrics.exporter import EXPORTED, RunMetrics
from elastune.report import REPORT_SHOWS, render
from elastune.train.progress import CONSOLE, describe_event
from elastune.train.run_dir import NOT_COUNTED, SUMMARY_COUNTS, RunDir, summarize

ROOT = Path(__file__).resolve().parents[2]
EVERY_KIND = sorted(KINDS.values(), key=lambda cls: cls.kind)
CHOSEN = {(Fault, "action"): "kill_rank", (Recovery, "recovery"): "restart"}


def sample(cls, **chosen):
    """A record of `cls` with every field set to a plain value of its type (free text with
    brackets, which the console must not read as markup)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        values[f.name] = chosen.get(f.name, CHOSEN.get((cls, f.name), _value(hints[f.name])))
    return cls(**values)


def _value(hint):
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return _value(next(a for a in typing.get_args(hint) if a is not type(None)))
    if typing.get_origin(hint) is tuple:
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return tuple(_value(a) for a in args) * (2 if Ellipsis in typing.get_args(hint) else 1)
    return {int: 3, float: 1.5, str: "text [with/brackets:1] here", bool: True}[hint]


def test_every_kind_is_decided_by_every_consumer():
    kinds = set(KINDS.values())
    assert set(CONSOLE) == kinds, "elastune.train.progress.CONSOLE"
    assert set(REPORT_SHOWS) == kinds, "elastune.report.REPORT_SHOWS"
    assert set(EXPORTED) == kinds, "elastune.metrics.exporter.EXPORTED"
    counted = {k for group in SUMMARY_COUNTS.values() for k in group}
    assert counted | NOT_COUNTED == kinds and not counted & NOT_COUNTED, "elastune.train.run_dir"


@pytest.mark.parametrize("cls", EVERY_KIND, ids=lambda c: c.kind)
def test_every_kind_survives_its_json_form(cls):
    event = sample(cls)
    line = json.dumps(to_json(event))
    assert json.loads(line)["kind"] == cls.kind
    assert event_from_json(json.loads(line)) == event
    with pytest.raises(ValueError, match="unknown event kind"):
        event_from_json({**to_json(event), "kind": "nonsense"})


def test_a_row_survives_its_json_form_and_a_missing_field_is_refused_in_this_format():
    row = sample(Row)
    assert row_from_json(json.loads(json.dumps(to_json(row)))) == row
    without = {k: v for k, v in to_json(row).items() if k != "loss"}
    with pytest.raises(ValueError, match="loss"):
        row_from_json(without)
    assert row_from_json(without, format=1).loss is None  # a version-1 line without it still reads


@pytest.mark.parametrize("cls", EVERY_KIND, ids=lambda c: c.kind)
def test_the_console_shows_a_kind_as_declared(cls):
    line = describe_event(sample(cls))
    shown = CONSOLE[cls].__name__ != "_quiet"
    assert (line is not None) == shown
    if shown:
        from rich.console import Console

        console = Console(width=1000, force_terminal=False, record=True)
        console.print(line)  # valid markup: free text is escaped
        assert "text [with/brackets:1] here" in console.export_text() or "[with/brackets:1]" not in line


def _series(metrics: RunMetrics) -> dict[tuple[str, tuple], float]:
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value for fam in text_string_to_metric_families(text) for s in fam.samples
    }


@pytest.mark.parametrize("cls", EVERY_KIND, ids=lambda c: c.kind)
def test_the_exporter_maps_a_kind_as_declared(cls):
    metrics = RunMetrics("j", "r")
    before = _series(metrics)
    metrics.observe([], [sample(cls)])
    changed = {k for k, v in _series(metrics).items() if before.get(k) != v}
    assert bool(changed) == (EXPORTED[cls] is not None), changed


def test_a_run_directory_with_every_kind_reads_back_and_reports(tmp_path):
    run = RunDir.create(str(tmp_path), "job", "run-1")
    run.write_spec({"name": "job"})
    events = [sample(cls, time=100.0 + i) for i, cls in enumerate(EVERY_KIND)]
    rows = [sample(Row, time=200.0 + s, step=s, samples_seen=8 * s) for s in (1, 2, 3)]
    run.append_events(events)
    run.append_metrics(rows)
    assert json.loads((run.path / "format.json").read_text()) == {"format": FORMAT}
    assert read_events(run.path) == events and read_rows(run.path) == rows
    summary = summarize(run.path)
    assert (summary["failures"], summary["resizes"], summary["steps"]) == (1, 1, 3)
    page = render(run.path)
    table = page[page.index("<h2>Failures and resizes</h2>") : page.index("<h2>Batch changes")]
    assert table.count("<tr>") == 1 + sum(cls in (Recovery, Resize) for cls in EVERY_KIND)  # a header and one row each
    moved = page[page.index("<h2>Batch changes") : page.index("<h2>Spec")]
    assert moved.count("<tr>") == 2 and "3 -&gt; 3" in moved  # a header and the batch_change
    assert REPORT_SHOWS[Checkpoint] and page.count("<svg") == 5  # with the batch and noise scale: rows carry `noise`


def test_a_version_1_run_directory_still_reads(tmp_path):
    """Written before format.json: the driver's notes had no message, a live recovery no global
    batch; unknown kinds (a newer writer's) are passed over."""
    lines = [
        {"time": 1.0, "kind": "lease"},
        {"time": 2.0, "kind": "resume", "step": 4, "samples_seen": 96, "changes": ["optimizer.lr"]},
        {"time": 3.0, "kind": "recovery", "recovery": "live", "step": 5, "cause": "worker lost during step 5"},
        {"time": 4.0, "kind": "something_new", "detail": 1},
    ]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(obj) + "\n" for obj in lines))
    lease, resume, recovery = read_events(tmp_path)
    assert lease.message == "" and resume.changes == ("optimizer.lr",)
    assert recovery.global_batch_size is None and recovery.world_size_after is None and recovery.cause.endswith("step 5")


def test_producers_build_records_not_dicts():
    """No dict literal in the package names an event kind: events are made through their records."""
    found = []
    for path in (ROOT / "platform" / "elastune").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values):
                    if isinstance(key, ast.Constant) and key.value == "kind" and isinstance(value, ast.Constant):
                        if value.value in KINDS:
                            found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found


def test_records_are_frozen():
    event = sample(Recovery)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.cause = "changed"  # type: ignore[misc]
    assert all(issubclass(cls, Event) and cls.__dataclass_params__.frozen for cls in EVERY_KIND)


@pytest.mark.parametrize("terminal", [False, True])
def test_the_console_prints_every_evaluating_step(terminal):
    """Between the periodic lines, a step that evaluated always gets its line, held-out loss included."""
    import io

    from rich.console import Console

    from elastune.train.progress import ProgressView
    from tests.helpers import row

    out = io.StringIO()
    view = ProgressView(Console(file=out, force_terminal=terminal, width=160), total_steps=10, every_s=3600)
    for step in range(1, 11):
        view.update(row(step=step, loss=3.0, lr=1e-3, world_size=2, eval_loss=2.5 + step if step in (4, 7) else None))
    view.close()
    text = out.getvalue()
    assert "held-out 6.5000" in text and "held-out 9.5000" in text
    if not terminal:
        assert [line.split()[1] for line in text.splitlines()] == ["1/10", "4/10", "7/10", "10/10"]
