"""`elastune report DIR`: one self-contained HTML file about a run or a search, readable offline.

Plots are inline SVG (matplotlib, no script, no external file). A run: loss and learning rate
against samples seen; world size over time with failures and resizes marked; throughput; snapshot
stall and durable checkpoints; the global batch and the smoothed gradient noise scale against samples
seen (where steps measure it); then the recoveries and resizes with what they cost, an adaptive
batch's changes, and the spec.
A search (`elastune tune`'s directory): the lineage tree (members over samples, an arrow from donor
to recipient at each exploit), every member's loss and learning rate stitched along its lineage,
the exploits with their changes, and the best schedule. A WSD-branches search: its loss-vs-budget
table and the trunk's and branches' curves.
"""

from __future__ import annotations

import html
import io
import json
import time
from pathlib import Path
from typing import Any

import yaml

from elastune import events as ev
from elastune.errors import ElastuneError
from elastune.train.adaptive import smoothed_noise_scale
from elastune.train.run_dir import summarize
from elastune.tune.lineage import path_of, read_lineage, stitched

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table { border-collapse: collapse; font-size: 0.9rem; } td, th { padding: 0.2rem 0.8rem; text-align: left; }
th { border-bottom: 1px solid #999; } tr:nth-child(even) td { background: #f4f4f4; }
figure { margin: 1rem 0; } figcaption { font-size: 0.85rem; color: #555; }
pre { background: #f4f4f4; padding: 0.8rem; overflow-x: auto; font-size: 0.8rem; }
"""


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report of `run_dir` (a run's or a search's directory) to `out` (default
    DIR/report.html); returns its path."""
    if not (run_dir / "spec.yaml").is_file():
        raise ElastuneError(
            f"{run_dir} is not a run directory (no spec.yaml); give a folder OUTPUT_DIR/JOB/RUN that `elastune run` "
            f"made, or OUTPUT_DIR/JOB/tune-ID that `elastune tune` made"
        )
    out = out or run_dir / "report.html"
    if (run_dir / "lineage.json").is_file():
        page = render_search(run_dir)
    elif (run_dir / "branches.json").is_file():
        page = render_branches(run_dir)
    else:
        page = render(run_dir)
    out.write_text(page)
    return out


def _page(title: str, parts: list[str]) -> str:
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n"
    )


def _figures(figures: list[tuple[str, str]]) -> list[str]:
    return [f"<figure>{svg}<figcaption>{html.escape(caption)}</figcaption></figure>" for caption, svg in figures]


def render(run_dir: Path) -> str:
    summary = summarize(run_dir)
    rows = ev.read_rows(run_dir)
    events = ev.read_events(run_dir)
    title = f"{summary['job']} / {summary['run']}"
    parts = [f"<h1>Elastune run {html.escape(title)}</h1>", table([summary_row(summary, rows)])]
    if rows:
        figures = [
            ("Loss (held-out loss in green, with eval:) and learning rate against samples seen", loss_and_lr(rows)),
            ("World size over time; failures (red) and resizes (blue) marked", world_timeline(rows, events)),
            ("Throughput per step", throughput(rows)),
            ("In-memory snapshot stall per step (rank 0) and durable checkpoints", checkpoints(rows, events)),
        ]
        if any(r.noise is not None for r in rows):
            caption = "Global batch and the smoothed gradient noise scale B_simple against samples seen"
            figures.append((caption, batch_and_noise(rows, smoothing_of(run_dir, rows))))
        parts += _figures(figures)
    else:
        parts.append("<p>No step completed: nothing to plot.</p>")
    changes = [e for e in events if isinstance(e, ev.Change)]
    parts.append("<h2>Failures and resizes</h2>")
    parts.append(table([change_row(e) for e in changes]) if changes else "<p>None.</p>")
    moved = [e for e in events if isinstance(e, ev.BatchChange)]
    if moved:
        parts.append("<h2>Batch changes (batch.adaptive; replay.yaml trains them again)</h2>")
        parts.append(table([batch_row(e) for e in moved]))
    parts.append("<h2>Spec</h2><pre>" + html.escape((run_dir / "spec.yaml").read_text()) + "</pre>")
    return _page(title, parts)


def smoothing_of(run_dir: Path, rows: list[ev.Row]) -> int:
    """The noise scale's time constant in samples: the adaptive batch's, else 20 first batches
    (the exporter's gauge: 0.95 per step)."""
    spec = yaml.safe_load((run_dir / "spec.yaml").read_text()) or {}
    adaptive = (spec.get("batch") or {}).get("adaptive") or {}
    return int(adaptive.get("smoothing_samples") or adaptive.get("every_samples") or 20 * rows[0].global_batch_size)


def batch_row(e: ev.BatchChange) -> dict[str, Any]:
    return {
        "after step": e.step,
        "from samples": f"{e.samples_seen:,}",
        "global batch": f"{e.previous} -> {e.global_batch_size}",
        "smoothed B_simple": f"{e.b_simple:.1f}",
        "peak lr factor": f"{e.lr_factor:.4g}",
    }


def render_search(tune_dir: Path) -> str:
    lineage = read_lineage(tune_dir)
    title = f"{lineage['job']} / {tune_dir.name}"
    parts = [f"<h1>Elastune search {html.escape(title)}</h1>"]
    best = lineage.get("best")
    generations = max((s["generation"] for s in lineage["segments"]), default=-1) + 1
    parts.append(
        table(
            [
                {
                    "members": len({s["member"] for s in lineage["segments"]}),
                    "intervals done": generations,
                    "of": len(lineage["boundaries"]),
                    "exploits": len(lineage["exploits"]),
                    "best": best["member"] if best else "-",
                    "best fitness": f"{best['fitness']:.4f}" if best else "-",
                }
            ]
        )
    )
    if lineage["segments"]:
        curves = {
            m: stitched(lineage, m)
            for m in sorted({s["member"] for s in lineage["segments"] if s["generation"] == generations - 1})
        }
        parts += _figures(
            [
                (
                    "Lineage: each member's intervals over samples; an arrow runs from donor to recipient at each exploit "
                    "(the best member's path is drawn thick)",
                    lineage_tree(lineage, best["member"] if best else None),
                ),
                ("Loss against samples seen, each member stitched along its lineage", stitched_plot(curves, "loss")),
                ("Learning rate against samples seen, each member stitched along its lineage", stitched_plot(curves, "lr")),
            ]
        )
    parts.append("<h2>Exploits</h2>")
    exploits = [
        {
            "after interval": e["generation"] + 1,
            "samples": e["samples"],
            "donor -> recipient": f"{e['donor']} -> {e['recipient']}",
            "fitness": f"{e['donor_fitness']:.4f} vs {e['recipient_fitness']:.4f}",
            "changes": ", ".join(f"{k} {a} -> {b}" for k, (a, b) in e["diff"].items()) or "none",
            "clone (ms)": f"{e['clone_seconds'] * 1e3:.1f}",
        }
        for e in lineage["exploits"]
    ]
    parts.append(table(exploits) if exploits else "<p>None.</p>")
    if best:
        parts.append("<h2>Best schedule</h2>")
        parts.append(table([{"from samples": h["from_samples"], **h["values"]} for h in best["history"]]))
        if (tune_dir / "best.yaml").is_file():
            parts.append(
                "<p>Replay it from scratch: <code>elastune run best.yaml</code></p><pre>"
                + html.escape((tune_dir / "best.yaml").read_text())
                + "</pre>"
            )
    return _page(title, parts)


def summary_row(summary: dict[str, Any], rows: list[ev.Row]) -> dict[str, Any]:
    return {
        "status": summary["status"],
        "steps": summary["steps"],
        "samples": rows[-1].samples_seen if rows else 0,
        "final loss": "-" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}",
        "held-out loss": "-" if summary["eval_loss"] is None else f"{summary['eval_loss']:.4f}",
        "failures survived": summary["failures"],
        "resizes": summary["resizes"],
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(summary["started"])),
    }


