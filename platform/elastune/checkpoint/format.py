"""The universal checkpoint format, version 1.

A checkpoint is a folder `step-<step:09d>/` holding payload files and `manifest.json`:

  rank-<r>-of-<W>.safetensors   tensors rank r owned at save (safetensors: a JSON header, raw bytes)
  manifest.json                 written last; a checkpoint without it does not exist

The manifest says what every byte is: for each tensor its dtype, global shape and fragments
(file, byte offset and length of the raw data, sha256, and the global index range the fragment
covers), plus step, samples_seen, spec hash, layout at save, optimizer, schedule and RNG scheme.
Readers read only the byte ranges they need and never unpickle anything.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

from elastune.errors import CheckpointError

FORMAT = "elastune.checkpoint/1"
MANIFEST = "manifest.json"

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


def step_dir(step: int) -> str:
    return f"step-{step:09d}"


def parse_step_dir(name: str) -> int | None:
    if name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    return None


def payload_file(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


def assign_owners(sizes: dict[str, int], world_size: int) -> dict[str, int]:
    """Split replicated tensors among ranks so each writes about the same bytes, nothing twice.

    Greedy: largest tensor first to the least-loaded rank (ties: lower rank, then name order).
    Pure and deterministic, so every rank computes the same answer without talking.
    """
    load = [0] * world_size
    owners: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += sizes[name]
    return owners


def encode_payload(tensors: dict[str, torch.Tensor]) -> tuple[bytes, dict[str, dict[str, Any]]]:
    """Safetensors bytes for `tensors` (on CPU) and each tensor's fragment entry (offset, length, sha256)."""
    header: dict[str, Any] = {}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors aligns the data area to 8 bytes
    base = 8 + len(head)
    entries = {}
    for name, raw in zip(sorted(tensors), chunks):
        begin, end = header[name]["data_offsets"]
        entries[name] = {"offset": base + begin, "length": end - begin, "sha256": hashlib.sha256(raw).hexdigest()}
    return struct.pack("<Q", len(head)) + head + b"".join(chunks), entries


def tensor_entry(t: torch.Tensor, file: str, frag: dict[str, Any]) -> dict[str, Any]:
    return {
        "dtype": _DTYPES[t.dtype],
        "shape": list(t.shape),
        "fragments": [{"file": file, **frag, "index": [[0, n] for n in t.shape]}],
    }


def decode_fragment(raw: bytes, entry: dict[str, Any], frag: dict[str, Any], where: str) -> torch.Tensor:
    if hashlib.sha256(raw).hexdigest() != frag["sha256"]:
        raise CheckpointError(f"{where}: checksum mismatch in {frag['file']} (bytes {frag['offset']}..{frag['offset'] + frag['length']})")
    dtype = _TORCH.get(entry["dtype"])
    if dtype is None:
        raise CheckpointError(f"{where}: unknown dtype {entry['dtype']!r}")
    shape = [hi - lo for lo, hi in frag["index"]]
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)


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

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "Manifest":
        try:
            raw = json.loads(data)
            if raw.get("format") != FORMAT:
                raise CheckpointError(f"{where}: format {raw.get('format')!r} is not {FORMAT!r}")
            return cls(**raw)
        except (ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{where}: manifest is malformed ({exc})") from None
