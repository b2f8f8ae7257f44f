"""`elastune ckpt ls | show | verify | export | import | pin | prune | clear`: look at and look after checkpoints at any URI."""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from elastune.errors import CheckpointError, ElastuneError

if TYPE_CHECKING:
    from elastune.checkpoint.checkpointer import Checkpointer
    from elastune.checkpoint.format import Manifest

# The checkpoint modules import torch: each command imports them when it runs, so that the CLI
# (and `--help`) starts in a fraction of a second.

EXIT_VALID, EXIT_CORRUPT, EXIT_NOT_A_CHECKPOINT = 0, 1, 2


def add_parser(sub) -> None:
    ckpt = sub.add_parser("ckpt", help="list, show, verify and prune checkpoints")
    cmds = ckpt.add_subparsers(dest="ckpt_command", required=True)
    ls = cmds.add_parser("ls", help="table of the checkpoints under a URI")
    ls.add_argument("uri", help="checkpoint root: a path or file://, s3://, gs://, hdfs:// URI")
    ls.set_defaults(handler=cmd_ls)
    show = cmds.add_parser("show", help="what a checkpoint holds (newest under a root, or ROOT/step-N)")
    show.add_argument("ckpt")
    show.add_argument("--json", action="store_true", help="print the manifest as JSON")
    show.set_defaults(handler=cmd_show)
    verify = cmds.add_parser("verify", help="read every byte and check it: exit 0 valid, 1 corrupt, 2 not a checkpoint")
    verify.add_argument("ckpt")
    verify.set_defaults(handler=cmd_verify)
    export = cmds.add_parser("export", help="write a checkpoint as one safetensors model file, a torch file or a DCP folder")
    export.add_argument("ckpt", help="ROOT/step-N, or a root for its newest checkpoint")
    export.add_argument("--format", choices=["safetensors", "torch", "dcp"], required=True)
    export.add_argument("out", help="file to write (a folder for dcp)")
    export.set_defaults(handler=cmd_export)
    imp = cmds.add_parser("import", help="turn a torch.distributed.checkpoint folder into a universal checkpoint")
    imp.add_argument("dcp_dir", help="a DCP folder (holding .metadata)")
    imp.add_argument("out", help="checkpoint root to write into: a path or file://, s3://, gs://, hdfs:// URI")
    imp.set_defaults(handler=cmd_import)
    pin = cmds.add_parser("pin", help="keep a checkpoint through every prune (or --unpin)")
    pin.add_argument("ckpt", help="ROOT/step-N, or a root for its newest checkpoint")
    pin.add_argument("--unpin", action="store_true")
    pin.set_defaults(handler=cmd_pin)
    prune = cmds.add_parser("prune", help="delete all but the newest K committed checkpoints (pinned and referenced ones stay)")
    prune.add_argument("uri")
    prune.add_argument("--keep-last", type=int, required=True, help="how many newest checkpoints to keep (>= 1)")
    prune.set_defaults(handler=cmd_prune)
    clear = cmds.add_parser(
        "clear", help="delete every checkpoint under a root, pinned ones too (a deleted ElastuneJob's deleteOnFinish)"
    )
    clear.add_argument("uri")
    clear.add_argument("--yes", action="store_true", help="required: there is no undo")
    clear.set_defaults(handler=cmd_clear)


def _open(ckpt_uri: str) -> tuple[Checkpointer, Manifest, str]:
    """The checkpoint CKPT names, with its folder under the root: ROOT/step-N, the newest under
    ROOT, or a checkpoint folder under any name (a copy: it holds manifest.json)."""
    import posixpath

    from elastune.checkpoint.checkpointer import locate
    from elastune.checkpoint.format import MANIFEST, Manifest, step_dir

    root, step = locate(ckpt_uri)
    ckpt = _root(root)
    if step is not None:
        if not ckpt.storage.exists(f"{step_dir(step)}/{MANIFEST}"):
            raise ElastuneError(
                f"{ckpt_uri} is not a committed checkpoint: {MANIFEST} is missing (an interrupted save leaves exactly this)"
            )
        found = ckpt, ckpt.read_manifest(step), step_dir(step)
    elif steps := ckpt.committed_steps():
        found = ckpt, ckpt.read_manifest(steps[-1]), step_dir(steps[-1])
    elif ckpt.storage.exists(MANIFEST):  # the checkpoint folder itself, whatever its name
        parent, name = posixpath.split(ckpt_uri.rstrip("/"))
        outer = _root(parent or ".")
        found = outer, Manifest.from_json(outer.storage.read_bytes(f"{name}/{MANIFEST}"), ckpt_uri), name
    else:
        raise ElastuneError(
            f"{ckpt_uri} holds no committed checkpoint (no step-*/{MANIFEST}); give a checkpoint root or ROOT/step-N"
        )
    found[0].source(found[1], found[2])  # its files are where they may be, or it is corrupt
    return found


def _root(uri: str) -> Checkpointer:
    from elastune.checkpoint.checkpointer import Checkpointer

    ckpt = Checkpointer(uri)
    ckpt.storage.probe()
    if not ckpt.storage.root_exists():
        raise ElastuneError(f"{uri} does not exist; give a checkpoint root (a run's checkpoint.path) or ROOT/step-N")
    return ckpt