def change_row(e: ev.Change) -> dict[str, Any]:
    return {
        "kind": e.kind,
        "step": e.step,
        "cause": e.cause or "",
        "world size": f"{e.world_size_before} -> {e.world_size_after}",
        "lost steps": e.lost_steps,
        "MTTR (s)": "-" if e.mttr_seconds is None else f"{e.mttr_seconds:.2f}",
    }


# Where a run's report shows each event kind (None: not shown; the run directory has it).
# tests/unit/test_events.py holds every kind in events.KINDS to an entry here.
REPORT_SHOWS: dict[type[ev.Event], str | None] = {
    ev.Recovery: "world-size timeline (red) and the failures and resizes table",
    ev.Resize: "world-size timeline (blue) and the failures and resizes table",
    ev.Checkpoint: "snapshot stall and durable checkpoints plot",
    ev.Start: "world-size timeline (its time origin)",
    ev.BatchChange: "global batch and noise scale plot (its steps) and the batch changes table",
    **dict.fromkeys(
        (ev.Join, ev.Memory, ev.Leave, ev.Finish, ev.CollectiveFailed, ev.Fault, ev.FailurePolicy, ev.Preemption, ev.RunWarning),
        None,
    ),
    **dict.fromkeys(
        (ev.LeaseTakenOver, ev.Fresh, ev.DataPrepared, ev.Resume, ev.End, ev.Population, ev.Exploit, ev.Boundary), None
    ),
}


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


