"""The universal checkpoint format, version 2.

A checkpoint is a folder `step-<step:09d>/` holding payload files and `manifest.json`:

  rank-<r>-of-<W>.safetensors   the pieces rank r wrote (safetensors: a JSON header, raw bytes)
  manifest.json                 written last; a checkpoint without it does not exist

Every tensor is logical and global (`model/<name>`, `optim/<param>/<key>`, its full shape),
whatever layout saved it. Its bytes are stored as fragments, each a flat element range
[lo, hi) of the row-major tensor: a replicated layout writes one fragment per tensor, a sharded
optimizer (ZeRO-1) writes one per rank slice. A fragment records its file, byte offset and
length, and a sha256 per `block_bytes` block, so a loader can read any sub-range and still verify
every byte it reads. Readers never unpickle anything.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from elastune.errors import CheckpointError

FORMAT = "elastune.checkpoint/2"
FORMATS_READ = (FORMAT, "elastune.checkpoint/1")
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
    def whole(cls, t: torch.Tensor, replicated: bool = True) -> "Piece":
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
    def of(cls, pieces: dict[str, Piece]) -> "PayloadPlan":
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

    def entries(self, pieces: dict[str, Piece], file: str, digests: dict[str, list[str]] | None) -> dict[str, dict[str, Any]]:
        """Manifest entries of these pieces (each a one-fragment tensor entry, merged across ranks
        later). Without digests (an in-memory snapshot) the checksums are filled in when persisted."""
        out = {}
        for name, (offset, length) in self.offsets.items():
            p = pieces[name]
            frag = {"file": file, "offset": offset, "length": length, "elements": [p.lo, p.hi],
                    "block_bytes": BLOCK_BYTES, "sha256": digests[name] if digests else None}  # fmt: skip
            out[name] = {"dtype": _DTYPES[p.data.dtype], "shape": list(p.shape), "fragments": [frag]}
        return out


def merge_entries(parts: list[dict[str, dict[str, Any]]], where: str) -> dict[str, dict[str, Any]]:
    """Join every rank's entries into one per tensor; its fragments must tile it exactly."""
    merged: dict[str, dict[str, Any]] = {}
    for part in parts:
        for name, entry in part.items():
            merged.setdefault(name, {**entry, "fragments": []})["fragments"].extend(entry["fragments"])
    for name, entry in merged.items():
        entry["fragments"].sort(key=lambda f: f["elements"][0])
        edge = 0
        for frag in entry["fragments"]:
            if frag["elements"][0] != edge:
                raise CheckpointError(f"{where}: {name} fragments do not tile the tensor (gap or overlap at element {edge})")
            edge = frag["elements"][1]
        if edge != numel(entry["shape"]):
            raise CheckpointError(f"{where}: {name} fragments cover {edge} of {numel(entry['shape'])} elements")
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
        return (json.dumps(self.__dict__, indent=1, sort_keys=True) + "\n").encode()

    @property
    def nbytes(self) -> int:
        return sum(f["length"] for e in self.tensors.values() for f in e["fragments"])

    @property
    def shapes(self) -> dict[str, list[int]]:
        return {n: e["shape"] for n, e in self.tensors.items()}

    def state_hash(self) -> str:
        """sha256 of the state a checkpoint holds: progress, and every tensor's name, dtype, shape,
        element ranges and block checksums. A clone's equals its source's (only file paths differ)."""
        state = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "tensors": {n: [e["dtype"], e["shape"], [[f["elements"], f["sha256"]] for f in e["fragments"]]] for n, e in sorted(self.tensors.items())},
        }  # fmt: skip
        return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "Manifest":
        try:
            raw = json.loads(data)
            if raw.get("format") not in FORMATS_READ:
                raise CheckpointError(f"{where}: format {raw.get('format')!r} is not one of {FORMATS_READ}")
            if raw["format"] != FORMAT:
                raw = _upgrade_v1(raw)
            return cls(**raw)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise CheckpointError(f"{where}: manifest is malformed ({exc})") from None


def _upgrade_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 1 had one whole-tensor fragment per tensor with a single sha256: one block."""
    for entry in raw["tensors"].values():
        for frag in entry["fragments"]:
            frag.pop("index", None)
            frag["elements"] = [0, numel(entry["shape"])]
            frag["block_bytes"] = max(frag["length"], 1)
            frag["sha256"] = [frag["sha256"]]
    return {**raw, "format": FORMAT}
