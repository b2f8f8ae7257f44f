"""Turn text, JSONL or Parquet sources into a token-window dataset (see dataset.py).

Tokens are bytes of UTF-8 text (vocabulary 256). Documents are joined with a 0 byte between
them and cut into non-overlapping windows of `window` tokens; the tail shorter than a window is
dropped. The source is streamed: memory stays bounded by one chunk of windows.

With an `eval_fraction`, whole documents are held out for evaluation (data.split) and cut into
windows of their own (eval.arrow): no document, and so no window, is on both sides.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from elastune.data.dataset import EVAL_FILE, MANIFEST_FILE, TOKENS_FILE, DatasetManifest, read_manifest
from elastune.data.split import fraction_problem, held_out
from elastune.errors import DataError

STDLIB = "stdlib"
CHUNK_WINDOWS = 8192
DOC_SEPARATOR = b"\x00"


def stdlib_files() -> list[Path]:
    """This interpreter's standard library sources, test suites and site-packages left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)]
    return sorted(files)


def resolve_sources(source: str | list[str]) -> list[Path]:
    if source == STDLIB:
        return stdlib_files()
    patterns = [source] if isinstance(source, str) else list(source)
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise DataError(f"data.source {pattern!r} matches no file; give an existing path or glob, or 'stdlib'")
        for m in matches:
            p = Path(m)
            files.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
    return files


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "text"


def iter_documents(files: list[Path], fmt: str, text_field: str) -> Iterator[bytes]:
    for path in files:
        kind = _format_of(path, fmt)
        if kind == "text":
            yield path.read_bytes()
        elif kind == "jsonl":
            with path.open("rb") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                        text = record[text_field]
                    except (ValueError, KeyError, TypeError):
                        raise DataError(
                            f"{path}:{lineno} is not a JSON object with a string field {text_field!r}; "
                            f"fix the line or set data.text_field to the field that holds the text"
                        ) from None
                    yield str(text).encode("utf-8")
        else:
            pf = pq.ParquetFile(path)
            if text_field not in pf.schema_arrow.names:
                raise DataError(
                    f"{path} has no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                    f"set data.text_field to the text column"
                )
            for batch in pf.iter_batches(columns=[text_field]):
                for text in batch.column(0).to_pylist():
                    if text is not None:
                        yield text.encode("utf-8")


class _WindowWriter:
    """One side's windows: documents joined by DOC_SEPARATOR, cut into rows of `window` bytes and
    written in chunks of CHUNK_WINDOWS rows; the sha256 of every row written, in order."""

    def __init__(self, path: Path, window: int):
        self.window, self.count, self.digest, self.buffer = window, 0, hashlib.sha256(), bytearray()
        self.schema = pa.schema([pa.field("tokens", pa.list_(pa.uint8(), window))])
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_file(self.sink, self.schema)

    def add(self, doc: bytes) -> None:
        self.buffer += doc + DOC_SEPARATOR
        chunk_bytes = CHUNK_WINDOWS * self.window
        while len(self.buffer) >= chunk_bytes:
            self._write(bytes(self.buffer[:chunk_bytes]))
            del self.buffer[:chunk_bytes]

    def close(self) -> None:
        rows = len(self.buffer) // self.window
        if rows:
            self._write(bytes(self.buffer[: rows * self.window]))
        self.writer.close()
        self.sink.close()

    def _write(self, data: bytes) -> None:
        rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, self.window)
        self.digest.update(rows.tobytes())
        self.count += len(rows)
        flat = pa.array(rows.reshape(-1), type=pa.uint8())
        self.writer.write_batch(pa.record_batch([pa.FixedSizeListArray.from_arrays(flat, self.window)], schema=self.schema))


def prepare(
    source: str | list[str],
    output: str | Path,
    window: int,
    fmt: str = "auto",
    text_field: str = "text",
    max_bytes: int | None = None,
    eval_fraction: float | None = None,
) -> DatasetManifest:
    """Prepare the dataset into `output`; written to a temporary folder and renamed, so never torn.
    `eval_fraction`: the share of documents held out for evaluation (data.split)."""
    files = resolve_sources(source)
    if not files:
        raise DataError(f"data.source {source!r} holds no files")
    if eval_fraction is not None and (problem := fraction_problem(eval_fraction)):
        raise DataError(f"data.eval_fraction ({eval_fraction}) {problem}")
    output = Path(output)
    tmp = output.with_name(output.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    train = _WindowWriter(tmp / TOKENS_FILE, window)
    held = _WindowWriter(tmp / EVAL_FILE, window) if eval_fraction else None
    taken = 0
    try:
        for whole in iter_documents(files, fmt, text_field):
            doc = whole if max_bytes is None else whole[: max(0, max_bytes - taken)]
            taken += len(doc)
            (held if held is not None and held_out(doc, eval_fraction or 0.0) else train).add(doc)
            if max_bytes is not None and taken >= max_bytes:
                break
    finally:
        train.close()
        if held is not None:
            held.close()
    if train.count == 0:
        raise DataError(f"data.source {source!r} has fewer than {window} bytes: not one window; add text or lower data.window")
    if held is not None and held.count == 0:
        raise DataError(
            f"data.eval_fraction ({eval_fraction}) held out less than one window of {source!r}; "
            f"raise data.eval_fraction or add documents"
        )
    described = (
        STDLIB
        if source == STDLIB
        else f"{len(files)} file(s): {', '.join(str(f) for f in files[:3])}{' ...' if len(files) > 3 else ''}"
    )
    manifest = DatasetManifest(
        source=described,
        tokenizer="bytes",
        window=window,
        count=train.count,
        dtype="uint8",
        content_hash=train.digest.hexdigest(),
        eval_fraction=eval_fraction,
        eval_count=held.count if held is not None else 0,
        eval_hash=held.digest.hexdigest() if held is not None else None,
    )
    (tmp / MANIFEST_FILE).write_text(manifest.to_json())
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)
    return manifest


def ensure_prepared(data) -> tuple[DatasetManifest, bool]:
    """Prepare `data` (a DataSpec) at data.path when missing or stale; returns (manifest, prepared_now)."""
    path = Path(data.path)
    if (path / MANIFEST_FILE).is_file():
        manifest = read_manifest(path)
        # Without a source the dataset is the user's to prepare: its split is whatever they chose.
        split = data.eval_fraction if data.source is not None else manifest.eval_fraction
        if manifest.window == data.window and manifest.eval_fraction == split:
            return manifest, False
        if data.source is None:
            raise DataError(
                f"Dataset {path} has window {manifest.window} and eval fraction {manifest.eval_fraction} but the spec "
                f"asks for data.window {data.window} and data.eval_fraction {data.eval_fraction}; prepare it again "
                f"(--window, --eval-fraction) or set data.source so the run re-prepares it"
            )
    elif data.source is None:
        raise DataError(
            f"No prepared dataset at {path}; run `elastune data prepare --source ... --output {path}` "
            f"or set data.source in the job spec"
        )
    return prepare(data.source, path, data.window, data.format, data.text_field, data.max_bytes, data.eval_fraction), True
