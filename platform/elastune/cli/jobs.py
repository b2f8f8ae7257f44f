"""`elastune submit | status | logs | stop | list`: Elastune jobs on a Ray cluster, through the Ray
Jobs API, keyed by a submission id (`--name`, idempotent).

Exit codes: 0 the job succeeded (or the command did its work), 1 the job failed or was stopped
(the driver's own exit code is printed), 2 bad input, 3 no Ray Jobs API answers at the address,
4 the cluster refused the credentials. Ctrl-C while following detaches: the job keeps running.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_FAILED = 0, 1  # 2, 3 and 4 are the errors' own (errors.py)


def add_parser(sub) -> None:
    address = argparse.ArgumentParser(add_help=False)
    address.add_argument(
        "--address",
        help="the cluster's Ray Jobs API, e.g. http://HOST:8265 (default: RAY_API_SERVER_ADDRESS, "
        "an http RAY_ADDRESS, else http://127.0.0.1:8265); wins over both",
    )
    address.add_argument("--json", action="store_true", help="print JSON for scripts instead of text")

    submit = sub.add_parser(
        "submit",
        parents=[address],
        help="submit a job to a Ray cluster (Ray Jobs API) and follow it",
        description="Submit JOB to the Ray cluster at --address. The entrypoint runs `elastune run JOB` there; "
        "the job's folder and this elastune package travel with it. Follows the logs to the end "
        "unless --no-wait; Ctrl-C detaches.",
    )
    submit.add_argument("job", help="job spec YAML")
    submit.add_argument(
        "--name",
        help="submission id (default: JOBNAME-TIME); submitting the same spec under the same name again "
        "finds the existing job instead of starting another",
    )
    submit.add_argument("--no-wait", action="store_true", help="return once submitted")
    submit.add_argument("--dry-run", action="store_true", help="print what would be submitted; contact nothing")
    submit.add_argument(
        "--working-dir", default=".", help="folder that travels with the job (default: the current one); holds the spec"
    )
    submit.add_argument(
        "--exclude", action="append", default=[], metavar="PATTERN", help="also leave these out of the upload (gitignore style)"
    )
    submit.add_argument(
        "--include-secret",
        action="append",
        default=[],
        metavar="PATTERN",
        help="send the files matching PATTERN (gitignore style) that the secret rules keep back (.env, keys, cloud "
        "credentials: docs/cluster.md); a warning names each one",
    )
    submit.set_defaults(handler=cmd_submit)

    status = sub.add_parser("status", parents=[address], help="a submitted job's status and the driver's exit code")
    status.add_argument("id", help="submission id")
    status.set_defaults(handler=cmd_status)

    logs = sub.add_parser("logs", parents=[address], help="a submitted job's logs")
    logs.add_argument("id", help="submission id")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends (Ctrl-C detaches)")
    logs.set_defaults(handler=cmd_logs)

    stop = sub.add_parser("stop", parents=[address], help="stop a submitted job (its checkpoints stay)")
    stop.add_argument("id", help="submission id")
    stop.set_defaults(handler=cmd_stop)

    jobs = sub.add_parser("list", parents=[address], help="the jobs submitted to the cluster")
    jobs.set_defaults(handler=cmd_list)


def _address(args: argparse.Namespace):
    from elastune.submit.address import resolve_address

    return resolve_address(args.address, os.environ)


def _client(args: argparse.Namespace, address=None):
    from elastune.submit.client import JobsClient

    return JobsClient(address or _address(args))


def _say(args: argparse.Namespace, text: str) -> None:
    """Progress lines: to stderr under --json, so stdout stays one JSON document."""
    print(text, file=sys.stderr if args.json else sys.stdout, flush=True)


def cmd_submit(args: argparse.Namespace) -> int:
    from elastune.spec import load_spec
    from elastune.submit.client import token_warning
    from elastune.submit.package import build_submission
    from elastune.train.run_dir import new_run_id

    spec = load_spec(args.job)  # a bad spec stops here, with the spec's own error, before any contact
    submission = build_submission(spec, Path(args.job), Path(args.working_dir), args.exclude, args.include_secret)
    address = _address(args)
    name = args.name or f"{spec.name}-{new_run_id()}"
    upload = submission.upload
    plan = {
        "address": address.url,
        "address_from": address.source,
        "submission_id": name,
        "entrypoint": submission.entrypoint,
        "runtime_env": submission.runtime_env,
        "metadata": submission.metadata,
        "upload": {
            "files": submission.upload_files,
            "bytes": submission.upload_bytes,
            "listing": [{"path": path, "bytes": size} for path, size in upload.files],  # largest first
            "kept_back": upload.kept_back,
            "secrets_sent": upload.secrets_sent,
        },
    }
    for warning in submission.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.dry_run:
        if clear := token_warning(address):  # what JobsClient would warn on the real submission
            print(f"warning: {clear}", file=sys.stderr)
        print(json.dumps(plan, indent=2) if args.json else _describe_plan(plan))
        return EXIT_OK
    client = _client(args, address)
    view, submitted = client.submit(name, submission)
    _say(
        args,
        f"{'Submitted' if submitted else 'Already submitted (same spec)'} {name} to {address.describe()}: "
        f"{submission.upload_files} files, {submission.upload_bytes / 1024**2:.1f} MiB.",
    )
    if args.no_wait:
        _say(args, _follow_up(name, address.url))
        if args.json:
            print(json.dumps(view.to_dict(), indent=2))
        return EXIT_OK
    return _follow(args, client, name)


def cmd_status(args: argparse.Namespace) -> int:
    view = _client(args).view(args.id)
    if args.json:
        print(json.dumps(view.to_dict(), indent=2))
    else:
        print(_describe(view))
    return _exit_code(view)


def cmd_logs(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.follow:
        return _follow(args, client, args.id)
    print(client.logs(args.id), end="")
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    client = _client(args)
    stopped = client.stop(args.id)
    view = client.view(args.id)
    _say(
        args,
        f"{'Stopping' if stopped else 'Not running'}: {args.id} ({view.status}). Its checkpoints stay; submitting the "
        f"same job again resumes from the newest.",
    )
    if args.json:
        print(json.dumps(view.to_dict(), indent=2))
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    client = _client(args)
    views = client.list()
    if args.json:
        print(json.dumps([v.to_dict() for v in views], indent=2))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"jobs at {client.address.describe()}")
    for column in ("submission id", "status", "job", "started", "ended", "exit code"):
        table.add_column(column)
    for v in views:
        table.add_row(
            v.submission_id,
            v.status,
            v.job or "-",
            _when(v.start_time),
            _when(v.end_time),
            "-" if v.driver_exit_code is None else str(v.driver_exit_code),
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(table)
    return EXIT_OK


def _follow(args: argparse.Namespace, client, name: str) -> int:
    try:
        view = client.follow(name, lambda chunk: print(chunk, end="", file=sys.stderr if args.json else sys.stdout, flush=True))
    except KeyboardInterrupt:
        _say(args, f"\nDetached; {name} keeps running. {_follow_up(name, client.address.url)}")
        return EXIT_OK
    _say(args, _describe(view))
    if args.json:
        print(json.dumps(view.to_dict(), indent=2))
    return _exit_code(view)


def _exit_code(view) -> int:
    return EXIT_FAILED if view.status in ("FAILED", "STOPPED") else EXIT_OK


def _describe(view) -> str:
    line = f"{view.submission_id}: {view.status}"
    if view.job:
        line += f" (job {view.job})"
    if view.driver_exit_code is not None:
        line += f"; the driver exited with code {view.driver_exit_code}"
    if view.status in ("FAILED", "STOPPED") and view.message:
        line += f"\n  {view.message}"
    return line


def _follow_up(name: str, url: str) -> str:
    where = f" --address {url}"
    return (
        f"Follow: elastune logs {name} --follow{where} | status: elastune status {name}{where} | "
        f"stop: elastune stop {name}{where}"
    )


def _describe_plan(plan: dict) -> str:
    from elastune.submit.package import SECRET_EXCLUDES

    env, upload = plan["runtime_env"], plan["upload"]
    lines = [
        f"Would submit {plan['submission_id']} to {plan['address']} (from {plan['address_from']}):",
        f"  entrypoint   {plan['entrypoint']}",
        f"  working_dir  {env['working_dir']} ({upload['files']} files, {_size(upload['bytes'])})",
        f"  py_modules   {', '.join(env['py_modules'])}",
        f"  excludes     {', '.join(e for e in env['excludes'] if e not in SECRET_EXCLUDES and not e.startswith('!'))}",
        f"  secrets      {', '.join(SECRET_EXCLUDES)} (never travel unless --include-secret names them)",
        f"  env_vars     {', '.join(f'{k}={v}' for k, v in env['env_vars'].items())}",
        f"  metadata     {', '.join(sorted(plan['metadata']))}",
        f"Travels ({upload['files']} files, {_size(upload['bytes'])}; largest first):",
        *(f"  {_size(f['bytes']):>10}  {f['path']}" for f in upload["listing"]),
    ]
    if upload["kept_back"]:
        kept = sum(len(files) for files in upload["kept_back"].values())
        plural = "s" if kept > 1 else ""
        lines.append(f"Kept back by the secret rules ({kept} file{plural}; --include-secret PATTERN sends one anyway):")
        width = max(map(len, upload["kept_back"]))
        lines += [f"  {pattern:<{width}}  {len(files)}: {', '.join(files)}" for pattern, files in upload["kept_back"].items()]
    if upload["secrets_sent"]:
        lines.append(f"Sent anyway (--include-secret): {', '.join(upload['secrets_sent'])}")
    return "\n".join(lines)


def _size(num_bytes: float) -> str:
    """Human bytes: 999 B, 1.5 KiB, 12.0 MiB, 1.2 GiB."""
    if num_bytes < 1024:
        return f"{num_bytes:.0f} B"
    for unit in ("KiB", "MiB"):
        num_bytes /= 1024
        if num_bytes < 1024:
            return f"{num_bytes:.1f} {unit}"
    return f"{num_bytes / 1024:.1f} GiB"


def _when(seconds: float | None) -> str:
    return "-" if seconds is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))
