"""Save and load universal checkpoints from any number of ranks (replicated layout).

Save: every rank holds the same replicated state; `assign_owners` splits the tensors so each
rank writes a share, in parallel, nothing twice. Rank 0 gathers the fragment entries and writes
the manifest last. Load: the newest checkpoint whose manifest parses and whose fragments pass
their checksums; a corrupt one is reported by file and tensor, and the previous one is used.
"""

from __future__ import annotations

import json
import logging
import posixpath
import struct
import time
from dataclasses import dataclass
from typing import Callable

import torch

from elastune.checkpoint.format import (
    MANIFEST,
    Manifest,
    assign_owners,
    decode_fragment,
    encode_payload,
    parse_step_dir,
    payload_file,
    step_dir,
    tensor_entry,
)
from elastune.checkpoint.retention import CheckpointInfo, RetentionPolicy, decide_retention
from elastune.checkpoint.storage import Storage
from elastune.errors import CheckpointError

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100 * 2**20
PINNED = "PINNED"

Gather = Callable[[str], list[str]]  # every rank's string, in rank order (an all-gather)


def _single(payload: str) -> list[str]:
    return [payload]


def locate(uri: str) -> tuple[str, int | None]:
    """Split 'ROOT/step-000000120' into (ROOT, 120); a bare root gives (ROOT, None)."""
    head, _, last = uri.rstrip("/").rpartition("/")
    step = parse_step_dir(last)
    return (head, step) if step is not None and head else (uri, None)


@dataclass(frozen=True)
class SaveReport:
    """What a save cost: bytes and seconds each rank spent writing its share (its stall, as saves
    are synchronous in this version) and the seconds until rank 0 committed the manifest."""

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
        tensors: dict[str, torch.Tensor],
        rank: int = 0,
        world_size: int = 1,
        gather: Gather = _single,
    ) -> SaveReport | None:
        """Write this rank's share; rank 0 commits the manifest and reports (others: None)."""
        started = time.perf_counter()
        folder = step_dir(manifest.step)
        owners = assign_owners({n: t.numel() * t.element_size() for n, t in tensors.items()}, world_size)
        mine = {n: t.detach().cpu() for n, t in tensors.items() if owners[n] == rank}
        file = payload_file(rank, world_size)
        entries, written = {}, 0
        if mine:
            data, frags = encode_payload(mine)
            self.storage.write_bytes(f"{folder}/{file}", data)
            entries, written = {n: tensor_entry(mine[n], file, frags[n]) for n in mine}, len(data)
        mine_report = {"entries": entries, "bytes": written, "seconds": time.perf_counter() - started}
        everyone = [json.loads(part) for part in gather(json.dumps(mine_report))]
        if rank != 0:
            return None
        for part in everyone:
            manifest.tensors.update(part["entries"])
        missing = set(tensors) - set(manifest.tensors)
        if missing:
            raise CheckpointError(f"checkpoint step {manifest.step}: no rank wrote {sorted(missing)[:3]}")
        manifest.layout = {"kind": "replicated", "world_size": world_size}
        manifest.meta.setdefault("created", time.time())
        self.storage.commit_bytes(f"{folder}/{MANIFEST}", manifest.to_json())
        committed_s = time.perf_counter() - started
        self.prune()
        return SaveReport(
            manifest=manifest,
            rank_bytes=[part["bytes"] for part in everyone],
            rank_seconds=[round(part["seconds"], 6) for part in everyone],
            commit_seconds=round(committed_s, 6),
        )

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
        return CheckpointInfo(step, metrics=metrics, pinned=pinned, references=frozenset(refs))

    def pin(self, step: int, pinned: bool = True) -> None:
        """Pinned checkpoints survive every prune (a `PINNED` marker beside the manifest)."""
        if pinned:
            self.storage.write_bytes(f"{step_dir(step)}/{PINNED}", b"")
        else:
            self.storage.delete(f"{step_dir(step)}/{PINNED}")

    def clone(self, step: int, dst: "Checkpointer | None" = None, dst_step: int | None = None, meta: dict | None = None) -> Manifest:
        """A new checkpoint in `dst` (default: here) whose fragments point at this one's payloads.

        No payload byte is copied: the new manifest's fragment files are paths relative to its own
        folder ("../step-000000120/rank-00000-of-00002.safetensors"). Retention here keeps a
        source while a clone in the same root references it.
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
        folder = step_dir(manifest.step)
        where = f"{self.uri}/{folder}"
        out: dict[str, torch.Tensor] = {}
        checked: set[str] = set()
        for name in names if names is not None else sorted(manifest.tensors):
            entry = manifest.tensors.get(name)
            if entry is None:
                raise CheckpointError(f"{where}: has no tensor {name!r}; it was saved from a different model or optimizer")
            (frag,) = entry["fragments"]  # replicated layout: one fragment per tensor
            if frag["file"] not in checked:
                self._check_header(f"{folder}/{frag['file']}", where)
                checked.add(frag["file"])
            raw = self.storage.read_range(f"{folder}/{frag['file']}", frag["offset"], frag["length"])
            try:
                out[name] = decode_fragment(raw, entry, frag, where)
            except CheckpointError as exc:
                raise CheckpointError(f"{exc} (tensor {name!r})") from None
        return out

    def load_latest_valid(self, names: list[str] | None = None) -> tuple[Manifest, dict[str, torch.Tensor]] | None:
        """Newest checkpoint that loads completely; corrupt ones are skipped with a loud warning,
        and their reasons kept in `self.skipped` for the caller to report where users look."""
        self.skipped = []
        for step in reversed(self.committed_steps()):
            try:
                manifest = self.read_manifest(step)
                return manifest, self.load(manifest, names)
            except (CheckpointError, OSError) as exc:
                log.warning("CHECKPOINT CORRUPT, falling back to the previous one: %s", exc)
                self.skipped.append(str(exc))
        return None

    def _check_header(self, path: str, where: str) -> None:
        """Refuse anything that is not a safetensors payload (a pickle, say) before reading data."""
        try:
            (n,) = struct.unpack("<Q", self.storage.read_range(path, 0, 8))
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"header length {n} is implausible")
            json.loads(self.storage.read_range(path, 8, n))
        except (CheckpointError, ValueError, struct.error) as exc:
            raise CheckpointError(f"{where}: {path.rsplit('/', 1)[-1]} is not a safetensors payload ({exc}); refusing to load it") from None
