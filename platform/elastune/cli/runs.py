"""`elastune runs ls` (the runs under an output directory, a line each) and `elastune report`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from elastune.errors import ElastuneError


def add_parser(sub) -> None:
    runs = sub.add_parser("runs", help="list runs")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True)
    ls = runs_sub.add_parser(
        "ls",
        help="list the runs under an output directory",
        description="List runs: status, steps, final loss, the last held-out loss, failures survived.",
    )
    ls.add_argument("--output-dir", default="runs", help="the jobs' output_dir (default: runs)")
    ls.add_argument("--job", help="only this job's runs")
    ls.add_argument("--json", action="store_true", help="one JSON object per line, for scripts")
    ls.set_defaults(handler=cmd_ls)

    report = sub.add_parser(
        "report",
        help="write a run's HTML report",
        description="Write a self-contained HTML report of a run (plots inline, readable offline).",
    )
    report.add_argument("run_dir", help="the run directory (OUTPUT_DIR/JOB/RUN)")
    report.add_argument("--output", help="where to write it (default: RUN_DIR/report.html)")
    report.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from elastune.report import write_report

    out = write_report(Path(args.run_dir), Path(args.output) if args.output else None)
    print(f"Report: {out}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from elastune.train.run_dir import list_runs

    if not Path(args.output_dir).is_dir():
        raise ElastuneError(
            f"--output-dir {args.output_dir!r} is not a directory; give the output_dir your job specs use (default: runs)"
        )
    runs = [r for r in list_runs(args.output_dir) if args.job in (None, r["job"])]
    if args.json:
        for r in runs:
            print(json.dumps(r))
        return 0
    table = Table(box=None, header_style="bold")
    numbers = ("steps", "final loss", "eval loss", "failures", "resizes")
    for column in ("job", "run", "status", "steps", "final loss", "eval loss", "failures", "resizes", "started"):
        table.add_column(column, justify="right" if column in numbers else "left", no_wrap=True)
    for r in runs:
        loss = "-" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        held = "-" if r["eval_loss"] is None else f"{r['eval_loss']:.4f}"
        table.add_row(
            r["job"],
            r["run"],
            r["status"],
            str(r["steps"]),
            loss,
            held,
            str(r["failures"]),
            str(r["resizes"]),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started"])),
        )
    console = Console()
    if not console.is_terminal:  # piped: whole lines, not the 80 columns rich assumes
        console.width = 200
    console.print(table if runs else f"No runs under {args.output_dir}.")
    return 0