def loss_and_lr(rows: list[ev.Row]) -> str:
    plt, fig, ax = _figure()
    samples = [r.samples_seen for r in rows]
    ax.plot(samples, [r.loss for r in rows], color="#1f77b4", label="loss")
    evaluated = [(r.samples_seen - r.global_batch_size, r.eval_loss) for r in rows if r.eval_loss is not None]
    if evaluated:  # at the parameters each evaluating step started from
        ax.plot(*zip(*evaluated), "o-", color="#2ca02c", markersize=3, label="held-out loss")
        ax.legend(loc="upper right", fontsize="small")
    ax.set_xlabel("samples seen")
    ax.set_ylabel("loss", color="#1f77b4")
    lr = ax.twinx()
    lr.plot(samples, [r.lr for r in rows], color="#ff7f0e", label="learning rate")
    lr.set_ylabel("learning rate", color="#ff7f0e")
    return _svg(plt, fig)


def batch_and_noise(rows: list[ev.Row], tau: int) -> str:
    plt, fig, ax = _figure()
    samples = [r.samples_seen - r.global_batch_size for r in rows]  # each step's batch from where it started
    ax.step(samples, [r.global_batch_size for r in rows], where="post", color="#1f77b4", label="global batch")
    noise = [(s, b) for s, b in smoothed_noise_scale(rows, tau) if b is not None]
    if noise:
        ax.plot(*zip(*noise), color="#d62728", label="smoothed B_simple")
    ax.set_xlabel("samples seen")
    ax.set_ylabel("samples")
    ax.legend(loc="upper left", fontsize="small")
    return _svg(plt, fig)


def world_timeline(rows: list[ev.Row], events: list[ev.Event]) -> str:
    plt, fig, ax = _figure()
    t0 = events[0].time if events else rows[0].time
    ax.step([r.time - t0 for r in rows], [r.world_size for r in rows], where="post", color="#2ca02c", label="workers")
    for e in events:
        if isinstance(e, ev.Change):
            at = e.failed_at if e.failed_at is not None else e.time
            ax.axvline(at - t0, color="#d62728" if isinstance(e, ev.Recovery) else "#1f77b4", linestyle="--")
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("world size")
    ax.set_ylim(0, max(r.world_size for r in rows) + 1)
    return _svg(plt, fig)


def throughput(rows: list[ev.Row]) -> str:
    plt, fig, ax = _figure()
    ax.plot([r.step for r in rows], [r.samples_per_s or 0 for r in rows], color="#9467bd")
    ax.set_xlabel("step")
    ax.set_ylabel("samples/s")
    return _svg(plt, fig)


def checkpoints(rows: list[ev.Row], events: list[ev.Event]) -> str:
    plt, fig, ax = _figure()
    stalls = [(r.step, r.snapshot_stall_seconds * 1e3) for r in rows if r.snapshot_stall_seconds is not None]
    if stalls:
        ax.plot(*zip(*stalls), color="#8c564b", label="snapshot stall (ms)")
    ax.set_xlabel("step")
    ax.set_ylabel("snapshot stall (ms)")
    saves = [e for e in events if isinstance(e, ev.Checkpoint)]
    if saves:
        persist = ax.twinx()
        persist.bar([e.step for e in saves], [e.seconds for e in saves], color="#17becf", alpha=0.6, label="durable write (s)")
        persist.set_ylabel("durable write (s)")
    return _svg(plt, fig)


