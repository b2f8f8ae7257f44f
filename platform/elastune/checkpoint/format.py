"""The universal checkpoint format, version 3.

A checkpoint is a folder `step-<step:09d>/` holding payload files and `manifest.json`:

  rank-<r>-of-<W>.safetensors   the pieces rank r wrote (safetensors: a JSON header, raw bytes)
  manifest.json                 written last; a checkpoint without it does not exist

Every tensor is logical and global (`model/<name>`, `optim/<param>/<key>`, its full shape),
whatever layout saved it. Its bytes are stored as fragments, each a flat element range
[lo, hi) of the row-major tensor: a replicated layout writes one fragment per tensor, a sharded
optimizer (ZeRO-1) writes one per rank slice. A fragment records its file, byte offset and
length, and a checksum per `block_bytes` block, so a loader can read any sub-range and still verify
every byte it reads: sha256 in durable checkpoints, xxh3_64 in in-memory snapshots (the fast hash
a worker can afford at every step; the service checks it before it seals the bytes with sha256).
Readers never unpickle anything.

A manifest is data from storage, so nothing in it is trusted: `check_manifest` holds every field
to its rule (types, ranges, sizes that agree with dtype x elements, fragments that tile their
tensor exactly, checksum lists of the right length, file names that stay in their folder) and
any breach is a CheckpointError naming the tensor and the field, before a byte is read. And a
manifest checks itself: `manifest_sha256` is the sha256 of the rest of its content (canonical
JSON), so a manifest edited or damaged after it was written, even into one that follows every
rule (a tensor entry dropped, a fragment moved), is refused rather than loaded as another state.
Version 2 (no manifest_sha256) and version 1 manifests still load.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from elastune.errors import CheckpointError

FORMAT = "elastune.checkpoint/3"
FORMATS_READ = (FORMAT, "elastune.checkpoint/2", "elastune.checkpoint/1")
SELF_CHECK = "manifest_sha256"
MANIFEST = "manifest.json"
BLOCK_BYTES = 4 * 2**20  # checksum granularity: the most a sub-range read over-reads at each end

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_TORCH = {v: k for k, v in _DTYPES.items()}
STORED_DTYPES = frozenset(_DTYPES)  # the torch dtypes a checkpoint holds
_ITEMSIZE = {name: torch.empty(0, dtype=dtype).element_size() for name, dtype in _TORCH.items()}
# Block checksum algorithms a fragment may carry, and the length of their hex digests.
CHECKSUMS = {"sha256": 64, "xxh3_64": 16}
DURABLE_CHECKSUM, SNAPSHOT_CHECKSUM = "sha256", "xxh3_64"
MAX_RANK = 64  # dimensions of a tensor
MAX_BYTES = 2**62  # no offset or size beyond this (a file system's limit is lower still)
PAYLOAD_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
STEP_NAME = re.compile(r"^step-\d{9,}$")


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPES[dtype]


def torch_dtype(name: str, where: str) -> torch.dtype:
    dtype = _TORCH.get(name)
    if dtype is None:
        raise CheckpointError(f"{where}: unknown dtype {name!r}")
    return dtype


def step_dir(step: int) -> str:
    return f"step-{step:09d}"


def parse_step_dir(name: str) -> int | None:
    if name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    return None


def payload_file(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


def numel(shape: list[int] | tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class Piece:
    """Elements [lo, hi) of the flattened logical tensor of global `shape`, as one rank holds them.

    `replicated`: every rank holds this same piece (the whole tensor), so a save divides such
    pieces among ranks instead of writing each W times.
    """

    data: torch.Tensor  # hi - lo elements, any device
    lo: int
    hi: int
    shape: tuple[int, ...]
    replicated: bool = False

    @classmethod
    def whole(cls, t: torch.Tensor, replicated: bool = True) -> Piece:
        return cls(t.detach(), 0, t.numel(), tuple(t.shape), replicated)

    @property
    def nbytes(self) -> int:
        return (self.hi - self.lo) * self.data.element_size()


@dataclass(frozen=True)
class PayloadPlan:
    """Where each piece's bytes go in one safetensors payload (pure: names, dtypes, sizes)."""

    header: bytes  # the 8-byte length and the JSON header, padded to 8 bytes
    offsets: dict[str, tuple[int, int]]  # name -> (file offset, byte length)
    size: int

    @classmethod
    def of(cls, pieces: dict[str, Piece]) -> PayloadPlan:
        header: dict[str, Any] = {}
        offset = 0
        for name in sorted(pieces):
            p = pieces[name]
            # A whole tensor keeps its shape, so plain safetensors readers see the real tensor.
            shape = list(p.shape) if (p.lo, p.hi) == (0, numel(p.shape)) else [p.hi - p.lo]
            header[name] = {"dtype": _DTYPES[p.data.dtype], "shape": shape, "data_offsets": [offset, offset + p.nbytes]}
            offset += p.nbytes
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # safetensors aligns the data area to 8 bytes
        base = 8 + len(head)
        offsets = {n: (base + h["data_offsets"][0], h["data_offsets"][1] - h["data_offsets"][0]) for n, h in header.items()}
        return cls(struct.pack("<Q", len(head)) + head, offsets, base + offset)

    def fill(self, buffer: torch.Tensor, pieces: dict[str, Piece]) -> None:
        """Copy the header and every piece into `buffer` (uint8, `size` bytes; pinned if pieces are
        on a GPU, where the copies are asynchronous until the caller synchronises)."""
        host = buffer.numpy()
        host[: len(self.header)] = np.frombuffer(self.header, dtype=np.uint8)
        for name, (offset, length) in self.offsets.items():
            if length:
                src = pieces[name].data.reshape(-1)
                if src.device.type == "cpu":
                    # numpy's copy: as fast as torch's here, and it never enters torch's OpenMP
                    # pool, which deadlocks in a forked child of a process that used it.
                    host[offset : offset + length] = src.view(torch.uint8).numpy()
                else:
                    buffer[offset : offset + length].view(src.dtype).copy_(src, non_blocking=True)

    def entries(self, pieces: dict[str, Piece], file: str) -> dict[str, dict[str, Any]]:
        """Manifest entries of these pieces (each a one-fragment tensor entry, merged across ranks
        later), still without checksums: `with_digests` seals them once the bytes are known."""
        out = {}
        for name, (offset, length) in self.offsets.items():
            p = pieces[name]
            frag = {"file": file, "offset": offset, "length": length, "elements": [p.lo, p.hi], "block_bytes": BLOCK_BYTES}
            out[name] = {"dtype": _DTYPES[p.data.dtype], "shape": list(p.shape), "fragments": [frag]}
        return out


