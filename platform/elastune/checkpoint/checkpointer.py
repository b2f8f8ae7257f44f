"""Durable (tier 1) checkpoints: save from any ranks and layout, load any slices, keep, clone, prune.

Save: each rank writes what it holds and owns (layout.pieces_to_write: replicated tensors split
among ranks, sharded slices by their holder), in parallel, nothing twice; rank 0 gathers the
fragment entries and commits the manifest last. A save that fails removes what it wrote. Load:
the newest checkpoint whose manifest passes its checks (format.check_manifest), whose files stay
where they may (its own folder, or a committed folder of a clone source it names) and whose blocks
pass their checksums; a corrupt one is reported by file and tensor, and the previous one is used.

Deleting (prune, clear) removes only what Elastune writes (manifests, payloads, markers, a torn
save's leftovers) from folders named like checkpoints, never through a symlink; a folder holding
anything else is left, and said so.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import posixpath
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from elastune.checkpoint.format import (
    BLOCK_BYTES,
    DURABLE_CHECKSUM,
    MANIFEST,
    Manifest,
    PayloadPlan,
    Piece,
    merge_entries,
    numel,
    parse_step_dir,
    payload_file,
    resolve_file,
    step_dir,
    with_digests,
)
from elastune.checkpoint.layout import pieces_to_write
from elastune.checkpoint.payload import StorageSource, digests_of, read_pieces
from elastune.checkpoint.retention import CheckpointInfo, RetentionPolicy, decide_retention
from elastune.checkpoint.storage import Storage
from elastune.errors import CheckpointError, ElastuneError, StorageError

log = logging.getLogger(__name__)

PINNED = "PINNED"
REFERRERS = "referrers"
MAX_MANIFEST_BYTES = 256 * 2**20
# What Elastune itself writes into a step folder: the only files prune and clear delete.
OWN_FILES = re.compile(rf"^(rank-\d{{5,}}-of-\d{{5,}}\.safetensors(\.tmp)?|{re.escape(MANIFEST)}(\.tmp)?|{PINNED})$")
MARKER_FILE = re.compile(r"^[0-9a-f]{16}\.json(\.tmp)?$")

Gather = Callable[[str], list[str]]  # every rank's string, in rank order (an all-gather)
ReadPieces = Callable[[dict[str, tuple[int, int]]], dict[str, torch.Tensor]]  # wanted ranges -> flat tensors


def all_gather(payload: str) -> list[str]:
    """Every rank's string over the default process group; just this one without one."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [payload]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, payload)
    return out


def locate(uri: str) -> tuple[str, int | None]:
    """Split 'ROOT/step-000000120' into (ROOT, 120); a bare root gives (ROOT, None)."""
    head, _, last = uri.rstrip("/").rpartition("/")
    step = parse_step_dir(last)
    return (head, step) if step is not None and head else (uri, None)


def out_of_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class SaveReport:
    """What a synchronous save cost: bytes and seconds each rank spent writing its share and the
    seconds until rank 0 committed the manifest. (Training saves through the checkpoint service,
    service.py, where workers only wait for an in-memory copy.)"""

    manifest: Manifest
    rank_bytes: list[int]
    rank_seconds: list[float]
    commit_seconds: float