def cmd_ls(args: argparse.Namespace) -> int:
    from elastune.checkpoint.checkpointer import PINNED
    from elastune.checkpoint.format import step_dir

    ckpt = _root(args.uri)
    table = Table(title=f"checkpoints at {args.uri}")
    for column in ("step", "samples", "time", "size", "layout", "valid"):
        table.add_column(column, justify="right" if column in ("step", "samples", "size") else "left")
    for step in ckpt.committed_steps():
        try:
            m = ckpt.read_manifest(step)
            files = ckpt.source(m, step_dir(step)).paths.values()  # each checked to be where it may be
            valid = "yes" if all(ckpt.storage.exists(f) for f in files) else "no: payload missing"
        except CheckpointError as exc:
            table.add_row(str(step), "?", "?", "?", "?", f"no: {exc}")
            continue
        created = m.meta.get("created")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) if isinstance(created, (int, float)) else "?"
        layout = f"{m.layout.get('kind')} x{m.layout.get('world_size')}"
        if ckpt.storage.exists(f"{step_dir(step)}/{PINNED}"):
            layout += ", pinned"
        table.add_row(str(m.step), f"{m.samples_seen:,}", when, f"{m.nbytes / 1e6:.2f} MB", layout, valid)
    console = Console()
    if not console.is_terminal:  # piped: do not fold cells to a guessed 80 columns
        console = Console(width=200)
    console.print(table)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    ckpt, m, folder = _open(args.ckpt)
    if args.json:
        print(m.to_json().decode(), end="")
        return 0
    print(f"checkpoint {ckpt.uri}/{folder}")
    print(f"  step {m.step}, samples_seen {m.samples_seen:,}, spec hash {m.spec_hash}, layout {json.dumps(m.layout)}")
    for key in ("job", "optimizer", "schedule", "batch", "rng", "dataset", "sources"):
        if key in m.meta:
            print(f"  {key}: {json.dumps(m.meta[key], sort_keys=True)}")
    print(f"  {len(m.tensors)} tensors, {m.nbytes / 1e6:.2f} MB")
    for name in sorted(m.tensors):
        e = m.tensors[name]
        print(f"    {name}  {e['dtype']} {e['shape']}  in {', '.join(f['file'] for f in e['fragments'])}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 only when every rule of the manifest holds and every byte a load would return was
    read and matched its checksum; 1 with the reason otherwise; 2 when there is no checkpoint."""
    try:
        ckpt, m, folder = _open(args.ckpt)
    except CheckpointError as exc:  # a manifest that breaks a rule: a checkpoint, and a corrupt one
        print(f"CORRUPT: {exc}")
        return EXIT_CORRUPT
    except ElastuneError as exc:
        print(f"not a checkpoint: {exc}")
        return EXIT_NOT_A_CHECKPOINT
    try:
        tensors = ckpt.load(m, folder=folder)
    except CheckpointError as exc:
        print(f"CORRUPT: {exc}")
        return EXIT_CORRUPT
    print(f"valid: {ckpt.uri}/{folder}: {len(tensors)} tensors, {m.nbytes:,} bytes, every checksum matches")
    return EXIT_VALID


def cmd_export(args: argparse.Namespace) -> int:
    from elastune.checkpoint.export import export

    ckpt, m, folder = _open(args.ckpt)
    counts = export(ckpt, m, args.format, args.out, folder)
    print(
        f"exported step {m.step} ({counts['model']} model, {counts['optimizer']} "
        f"optimizer tensors) to {args.out} as {args.format}"
    )
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from elastune.checkpoint.checkpointer import Checkpointer
    from elastune.checkpoint.dcp import import_dcp
    from elastune.checkpoint.format import step_dir

    out = Checkpointer(args.out, keep_last=10**9)  # importing never prunes what is already there
    manifest, skipped = import_dcp(args.dcp_dir, out)
    note = (
        f"; skipped {skipped} non-tensor entr{'y' if skipped == 1 else 'ies'} (pickled values are never loaded)"
        if skipped
        else ""
    )
    print(f"imported {len(manifest.tensors)} tensors as {out.uri}/{step_dir(manifest.step)} (step {manifest.step}){note}")
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    from elastune.checkpoint.format import step_dir

    ckpt, m, folder = _open(args.ckpt)
    if folder != step_dir(m.step):
        raise ElastuneError(f"{args.ckpt} is a checkpoint folder outside any root's step-N; pin checkpoints in their root")
    ckpt.pin(m.step, pinned=not args.unpin)
    print(f"{'unpinned' if args.unpin else 'pinned'} {ckpt.uri}/{folder}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from elastune.checkpoint.retention import RetentionPolicy

    if args.keep_last < 1:
        raise ElastuneError(f"--keep-last {args.keep_last} would delete every checkpoint; give a number >= 1")
    ckpt = _root(args.uri)
    ckpt.policy = RetentionPolicy(keep_last=args.keep_last)
    deleted = ckpt.prune()
    print(
        f"deleted {len(deleted)} "
        f"checkpoint(s){': steps ' + ', '.join(map(str, deleted)) if deleted else ''}; kept the newest {args.keep_last}"
    )
    for note in ckpt.notes:
        print(f"note: {note}")
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    from elastune.checkpoint.lease import Lease, this_process

    if not args.yes:
        raise ElastuneError(
            f"ckpt clear deletes every checkpoint under {args.uri}, pinned ones too, with no undo; add --yes to do it"
        )
    ckpt = _root(args.uri)
    # The root's lease, as a run takes it: a root a live run holds is refused (LeaseHeld), never cleared under it.
    lease = Lease(ckpt.storage, this_process("ckpt-clear", "ckpt-clear"))
    lease.acquire()
    try:
        print(f"deleted {ckpt.clear()} checkpoint(s) under {args.uri}")
        for note in ckpt.notes:
            print(f"note: {note}")
    finally:
        lease.release()
    return 0
