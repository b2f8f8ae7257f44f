"""`elastune report RUN_DIR`: one self-contained HTML file about a run, readable offline.

Plots are inline SVG (matplotlib, no script, no external file): loss and learning rate against
samples seen; world size over time with failures and resizes marked; throughput; snapshot stall
and durable checkpoints. Then the recoveries and resizes with what they cost, and the spec.
"""

from __future__ import annotations

import html
import io
import time
from pathlib import Path
from typing import Any

from elastune.errors import ElastuneError
from elastune.train.run_dir import read_jsonl, summarize

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table { border-collapse: collapse; font-size: 0.9rem; } td, th { padding: 0.2rem 0.8rem; text-align: left; }
th { border-bottom: 1px solid #999; } tr:nth-child(even) td { background: #f4f4f4; }
figure { margin: 1rem 0; } figcaption { font-size: 0.85rem; color: #555; }
pre { background: #f4f4f4; padding: 0.8rem; overflow-x: auto; font-size: 0.8rem; }
"""


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report of `run_dir` to `out` (default RUN_DIR/report.html); returns its path."""
    if not (run_dir / "spec.yaml").is_file():
        raise ElastuneError(f"{run_dir} is not a run directory (no spec.yaml); give a folder OUTPUT_DIR/JOB/RUN that `elastune run` made")
    out = out or run_dir / "report.html"
    out.write_text(render(run_dir))
    return out


def render(run_dir: Path) -> str:
    summary = summarize(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    events = read_jsonl(run_dir / "events.jsonl")
    title = f"{summary['job']} / {summary['run']}"
    parts = [f"<h1>Elastune run {html.escape(title)}</h1>", table([summary_row(summary, rows)])]
    if rows:
        figures = [
            ("Loss and learning rate against samples seen", loss_and_lr(rows)),
            ("World size over time; failures (red) and resizes (blue) marked", world_timeline(rows, events)),
            ("Throughput per step", throughput(rows)),
            ("In-memory snapshot stall per step (rank 0) and durable checkpoints", checkpoints(rows, events)),
        ]
        for caption, svg in figures:
            parts.append(f"<figure>{svg}<figcaption>{html.escape(caption)}</figcaption></figure>")
    else:
        parts.append("<p>No step completed: nothing to plot.</p>")
    changes = [e for e in events if e["kind"] in ("recovery", "resize")]
    parts.append("<h2>Failures and resizes</h2>")
    parts.append(table([change_row(e) for e in changes]) if changes else "<p>None.</p>")
    parts.append("<h2>Spec</h2><pre>" + html.escape((run_dir / "spec.yaml").read_text()) + "</pre>")
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")  # fmt: skip


def summary_row(summary: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "status": summary["status"], "steps": summary["steps"], "samples": rows[-1]["samples_seen"] if rows else 0,
        "final loss": "-" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}",
        "failures survived": summary["failures"], "resizes": summary["resizes"],
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(summary["started"])),
    }  # fmt: skip


def change_row(e: dict[str, Any]) -> dict[str, Any]:
    mttr = e.get("mttr_seconds")
    return {
        "kind": e["kind"], "step": e.get("step"), "cause": e.get("cause", ""),
        "world size": f"{e.get('world_size_before')} -> {e.get('world_size_after')}",
        "lost steps": e.get("lost_steps", 0), "MTTR (s)": "-" if mttr is None else f"{mttr:.2f}",
    }  # fmt: skip


def table(records: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in records[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>" for r in records)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # no display; SVG out
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.4))
    ax.grid(alpha=0.3)
    return plt, fig, ax


def _svg(plt, fig) -> str:
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog: the SVG is inline in HTML


def loss_and_lr(rows: list[dict[str, Any]]) -> str:
    plt, fig, ax = _figure()
    samples = [r["samples_seen"] for r in rows]
    ax.plot(samples, [r["loss"] for r in rows], color="#1f77b4", label="loss")
    ax.set_xlabel("samples seen")
    ax.set_ylabel("loss", color="#1f77b4")
    lr = ax.twinx()
    lr.plot(samples, [r["lr"] for r in rows], color="#ff7f0e", label="learning rate")
    lr.set_ylabel("learning rate", color="#ff7f0e")
    return _svg(plt, fig)


def world_timeline(rows: list[dict[str, Any]], events: list[dict[str, Any]]) -> str:
    plt, fig, ax = _figure()
    t0 = events[0]["time"] if events else rows[0]["time"]
    ax.step([r["time"] - t0 for r in rows], [r["world_size"] for r in rows], where="post", color="#2ca02c", label="workers")
    for e in events:
        if e["kind"] in ("recovery", "resize"):
            ax.axvline(e.get("failed_at", e["time"]) - t0, color="#d62728" if e["kind"] == "recovery" else "#1f77b4", linestyle="--")
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("world size")
    ax.set_ylim(0, max(r["world_size"] for r in rows) + 1)
    return _svg(plt, fig)


def throughput(rows: list[dict[str, Any]]) -> str:
    plt, fig, ax = _figure()
    ax.plot([r["step"] for r in rows], [r.get("samples_per_s") or 0 for r in rows], color="#9467bd")
    ax.set_xlabel("step")
    ax.set_ylabel("samples/s")
    return _svg(plt, fig)


def checkpoints(rows: list[dict[str, Any]], events: list[dict[str, Any]]) -> str:
    plt, fig, ax = _figure()
    stalls = [(r["step"], r["snapshot_stall_seconds"] * 1e3) for r in rows if r.get("snapshot_stall_seconds") is not None]
    if stalls:
        ax.plot(*zip(*stalls), color="#8c564b", label="snapshot stall (ms)")
    ax.set_xlabel("step")
    ax.set_ylabel("snapshot stall (ms)")
    saves = [e for e in events if e["kind"] == "checkpoint"]
    if saves:
        persist = ax.twinx()
        persist.bar([e["step"] for e in saves], [e["seconds"] for e in saves], color="#17becf", alpha=0.6, label="durable write (s)")
        persist.set_ylabel("durable write (s)")
    return _svg(plt, fig)

