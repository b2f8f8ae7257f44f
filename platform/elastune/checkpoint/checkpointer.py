"""Durable (tier 1) checkpoints: save from any ranks and layout, load any slices, keep, clone, prune.

Save: each rank writes what it holds and owns (layout.pieces_to_write: replicated tensors split
among ranks, sharded slices by their holder), in parallel, nothing twice; rank 0 gathers the
fragment entries and commits the manifest last. Load: the newest checkpoint whose manifest parses
and whose blocks pass their checksums; a corrupt one is reported by file and tensor, and the
previous one is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from elastune.checkpoint.format import (
    BLOCK_BYTES,
    MANIFEST,
    Manifest,
    PayloadPlan,
    Piece,
    merge_entries,
    numel,
    parse_step_dir,
    payload_file,
    step_dir,
)
from elastune.checkpoint.layout import pieces_to_write
from elastune.checkpoint.payload import StorageSource, digests_of, read_pieces
from elastune.checkpoint.retention import CheckpointInfo, RetentionPolicy, decide_retention
from elastune.checkpoint.storage import Storage
from elastune.errors import CheckpointError

log = logging.getLogger(__name__)

PINNED = "PINNED"
REFERRERS = "referrers"

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

    @property
    def uri(self) -> str:
        return self.storage.uri

    # ------------------------------------------------------------------ save

    def save(
        self,
        manifest: Manifest,
        state: dict[str, Piece | torch.Tensor],
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
        entries, written = {}, 0
        if mine:
            plan, buffer = pack(mine)
            entries = seal(plan, mine, buffer, file)
            self.storage.write_bytes(f"{step_dir(manifest.step)}/{file}", buffer.numpy())
            written = plan.size
        mine_report = {"entries": entries, "bytes": written, "seconds": time.perf_counter() - started}
        everyone = [json.loads(part) for part in gather(json.dumps(mine_report))]
        if rank != 0:
            return None
        self.commit(manifest, [part["entries"] for part in everyone], world_size)
        committed_s = time.perf_counter() - started
        self.prune()
        return SaveReport(
            manifest=manifest,
            rank_bytes=[part["bytes"] for part in everyone],
            rank_seconds=[round(part["seconds"], 6) for part in everyone],
            commit_seconds=round(committed_s, 6),
        )

    def commit(self, manifest: Manifest, parts: list[dict], world_size: int) -> None:
        """Make a checkpoint exist once every rank's payload is written: its manifest goes last.
        (Retention is the caller's next step: `prune`.)"""
        where = f"{self.uri}/{step_dir(manifest.step)}"
        manifest.tensors = merge_entries(parts, where)
        manifest.layout = {"kind": manifest.layout.get("kind", "replicated"), "world_size": world_size}
        manifest.meta.setdefault("created", time.time())
        self.storage.commit_bytes(f"{step_dir(manifest.step)}/{MANIFEST}", manifest.to_json())

    def prune(self) -> list[int]:
        """Apply the retention policy (retention.py); delete the rest, manifest first."""
        decision = decide_retention([self.info(step) for step in self.committed_steps()], self.policy)
        for step in decision.delete:
            self._delete(step_dir(step))
        return list(decision.delete)

    def _delete(self, folder: str) -> None:
        # Removing the manifest first means a half-deleted checkpoint never loads as valid.
        self.storage.delete(f"{folder}/{MANIFEST}")
        self.storage.delete(folder)

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
                parts = posixpath.normpath(f"{step_dir(step)}/{frag['file']}").split("/")
                if len(parts) == 2 and (ref := parse_step_dir(parts[0])) is not None and ref != step:
                    refs.add(ref)
        metrics = {k: float(v) for k, v in manifest.meta.get("metrics", {}).items()}
        return CheckpointInfo(step, metrics=metrics, pinned=pinned, references=frozenset(refs), referenced_elsewhere=self._live_referrer(step))

    def _live_referrer(self, step: int) -> str | None:
        """A clone in another root that still exists and reads this checkpoint's payloads.

        Clones across roots leave a marker in the source (`referrers/<id>.json`: the clone's
        root and step); a marker whose clone is gone no longer protects anything.
        """
        for name in self.storage.list_files(f"{step_dir(step)}/{REFERRERS}"):
            try:
                ref = json.loads(self.storage.read_bytes(f"{step_dir(step)}/{REFERRERS}/{name}"))
                if Storage.from_uri(ref["uri"]).exists(f"{step_dir(ref['step'])}/{MANIFEST}"):
                    return f"{ref['uri']}/{step_dir(ref['step'])}"
            except (ValueError, KeyError, OSError, CheckpointError):
                continue  # an unreadable marker: the clone it named cannot be proven alive
        return None

    def pin(self, step: int, pinned: bool = True) -> None:
        """Pinned checkpoints survive every prune (a `PINNED` marker beside the manifest)."""
        if pinned:
            self.storage.write_bytes(f"{step_dir(step)}/{PINNED}", b"")
        else:
            self.storage.delete(f"{step_dir(step)}/{PINNED}")

    def clone(self, step: int, dst: "Checkpointer | None" = None, dst_step: int | None = None, meta: dict | None = None) -> Manifest:
        """A new checkpoint in `dst` (default: here) whose fragments point at this one's payloads.

        No payload byte is copied: the new manifest's fragment files are paths relative to its own
        folder ("../step-000000120/rank-00000-of-00002.safetensors"). Retention keeps a source
        while a clone references it, in the same root or (through a marker) in another.
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
            name: {**entry, "fragments": [
                {**f, "file": posixpath.relpath(posixpath.normpath(f"{src_folder}/{f['file']}"), dst_folder)}
                for f in entry["fragments"]
            ]}
            for name, entry in src.tensors.items()
        }  # fmt: skip
        clone = Manifest(
            step=target,
            samples_seen=src.samples_seen,
            spec_hash=src.spec_hash,
            layout=src.layout,
            tensors=tensors,
            meta={**src.meta, **(meta or {}), "cloned_from": {"uri": self.uri, "step": step}, "created": time.time()},
        )
        if dst.storage.path("") != self.storage.path(""):
            # The source's retention cannot see the other root: leave it a marker first.
            marker = hashlib.sha256(f"{dst.uri}|{target}".encode()).hexdigest()[:16]
            self.storage.commit_bytes(f"{step_dir(step)}/{REFERRERS}/{marker}.json", json.dumps({"uri": dst.uri, "step": target}).encode())
        dst.storage.commit_bytes(f"{step_dir(target)}/{MANIFEST}", clone.to_json())
        return clone

    def clear(self) -> int:
        """Delete every checkpoint here (for --fresh); returns how many committed ones went."""
        steps = self.committed_steps()
        for name in self.storage.list_dirs():
            if parse_step_dir(name) is not None:
                self._delete(name)
        return len(steps)

    # ------------------------------------------------------------------ load

    def committed_steps(self) -> list[int]:
        steps = [s for s in map(parse_step_dir, self.storage.list_dirs()) if s is not None]
        return [s for s in sorted(steps) if self.storage.exists(f"{step_dir(s)}/{MANIFEST}")]

    def read_manifest(self, step: int) -> Manifest:
        where = f"{self.uri}/{step_dir(step)}"
        return Manifest.from_json(self.storage.read_bytes(f"{step_dir(step)}/{MANIFEST}"), where)

    def latest(self) -> Manifest | None:
        """Newest checkpoint whose manifest parses (payload checks happen in `load`)."""
        for step in reversed(self.committed_steps()):
            try:
                return self.read_manifest(step)
            except CheckpointError as exc:
                log.warning("Skipping checkpoint: %s; trying the previous one", exc)
        return None

    def load(self, manifest: Manifest, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Whole tensors in their global shapes (all of them unless `names` says which)."""
        names = sorted(manifest.tensors) if names is None else names
        wanted = {n: (0, _numel(manifest, n)) for n in names}
        flat = self.load_pieces(manifest, wanted)
        return {n: t.reshape(manifest.tensors[n]["shape"]) for n, t in flat.items()}

    def load_pieces(self, manifest: Manifest, wanted: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
        """Flat element ranges of tensors, reading only the byte ranges they need."""
        folder = step_dir(manifest.step)
        return read_pieces(manifest, StorageSource(self.storage.read_range, folder), wanted, f"{self.uri}/{folder}")

    def restore_latest(self, apply: Callable[[Manifest, ReadPieces], None]) -> Manifest | None:
        """Call `apply(manifest, read)` on the newest checkpoint it succeeds on; corrupt ones are
        skipped with a loud warning, their reasons kept in `self.skipped` for the caller to report
        where users look. `read(wanted)` returns flat element ranges, verified."""
        self.skipped = []
        for step in reversed(self.committed_steps()):
            try:
                manifest = self.read_manifest(step)
                apply(manifest, lambda wanted, m=manifest: self.load_pieces(m, wanted))
                return manifest
            except (CheckpointError, OSError) as exc:
                log.warning("CHECKPOINT CORRUPT, falling back to the previous one: %s", exc)
                self.skipped.append(str(exc))
        return None

    def load_latest_valid(self, names: list[str] | None = None) -> tuple[Manifest, dict[str, torch.Tensor]] | None:
        """The newest checkpoint that loads completely, as whole tensors."""
        out: dict[str, torch.Tensor] = {}
        manifest = self.restore_latest(lambda m, _read: out.update(self.load(m, names)))
        return None if manifest is None else (manifest, out)

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
    return plan.entries(pieces, file, digests_of(plan.offsets, memoryview(buffer.numpy()), BLOCK_BYTES))
