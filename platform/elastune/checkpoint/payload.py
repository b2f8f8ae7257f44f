"""Payload bytes in and out: block checksums on write, verified sub-range reads on load.

A load asks for element ranges of logical tensors; `read_pieces` turns them into byte ranges of
fragments, widens each to whole checksum blocks, merges neighbouring ranges of a file into one
read, reads files in parallel, verifies every block it read, and copies the elements out. The
bytes come from a `Source`: payload files on storage (tier 1) or buffers in memory (tier 0).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import xxhash

from elastune.checkpoint.format import CHECKSUMS, Manifest, numel, torch_dtype
from elastune.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 2**20
MERGE_GAP = 1 * 2**20  # read across gaps this small rather than issue another request
READ_BYTES = 8 * 2**20  # the most one read request asks for (larger ranges are split)


def _new_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=8, thread_name_prefix="elastune-payload")  # hashlib and pyarrow release the GIL


def _reset_pool() -> None:
    global _POOL  # noqa: PLW0603 (one pool per process, replaced after fork)
    _POOL = _new_pool()  # a forked child inherits the pool but not its threads: work would never run


_POOL = _new_pool()
os.register_at_fork(after_in_child=_reset_pool)


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


# What each checksum algorithm a manifest may name computes (hex digest of one block).
HASHES: dict[str, Callable[[Any], str]] = {"sha256": _sha256, "xxh3_64": xxhash.xxh3_64_hexdigest}
assert set(HASHES) == set(CHECKSUMS)


def block_digests(data: memoryview, offset: int, length: int, block: int, algorithm: str) -> list[str]:
    digest = HASHES[algorithm]
    return [digest(data[o : min(o + block, offset + length)]) for o in range(offset, offset + length, block)] or [digest(b"")]


def digests_of(offsets: dict[str, tuple[int, int]], buffer: memoryview, block: int, algorithm: str) -> dict[str, list[str]]:
    """Block checksums of each (offset, length) range of a payload, hashed in parallel."""
    futures = {name: _POOL.submit(block_digests, buffer, off, n, block, algorithm) for name, (off, n) in offsets.items()}
    return {name: f.result() for name, f in futures.items()}


class Source(Protocol):
    def read(self, file: str, offset: int, length: int) -> memoryview: ...


def check_header(source: Source, file: str, where: str) -> None:
    """Refuse anything that is not a safetensors payload (a pickle, say) before using its data."""
    try:
        (n,) = struct.unpack("<Q", bytes(source.read(file, 0, 8)))
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"header length {n} is implausible")
        json.loads(bytes(source.read(file, 8, n)))
    except (CheckpointError, ValueError, struct.error) as exc:
        raise CheckpointError(
            f"{where}: {file.rsplit('/', 1)[-1]} is not a safetensors payload ({exc}); refusing to load it"
        ) from None


@dataclass
class _Want:
    name: str
    frag: dict[str, Any]
    first_block: int
    last_block: int  # exclusive
    elements: tuple[int, int]  # absolute element range to copy out
    out_lo: int  # element offset in the output piece

    def byte_range(self) -> tuple[int, int]:
        f, b = self.frag, self.frag["block_bytes"]
        return f["offset"] + self.first_block * b, f["offset"] + min(self.last_block * b, f["length"])


def read_pieces(manifest: Manifest, source: Source, wanted: dict[str, tuple[int, int]], where: str) -> dict[str, torch.Tensor]:
    """Elements [lo, hi) of each wanted tensor as a flat tensor, verified block by block."""
    out: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[_Want]] = {}
    for name, (lo, hi) in wanted.items():
        entry = manifest.tensors.get(name)
        if entry is None:
            raise CheckpointError(f"{where}: has no tensor {name!r}; it was saved from a different model or optimizer")
        dtype = torch_dtype(entry["dtype"], where)
        if not 0 <= lo <= hi <= numel(entry["shape"]):
            raise CheckpointError(f"{where}: {name} has {numel(entry['shape'])} elements, not [{lo}, {hi})")
        out[name] = torch.empty(hi - lo, dtype=dtype)
        size = out[name].element_size()
        for frag in entry["fragments"]:
            flo, fhi = frag["elements"]
            a, b = max(lo, flo), min(hi, fhi)
            if a >= b:
                continue
            block = frag["block_bytes"]
            first, last = (a - flo) * size // block, -(-((b - flo) * size) // block)
            # One want per few blocks, so reading, checking and copying overlap across threads.
            step = max(1, READ_BYTES // block)
            for k in range(first, last, step):
                ea = max(a, flo + k * block // size)
                eb = min(b, flo + min(k + step, last) * block // size)
                by_file.setdefault(frag["file"], []).append(_Want(name, frag, k, min(k + step, last), (ea, eb), ea - lo))
    for f in [_POOL.submit(check_header, source, file, where) for file in sorted(by_file)]:
        f.result()
    runs = [run for file, wants in sorted(by_file.items()) for run in _runs(file, wants)]
    for f in [_POOL.submit(_read_run, source, file, run, out, where) for file, run in runs]:
        f.result()
    return out


def _runs(file: str, wants: list[_Want]) -> list[tuple[str, list[_Want]]]:
    """Merge byte ranges of one file that overlap or nearly touch into reads of at most READ_BYTES."""
    wants.sort(key=lambda w: w.byte_range())
    runs: list[list[_Want]] = []
    begin = end = -1
    for w in wants:
        start, stop = w.byte_range()
        if runs and start <= end + MERGE_GAP and max(end, stop) - begin <= READ_BYTES:
            runs[-1].append(w)
            end = max(end, stop)
        else:
            runs.append([w])
            begin, end = start, stop
    return [(file, run) for run in runs]


def _read_run(source: Source, file: str, run: list[_Want], out: dict[str, torch.Tensor], where: str) -> None:
    start = run[0].byte_range()[0]
    stop = max(w.byte_range()[1] for w in run)
    data = source.read(file, start, stop - start)
    for w in run:  # wants never share a block: each covers whole blocks of its own fragment
        _verify(w, data, start, file, where)
        _copy_out(w, data, start, out[w.name])


def _verify(w: _Want, data: memoryview, start: int, file: str, where: str) -> None:
    f, b = w.frag, w.frag["block_bytes"]
    algorithm = next(a for a in HASHES if f.get(a) is not None)  # check_manifest saw one
    digest = HASHES[algorithm]
    for k in range(w.first_block, w.last_block):
        lo = f["offset"] + k * b - start
        hi = f["offset"] + min((k + 1) * b, f["length"]) - start
        if digest(data[lo:hi]) != f[algorithm][k]:
            raise CheckpointError(
                f"{where}: checksum mismatch in {file} (tensor {w.name!r}, bytes "
                f"{lo + start}..{hi + start}, {algorithm}); the payload is corrupt"
            )


def _copy_out(w: _Want, data: memoryview, start: int, target: torch.Tensor) -> None:
    a, b = w.elements
    size = target.element_size()
    begin = w.frag["offset"] + (a - w.frag["elements"][0]) * size - start
    dst = target.view(torch.uint8).numpy() if target.dtype != torch.bool else target.numpy().view(np.uint8)
    dst[w.out_lo * size : (w.out_lo + b - a) * size] = np.frombuffer(data, dtype=np.uint8, count=(b - a) * size, offset=begin)


@dataclass(frozen=True)
class StorageSource:
    """Payload files of one checkpoint on storage (tier 1): `paths` maps each file the manifest
    names to its checked path under the storage root (Checkpointer.source); no other file reads."""

    read_range: Callable[[str, int, int], bytes]
    paths: dict[str, str]

    def read(self, file: str, offset: int, length: int) -> memoryview:
        return memoryview(self.read_range(self.paths[file], offset, length))


class BufferSource:
    """Payload files held in memory (tier 0), each fetched once on first use by `fetch(file)`
    (which refuses a file the snapshot does not hold)."""

    def __init__(self, fetch: Callable[[str], Any]):
        self.fetch = fetch
        self.buffers: dict[str, memoryview] = {}

    def read(self, file: str, offset: int, length: int) -> memoryview:
        if file not in self.buffers:
            self.buffers[file] = memoryview(self.fetch(file)).cast("B")
        data = self.buffers[file][offset : offset + length]
        if len(data) != length:
            raise CheckpointError(f"in-memory payload {file}: wanted {length} bytes at offset {offset}, it holds fewer")
        return data