def render_branches(tune_dir: Path) -> str:
    """A wsd_branches search: the loss-vs-budget table and the trunk's and branches' curves."""
    record = json.loads((tune_dir / "branches.json").read_text())
    title = f"{record['job']} / {tune_dir.name}"
    parts = [f"<h1>Elastune WSD branches {html.escape(title)}</h1>"]
    done = sorted((b for b in record["branches"] if not b["error"]), key=lambda b: b["budget"])
    parts.append(
        table(
            [
                {
                    "budget (samples)": b["budget"],
                    "forked at": b["fork"],
                    "loss (last quarter of the decay)": f"{b['fitness']:.4f}",
                    "last step's loss": f"{b['loss']:.4f}",
                }
                for b in done
            ]
        )
        if done
        else "<p>No branch finished.</p>"
    )
    if "samples_trained" in record:
        parts.append(
            f"<p>{record['samples_trained']:,} samples trained: "
            f"{record['cost_vs_one_run']:.2f}x one run of the largest budget.</p>"
        )
    trunk = [r for t in record["trunk"] if t["run_dir"] for r in ev.read_rows(Path(t["run_dir"]))]
    curves = {"trunk": trunk, **{f"{b['budget']:,}": ev.read_rows(Path(b["run_dir"])) for b in done}}
    if trunk:
        parts += _figures(
            [
                ("Loss against samples seen: the trunk and each decay branch", stitched_plot(curves, "loss")),
                ("Learning rate against samples seen: the trunk and each decay branch", stitched_plot(curves, "lr")),
            ]
        )
    return _page(title, parts)


def lineage_tree(lineage: dict[str, Any], best: str | None) -> str:
    plt, fig, ax = _figure()
    members = sorted({s["member"] for s in lineage["segments"]}, key=lambda m: int(m[1:]) if m[1:].isdigit() else m)
    lane = {m: i for i, m in enumerate(members)}
    on_best = {(s["member"], s["generation"]) for s in path_of(lineage, best)} if best else set()
    for s in lineage["segments"]:
        thick = (s["member"], s["generation"]) in on_best
        ax.plot(
            [s["from_samples"], s["to_samples"]],
            [lane[s["member"]]] * 2,
            color="#d62728" if thick else "#1f77b4",
            linewidth=4 if thick else 1.5,
            solid_capstyle="butt",
        )
    for e in lineage["exploits"]:
        ax.annotate(
            "",
            xy=(e["samples"], lane[e["recipient"]]),
            xytext=(e["samples"], lane[e["donor"]]),
            arrowprops={"arrowstyle": "->", "color": "#2ca02c", "lw": 1.5},
        )
    ax.set_yticks(range(len(members)), members)
    ax.set_ylim(-0.5, len(members) - 0.5)
    ax.set_xlabel("samples seen")
    ax.set_ylabel("member")
    return _svg(plt, fig)


def stitched_plot(curves: dict[str, list[ev.Row]], key: str) -> str:
    plt, fig, ax = _figure()
    for member, rows in curves.items():
        shown = [r for r in rows if key != "lr" or r.lr > 0]  # lr on a log scale (peaks differ by orders of magnitude)
        ax.plot([r.samples_seen for r in shown], [getattr(r, key) for r in shown], label=member)
    ax.set_xlabel("samples seen")
    ax.set_ylabel("learning rate" if key == "lr" else key)
    if key == "lr":
        ax.set_yscale("log")
    if key == "loss":
        finite = [r.loss for rows in curves.values() for r in rows if r.loss == r.loss and abs(r.loss) < float("inf")]
        if finite:  # a diverged member must not squash everyone else's curve
            ax.set_ylim(min(finite) * 0.95, min(max(finite), 3 * sorted(finite)[len(finite) // 2]) * 1.05)
    ax.legend(loc="upper right", fontsize="small")
    return _svg(plt, fig)