class Checkpointer:
    def __init__(self, uri: str, keep_last: int = 3, policy: RetentionPolicy | None = None):
        self.storage = Storage.from_uri(uri)
        self.policy = policy or RetentionPolicy(keep_last=keep_last)
        self.skipped: list[str] = []  # corrupt checkpoints the last load_latest_valid passed over
        self.notes: list[str] = []  # what the last prune or clear left alone, and why

    @property
    def uri(self) -> str:
        return self.storage.uri

    # ------------------------------------------------------------------ save

    def save(
        self,
        manifest: Manifest,
        state: Mapping[str, Piece | torch.Tensor],
        rank: int = 0,
        world_size: int = 1,
        gather: Gather = all_gather,
    ) -> SaveReport | None:
        """Write this rank's share synchronously; rank 0 commits the manifest and reports (others: None).

        `state` is what this rank holds: Pieces (see format.py), or plain tensors meaning whole
        replicated ones. `manifest.layout["kind"]` names the training layout; world_size is added.
        """
        started = time.perf_counter()
        held = {n: v if isinstance(v, Piece) else Piece.whole(v) for n, v in state.items()}
        mine = pieces_to_write(held, rank, world_size)
        file = payload_file(rank, world_size)
        folder = step_dir(manifest.step)
        entries, written = {}, 0
        if rank == 0:
            self.begin(manifest.step)
        if mine:
            plan, buffer = pack(mine)
            entries = seal(plan, mine, buffer, file)
            try:
                self.storage.write_bytes(f"{folder}/{file}", buffer.numpy())
            except BaseException:
                self.abandon(manifest.step, [file])
                raise
            written = plan.size
        mine_report = {"entries": entries, "bytes": written, "seconds": time.perf_counter() - started}
        everyone = [json.loads(part) for part in gather(json.dumps(mine_report))]
        if rank != 0:
            return None
        try:
            self.commit(manifest, [part["entries"] for part in everyone], world_size)
        except BaseException:
            self.abandon(manifest.step, files_of(part["entries"] for part in everyone))
            raise
        committed_s = time.perf_counter() - started
        self.prune()
        return SaveReport(
            manifest=manifest,
            rank_bytes=[part["bytes"] for part in everyone],
            rank_seconds=[round(part["seconds"], 6) for part in everyone],
            commit_seconds=round(committed_s, 6),
        )

    def begin(self, step: int) -> None:
        """Before a step's payloads are written: a manifest already there (a checkpoint the run
        resumed past because it failed its checks) goes first, so a crash mid-write never leaves
        it naming half-rewritten payloads."""
        if self.storage.exists(f"{step_dir(step)}/{MANIFEST}"):
            log.warning("Replacing checkpoint %s/%s, which a resume passed over as corrupt", self.uri, step_dir(step))
            self.storage.delete_file(f"{step_dir(step)}/{MANIFEST}")

    def commit(self, manifest: Manifest, parts: list[dict], world_size: int) -> None:
        """Make a checkpoint exist once every rank's payload is written: its manifest goes last.
        (Retention is the caller's next step: `prune`.)"""
        folder = step_dir(manifest.step)
        manifest.tensors = merge_entries(parts, f"{self.uri}/{folder}")
        manifest.layout = {"kind": manifest.layout.get("kind", "replicated"), "world_size": world_size}
        manifest.meta.setdefault("created", time.time())
        self.storage.sync_dir(folder)  # the payloads' entries are durable before the manifest names them
        self.storage.commit_bytes(f"{folder}/{MANIFEST}", manifest.to_json())

    def abandon(self, step: int, files) -> None:
        """A save of `step` that failed: remove the files it wrote (and the folder, once empty), so
        a failed attempt leaves nothing behind to fill the store."""
        folder = step_dir(step)
        for name in [*files, f"{MANIFEST}.tmp"]:
            try:
                self.storage.delete_file(f"{folder}/{name}")
            except OSError as exc:  # the store may be what failed; say so, keep the first error
                log.warning("Could not remove %s/%s/%s after a failed save: %s", self.uri, folder, name, exc)
        try:
            self.storage.remove_empty_dir(folder)
        except OSError:
            pass

    def prune(self, policy: RetentionPolicy | None = None) -> list[int]:
        """Apply the retention policy (retention.py), or `policy`; delete the rest, and the leftovers
        of torn saves below the newest checkpoint (no save of theirs can still commit)."""
        self.notes = []
        steps = self.committed_steps()
        decision = decide_retention([self.info(step) for step in steps], policy or self.policy)
        deleted = [step for step in decision.delete if self._delete(step_dir(step))]
        newest = steps[-1] if steps else None
        for name in self.storage.list_dirs():
            step = parse_step_dir(name)
            if step is not None and newest is not None and step < newest and step not in steps:
                self._delete(name)
        return deleted

    def make_room(self) -> list[int]:
        """Out of space: delete what retention may give up while the newest checkpoint stays (every
        one but the newest, except pinned ones, the best kept by keep_best, and what clones read)."""
        p = self.policy
        return self.prune(RetentionPolicy(keep_last=1, keep_best=p.keep_best, best_metric=p.best_metric, best_mode=p.best_mode))

    def _delete(self, folder: str) -> bool:
        """Delete what Elastune wrote in a step folder: the manifest first (a half-deleted
        checkpoint never loads as valid), then payloads, pins and markers; the folder goes once
        empty. Anything else stays, and is reported. Whether the folder is gone."""
        if self.storage.is_link(folder):
            self.notes.append(f"{folder} is a symlink; left it alone")
            return False
        self.storage.delete_file(f"{folder}/{MANIFEST}")
        for name in self.storage.list_files(f"{folder}/{REFERRERS}"):
            if MARKER_FILE.match(name):
                self.storage.delete_file(f"{folder}/{REFERRERS}/{name}")
        self.storage.remove_empty_dir(f"{folder}/{REFERRERS}")
        for name in self.storage.list_files(folder):
            if OWN_FILES.match(name):
                self.storage.delete_file(f"{folder}/{name}")
        if self.storage.remove_empty_dir(folder):
            return True
        left = ", ".join(self.storage.entries(folder)[:5])
        self.notes.append(f"{folder} holds files Elastune did not write ({left}); left them and the folder")
        return False

    def info(self, step: int) -> CheckpointInfo:
        """What retention needs to know of a checkpoint; an unreadable manifest counts as plain."""
        pinned = self.storage.exists(f"{step_dir(step)}/{PINNED}")
        try:
            manifest = self.read_manifest(step)
        except CheckpointError:
            return CheckpointInfo(step, pinned=pinned)
        refs = set()
        for entry in manifest.tensors.values():
            for frag in entry["fragments"]:
                parts = resolve_file(step_dir(step), frag["file"]).split("/")
                if len(parts) == 2 and (ref := parse_step_dir(parts[0])) is not None and ref != step:
                    refs.add(ref)
        metrics = {k: float(v) for k, v in manifest.meta.get("metrics", {}).items() if isinstance(v, (int, float))}
        return CheckpointInfo(
            step, metrics=metrics, pinned=pinned, references=frozenset(refs), referenced_elsewhere=self._live_referrer(step)
        )

    def _live_referrer(self, step: int) -> str | None:
        """A clone in another root that still exists and reads this checkpoint's payloads.

        Clones across roots leave a marker in each source (`referrers/<id>.json`: the clone's
        root and step); a marker whose clone is gone no longer protects anything. A marker that is
        not one (unreadable, not {uri, step}, a URI no store serves) is reported and ignored; one
        whose store cannot be reached now keeps protecting (the clone may well be alive).
        """
        folder = f"{step_dir(step)}/{REFERRERS}"
        for name in self.storage.list_files(folder):
            try:
                ref = json.loads(self.storage.read_range(f"{folder}/{name}", 0, min(4096, self._size(f"{folder}/{name}"))))
                if not (
                    isinstance(ref, dict)
                    and isinstance(ref.get("uri"), str)
                    and type(ref.get("step")) is int
                    and ref["step"] >= 0
                ):
                    raise ValueError("not a {uri, step} record")
                other = Storage.from_uri(ref["uri"])
            except (ValueError, CheckpointError, StorageError) as exc:
                self.notes.append(f"ignored the referrer marker {self.uri}/{folder}/{name}: {str(exc)[:200]}")
                continue
            where = f"{ref['uri']}/{step_dir(ref['step'])}"
            try:
                if other.exists(f"{step_dir(ref['step'])}/{MANIFEST}"):
                    return where
            except OSError as exc:
                self.notes.append(f"kept step {step}: its referrer {where} cannot be checked now ({str(exc)[:200]})")
                return where
        return None

    def pin(self, step: int, pinned: bool = True) -> None:
        """Pinned checkpoints survive every prune (a `PINNED` marker beside the manifest)."""
        if pinned:
            self.storage.write_bytes(f"{step_dir(step)}/{PINNED}", b"")
        else:
            self.storage.delete_file(f"{step_dir(step)}/{PINNED}")

    def clone(
        self, step: int, dst: Checkpointer | None = None, dst_step: int | None = None, meta: dict | None = None
    ) -> Manifest:
        """A new checkpoint in `dst` (default: here) whose fragments point at this one's payloads.

        No payload byte is copied: the new manifest's fragment files are paths relative to its own
        folder ("../step-000000120/rank-00000-of-00002.safetensors"), and `meta.sources` names
        every checkpoint they read. Retention keeps a source while a clone references it, in the
        same root or (through a marker in the source) in another.
        """
        dst = dst or self
        if type(dst.storage.fs) is not type(self.storage.fs):
            raise CheckpointError(f"cannot clone {self.uri} into {dst.uri}: a clone across filesystems would copy bytes")
        src = self.read_manifest(step)
        target = dst_step if dst_step is not None else step
        if dst is self and target == step:
            raise CheckpointError(f"clone of step {step} into the same root needs another dst_step")
        src_folder = self.storage.path(step_dir(step))
        dst_folder = dst.storage.path(step_dir(target))
        tensors = {
            name: {
                **entry,
                "fragments": [
                    {**f, "file": posixpath.relpath(resolve_file(src_folder, f["file"]), dst_folder)} for f in entry["fragments"]
                ],
            }
            for name, entry in src.tensors.items()
        }
        own = any("/" not in f["file"] for e in src.tensors.values() for f in e["fragments"])
        sources = ([{"uri": self.location, "step": step}] if own else []) + list(src.sources)
        clone = Manifest(
            step=target,
            samples_seen=src.samples_seen,
            spec_hash=src.spec_hash,
            layout=src.layout,
            tensors=tensors,
            meta={
                **src.meta,
                **(meta or {}),
                "cloned_from": {"uri": self.location, "step": step},
                "sources": sources,
                "created": time.time(),
            },
        )
        for source in sources:  # each source's retention cannot see the other root: leave it a marker first
            home = Storage.from_uri(source["uri"])
            if home.root != dst.storage.root:
                marker = hashlib.sha256(f"{dst.location}|{target}".encode()).hexdigest()[:16]
                record = json.dumps({"uri": dst.location, "step": target}).encode()
                home.commit_bytes(f"{step_dir(source['step'])}/{REFERRERS}/{marker}.json", record)
        dst.begin(target)
        dst.storage.commit_bytes(f"{step_dir(target)}/{MANIFEST}", clone.to_json())
        return clone

    def adopt(self, donor_uri: str, step: int, meta: dict | None = None) -> Manifest:
        """A search member exploits the donor at a boundary: this root gets a clone of the donor's
        checkpoint of `step` and keeps none of its own older lineage but what other clones read
        (its step numbers may run past the donor's: they must not look newer). A clone of the
        same source already here is kept, so a decision carried out again changes nothing."""
        donor = Checkpointer(donor_uri)
        clone = None
        if step in self.committed_steps():
            here = self.read_manifest(step)
            clone = here if here.meta.get("cloned_from") == {"uri": donor.location, "step": step} else None
        clone = clone or donor.clone(step, self, meta=meta)
        others = [self.info(s) for s in self.committed_steps() if s != clone.step]
        for old in decide_retention(others, RetentionPolicy(keep_last=0)).delete:
            self._delete(step_dir(old))
        return clone

    @property
    def location(self) -> str:
        """This root as a URI any process can open: an absolute path on local disks."""
        return self.storage.root if self.storage.is_local else self.uri

    def clear(self) -> int:
        """Delete every checkpoint here (for --fresh, `ckpt clear`); returns how many committed
        ones went. Torn saves go too; what Elastune did not write stays (`notes` says what)."""
        self.notes = []
        steps = set(self.committed_steps())
        gone = 0
        for name in self.storage.list_dirs():
            step = parse_step_dir(name)
            if step is not None and self._delete(name) and step in steps:
                gone += 1
        for name in self.storage.entries(""):
            if parse_step_dir(name) is not None and self.storage.is_link(name):
                self.notes.append(f"{name} is a symlink; left it alone")
        return gone

    # ------------------------------------------------------------------ load

    def committed_steps(self) -> list[int]:
        steps = [s for s in map(parse_step_dir, self.storage.list_dirs()) if s is not None]
        return [s for s in sorted(steps) if self.storage.exists(f"{step_dir(s)}/{MANIFEST}")]

    def _size(self, rel: str) -> int:
        return self.storage.fs.get_file_info(self.storage.path(rel)).size or 0

    def read_manifest(self, step: int) -> Manifest:
        where = f"{self.uri}/{step_dir(step)}"
        rel = f"{step_dir(step)}/{MANIFEST}"
        size = self._size(rel)
        if size > MAX_MANIFEST_BYTES:
            raise CheckpointError(f"{where}: manifest is {size} bytes, over the {MAX_MANIFEST_BYTES} a manifest may hold")
        return Manifest.from_json(self.storage.read_range(rel, 0, size), where)

    def latest(self) -> Manifest | None:
        """Newest checkpoint whose manifest passes its checks (payloads are checked in `load`)."""
        for step in reversed(self.committed_steps()):
            try:
                return self.read_manifest(step)
            except CheckpointError as exc:
                log.warning("Skipping checkpoint: %s; trying the previous one", exc)
        return None

    def load(self, manifest: Manifest, names: list[str] | None = None, folder: str | None = None) -> dict[str, torch.Tensor]:
        """Whole tensors in their global shapes (all of them unless `names` says which)."""
        names = sorted(manifest.tensors) if names is None else names
        wanted = {n: (0, _numel(manifest, n)) for n in names}
        flat = self.load_pieces(manifest, wanted, folder)
        return {n: t.reshape(manifest.tensors[n]["shape"]) for n, t in flat.items()}

    def load_pieces(
        self, manifest: Manifest, wanted: dict[str, tuple[int, int]], folder: str | None = None
    ) -> dict[str, torch.Tensor]:
        """Flat element ranges of tensors, reading only the byte ranges they need. `folder`: the
        checkpoint's folder under the root when it is not step-<its step> (a copy under another name)."""
        folder = folder or step_dir(manifest.step)
        return read_pieces(manifest, self.source(manifest, folder), wanted, f"{self.uri}/{folder}")

    def source(self, manifest: Manifest, folder: str) -> StorageSource:
        """Where a checkpoint's payload files are, each checked to be in its own folder or in a
        committed step folder of a source its manifest names (which, in another root, must hold
        this checkpoint's referrer marker)."""
        where = f"{self.uri}/{folder}"
        own = self.storage.path(folder)
        allowed = {own, *(self._source_folder(x, own, where) for x in manifest.sources)}
        paths = {}
        for file in {f["file"] for e in manifest.tensors.values() for f in e["fragments"]}:
            full = resolve_file(own, file)
            if posixpath.dirname(full) not in allowed:
                raise CheckpointError(
                    f"{where}: fragment file {file!r} lies outside the checkpoint's folder and the folders of the "
                    f"sources its manifest names; refusing to read it"
                )
            paths[file] = posixpath.relpath(full, self.storage.root)
        return StorageSource(self.storage.read_range, paths)

    def _source_folder(self, source: dict, own: str, where: str) -> str:
        """The folder of one of a clone's sources, once it is proven a committed checkpoint that
        knows of the clone."""
        home = Storage.from_uri(source["uri"])
        if type(home.fs) is not type(self.storage.fs):
            raise CheckpointError(f"{where}: names a source on another filesystem ({source['uri']})")
        folder = step_dir(source["step"])
        if not home.exists(f"{folder}/{MANIFEST}"):
            raise CheckpointError(f"{where}: its source {source['uri']}/{folder} is not a committed checkpoint")
        if home.root != self.storage.root:
            markers = [f"{folder}/{REFERRERS}/{n}" for n in home.list_files(f"{folder}/{REFERRERS}") if MARKER_FILE.match(n)]
            if not any(_marker_names(home, m, own) for m in markers):
                raise CheckpointError(
                    f"{where}: its source {source['uri']}/{folder} holds no referrer marker for it; a clone's "
                    f"source must know of the clone"
                )
        return home.path(folder)

    def content_hash(self, manifest: Manifest, folder: str | None = None) -> str:
        """sha256 of what a checkpoint holds, read through its own fragments and verified:
        progress, and every tensor's name, dtype, shape and bytes. Equal for two checkpoints only
        if they load the same state (a clone pointing at the wrong bytes differs)."""
        h = hashlib.sha256(json.dumps([manifest.step, manifest.samples_seen]).encode())
        for name in sorted(manifest.tensors):
            entry = manifest.tensors[name]
            t = self.load_pieces(manifest, {name: (0, numel(entry["shape"]))}, folder)[name]
            h.update(json.dumps([name, entry["dtype"], entry["shape"]]).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
        return h.hexdigest()

    def restore_latest(self, apply: Callable[[Manifest, ReadPieces], None]) -> Manifest | None:
        """Call `apply(manifest, read)` on the newest checkpoint it succeeds on; corrupt ones are
        skipped with a loud warning, their reasons kept in `self.skipped` for the caller to report
        where users look. `read(wanted)` returns flat element ranges, verified. A checkpoint that
        does not fit (IncompatibleCheckpoint) and a store that fails to answer (OSError) are not
        corruption: they propagate, and nothing older is used in their place."""
        self.skipped = []
        for step in reversed(self.committed_steps()):
            try:
                manifest = self.read_manifest(step)
                apply(manifest, functools.partial(self.load_pieces, manifest))
                return manifest
            except CheckpointError as exc:
                log.warning("CHECKPOINT CORRUPT, falling back to the previous one: %s", exc)
                self.skipped.append(str(exc))
        return None

    def load_latest_valid(self, names: list[str] | None = None) -> tuple[Manifest, dict[str, torch.Tensor]] | None:
        """The newest checkpoint that loads completely, as whole tensors."""
        out: dict[str, torch.Tensor] = {}
        manifest = self.restore_latest(lambda m, _read: out.update(self.load(m, names)))
        return None if manifest is None else (manifest, out)


def _marker_names(home: Storage, rel: str, folder: str) -> bool:
    """Whether the marker at `rel` in `home` names the checkpoint folder `folder` (a path on the
    same filesystem)."""
    try:
        ref = json.loads(home.read_range(rel, 0, min(4096, home.fs.get_file_info(home.path(rel)).size or 0)))
        return Storage.from_uri(ref["uri"]).path(step_dir(int(ref["step"]))) == folder
    except (ValueError, KeyError, TypeError, ElastuneError, OSError):
        return False


def files_of(parts) -> set[str]:
    """The payload files named by some ranks' manifest entries."""
    return {f["file"] for entries in parts for e in entries.values() for f in e["fragments"]}


def _numel(manifest: Manifest, name: str) -> int:
    entry = manifest.tensors.get(name)
    return 0 if entry is None else numel(entry["shape"])


def pack(pieces: dict[str, Piece]) -> tuple[PayloadPlan, torch.Tensor]:
    """One payload's bytes in a fresh host buffer (header, then every piece)."""
    plan = PayloadPlan.of(pieces)
    buffer = torch.empty(plan.size, dtype=torch.uint8)
    plan.fill(buffer, pieces)
    return plan, buffer


def seal(plan: PayloadPlan, pieces: dict[str, Piece], buffer: torch.Tensor, file: str) -> dict[str, dict]:
    """Manifest entries of a packed payload, with its block checksums."""
    digests = digests_of(plan.offsets, buffer.numpy().data, BLOCK_BYTES, DURABLE_CHECKSUM)
    return with_digests(plan.entries(pieces, file), digests, DURABLE_CHECKSUM)