def with_digests(entries: dict[str, dict[str, Any]], digests: dict[str, list[str]], algorithm: str) -> dict[str, dict[str, Any]]:
    """One payload's entries (one fragment each) carrying `algorithm`'s block checksums, and no other."""
    out = {}
    for name, entry in entries.items():
        frag = {k: v for k, v in entry["fragments"][0].items() if k not in CHECKSUMS}
        out[name] = {**entry, "fragments": [{**frag, algorithm: digests[name]}]}
    return out


def offsets_of(entries: dict[str, dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """(byte offset, length) of each tensor in one payload's entries."""
    return {n: (e["fragments"][0]["offset"], e["fragments"][0]["length"]) for n, e in entries.items()}


def merge_entries(parts: list[dict[str, dict[str, Any]]], where: str) -> dict[str, dict[str, Any]]:
    """Join every rank's entries into one per tensor, held to the rules a load holds it to (its
    fragments must tile it exactly)."""
    merged: dict[str, dict[str, Any]] = {}
    for part in parts:
        for name, entry in part.items():
            merged.setdefault(name, {**entry, "fragments": []})["fragments"].extend(entry["fragments"])
    for name, entry in merged.items():
        entry["fragments"].sort(key=lambda f: f["elements"][0])
        _check_tensor(name, entry, f"{where}: tensor {name!r}")
    return merged


@dataclass
class Manifest:
    step: int
    samples_seen: int
    spec_hash: str
    layout: dict[str, Any]
    tensors: dict[str, dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def to_json(self) -> bytes:
        body = {**self.__dict__, "format": FORMAT}
        return (json.dumps({**body, SELF_CHECK: content_digest(body)}, indent=1, sort_keys=True) + "\n").encode()

    @property
    def nbytes(self) -> int:
        return sum(f["length"] for e in self.tensors.values() for f in e["fragments"])

    @property
    def shapes(self) -> dict[str, list[int]]:
        return {n: e["shape"] for n, e in self.tensors.items()}

    @property
    def sources(self) -> list[dict[str, Any]]:
        """The checkpoints other than this one whose payload files it reads ({"uri", "step"}): a
        clone's sources. Manifests of before `sources` name their one source in `cloned_from`."""
        if "sources" in self.meta:
            return self.meta["sources"]
        return [self.meta["cloned_from"]] if "cloned_from" in self.meta else []

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        """Parse and check a manifest; CheckpointError for anything that breaks a rule."""
        try:
            raw = json.loads(data)
            if not isinstance(raw, dict):
                raise CheckpointError(f"{where}: manifest is a JSON {type(raw).__name__}, not an object")
            if raw.get("format") not in FORMATS_READ:
                raise CheckpointError(f"{where}: format {raw.get('format')!r} is not one of {FORMATS_READ}")
            if raw["format"] == FORMAT:
                digest = raw.pop(SELF_CHECK, None)
                if digest != content_digest(raw):
                    raise CheckpointError(
                        f"{where}: the manifest's content does not match its {SELF_CHECK}: it was edited or "
                        f"damaged after it was written"
                    )
            elif raw["format"] == "elastune.checkpoint/1":
                raw = _upgrade_v1(raw)
            manifest = cls(**{**raw, "format": FORMAT})
        except (ValueError, TypeError, AttributeError, KeyError, RecursionError) as exc:
            raise CheckpointError(f"{where}: manifest is malformed ({type(exc).__name__}: {str(exc)[:200]})") from None
        check_manifest(manifest, where)
        return manifest


def content_digest(body: dict[str, Any]) -> str:
    """sha256 of a manifest's content as canonical JSON (sorted keys, no spaces): the same
    bytes for the content a writer had and the content a reader parsed back."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_manifest(m: Manifest, where: str) -> None:
    """Every rule a manifest's content must follow (see the module docstring); CheckpointError
    naming the tensor and the field of the first breach."""
    for name in ("step", "samples_seen"):
        _int(getattr(m, name), f"{where}: {name}", 0)
    for name, kind in (("spec_hash", str), ("layout", dict), ("tensors", dict), ("meta", dict)):
        if not isinstance(getattr(m, name), kind):
            raise CheckpointError(f"{where}: {name} is a {type(getattr(m, name)).__name__}, not a {kind.__name__}")
    sources = m.sources
    if not isinstance(sources, list) or not all(isinstance(x, dict) and isinstance(x.get("uri"), str) for x in sources):
        raise CheckpointError(f"{where}: meta.sources must be a list of {{uri, step}} records")
    for x in sources:
        _int(x.get("step"), f"{where}: meta.sources step", 0)
    for name, entry in m.tensors.items():
        _check_tensor(name, entry, f"{where}: tensor {name!r}")


def _int(value: Any, what: str, low: int, high: int = MAX_BYTES) -> int:
    if type(value) is not int or not low <= value <= high:
        raise CheckpointError(f"{what} is {str(value)[:40]!r}; it must be an integer in [{low}, {high}]")
    return value


def _check_tensor(name: str, entry: Any, where: str) -> None:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: entry is a {type(entry).__name__}, not an object")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
        raise CheckpointError(f"{where}: dtype {str(dtype)[:40]!r} is not one of {sorted(_ITEMSIZE)}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise CheckpointError(f"{where}: shape {str(shape)[:80]} is not a list of at most {MAX_RANK} sizes")
    for d in shape:
        _int(d, f"{where}: shape entry", 0)
    total = numel(shape)
    if total * _ITEMSIZE[dtype] > MAX_BYTES:
        raise CheckpointError(f"{where}: shape {shape} holds more than {MAX_BYTES} bytes")
    frags = entry.get("fragments")
    if not isinstance(frags, list) or not frags:
        raise CheckpointError(f"{where}: fragments must be a non-empty list")
    spans = sorted((_check_fragment(f, i, total, _ITEMSIZE[dtype], f"{where} fragment {i}"), i) for i, f in enumerate(frags))
    edge = 0
    for (lo, hi), i in spans:
        if lo != edge:
            raise CheckpointError(
                f"{where}: fragments do not tile the tensor ({'gap' if lo > edge else 'overlap'} at element {edge}, "
                f"fragment {i} starts at {lo})"
            )
        edge = hi
    if edge != total:
        raise CheckpointError(f"{where}: fragments cover {edge} of its {total} elements")


def _check_fragment(frag: Any, i: int, total: int, itemsize: int, where: str) -> tuple[int, int]:
    if not isinstance(frag, dict):
        raise CheckpointError(f"{where}: is a {type(frag).__name__}, not an object")
    check_file_name(frag.get("file"), where)
    offset = _int(frag.get("offset"), f"{where}: offset", 0)
    length = _int(frag.get("length"), f"{where}: length", 0)
    _int(offset + length, f"{where}: offset + length", 0)
    elements = frag.get("elements")
    if not (isinstance(elements, list) and len(elements) == 2):
        raise CheckpointError(f"{where}: elements {str(elements)[:60]} is not a [lo, hi] pair")
    lo, hi = (_int(e, f"{where}: elements", 0, total) for e in elements)
    if lo > hi:
        raise CheckpointError(f"{where}: elements [{lo}, {hi}) is an empty range upside down")
    if length != (hi - lo) * itemsize:
        raise CheckpointError(f"{where}: length {length} bytes disagrees with {hi - lo} elements of {itemsize} bytes")
    block = _int(frag.get("block_bytes"), f"{where}: block_bytes", 1)
    blocks = max(1, -(-length // block))
    carried = [a for a in CHECKSUMS if frag.get(a) is not None]
    if not carried:
        raise CheckpointError(
            f"{where}: carries no checksums (one of {', '.join(CHECKSUMS)} per {block}-byte block); its bytes cannot be verified"
        )
    for algorithm in carried:
        digests = frag[algorithm]
        if not isinstance(digests, list) or len(digests) != blocks:
            raise CheckpointError(
                f"{where}: {algorithm} must list {blocks} block checksum(s) for {length} bytes in blocks of {block}"
            )
        for d in digests:
            if not (isinstance(d, str) and len(d) == CHECKSUMS[algorithm] and all(c in "0123456789abcdef" for c in d)):
                raise CheckpointError(
                    f"{where}: {algorithm} entry {str(d)[:80]!r} is not a {CHECKSUMS[algorithm]}-digit hex digest"
                )
    return lo, hi


def check_file_name(file: Any, where: str) -> None:
    """A fragment's file: a payload name in its own folder ("rank-00000-of-00002.safetensors"),
    or a clone's path to a payload in another checkpoint's step folder ("../step-000000120/NAME",
    "../../other-root/step-000000120/NAME"); which folders a clone may read is checked against
    its sources where the path is resolved (Checkpointer). Nothing absolute, no "." or empty
    parts, no ".." after a folder name, no URI."""
    if not isinstance(file, str):
        raise CheckpointError(f"{where}: file is a {type(file).__name__}, not a file name")
    parts = file.split("/")
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    rest = parts[ups:]
    ok = bool(rest) and PAYLOAD_NAME.match(rest[-1]) is not None and rest[-1] not in (".", "..")
    if ups == 0:
        ok = ok and len(rest) == 1
    else:
        ok = ok and len(rest) >= 2 and STEP_NAME.match(rest[-2]) is not None
        ok = ok and len(parts) <= 64 and all(p not in ("", ".", "..") and p.isprintable() for p in rest[:-1])
    if not ok:
        raise CheckpointError(
            f"{where}: file {file[:120]!r} is neither a payload in the checkpoint's folder nor a clone's path "
            f"to one in another checkpoint's step folder; refusing to read it"
        )


def resolve_file(folder: str, file: str) -> str:
    """The path `file` (checked by check_file_name) names, from the checkpoint folder `folder`."""
    return posixpath.normpath(f"{folder}/{file}")


def _upgrade_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 1 had one whole-tensor fragment per tensor with a single sha256: one block."""
    for entry in raw["tensors"].values():
        for frag in entry["fragments"]:
            frag.pop("index", None)
            frag["elements"] = [0, numel(entry["shape"])]
            frag["block_bytes"] = max(frag["length"], 1)
            frag["sha256"] = [frag["sha256"]]
    return raw
