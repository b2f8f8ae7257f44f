"""Turn text, JSONL or Parquet sources into a token-window dataset (see dataset.py).

Tokens are bytes of UTF-8 text (vocabulary 256), or a byte-level BPE's ids (data.tokenize).
Documents are joined with a separator (the byte 0, or the BPE's `<|endoftext|>`) and cut into
non-overlapping windows of `window` tokens; the tail shorter than a window is dropped. The source
is streamed: memory stays bounded by one chunk of windows.

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
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from elastune.data.dataset import EVAL_FILE, MANIFEST_FILE, TOKENS_FILE, DatasetManifest, read_manifest
from elastune.data.split import fraction_problem, held_out
from elastune.data.tokenize import BPE, BYTE_TOKENS, BYTES, TOKENIZER_FILE, Tokens, read_bpe, token_dtype, train_bpe
from elastune.errors import DataError

STDLIB = "stdlib"
CHUNK_WINDOWS = 8192
DOC_SEPARATOR = b"\x00"
# What a long preparation tells its caller as it reads: (phase, source bytes read, source bytes
# in all). Phases: "training the tokenizer" (bpe only: one pass over the training documents),
# then "tokenizing". Bytes are the files' sizes on disk, so a JSONL or Parquet source's count
# is of its lines or row groups.
OnProgress = Callable[[str, int, int], None]


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


def iter_documents(files: list[Path], fmt: str, text_field: str, read: Callable[[int], None] = lambda n: None) -> Iterator[bytes]:
    """Each file's documents; `read(n)`: n more bytes of the files have been read."""
    for path in files:
        kind = _format_of(path, fmt)
        if kind == "text":
            doc = path.read_bytes()
            read(len(doc))
            yield doc
        elif kind == "jsonl":
            with path.open("rb") as f:
                for lineno, line in enumerate(f, 1):
                    read(len(line))
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
            size, rows = path.stat().st_size, max(1, pf.metadata.num_rows)
            for batch in pf.iter_batches(columns=[text_field]):
                read(size * batch.num_rows // rows)
                for text in batch.column(0).to_pylist():
                    if text is not None:
                        yield text.encode("utf-8")


ARROW_TYPES = {np.dtype(np.uint8): pa.uint8(), np.dtype(np.uint16): pa.uint16(), np.dtype(np.uint32): pa.uint32()}


class _WindowWriter:
    """One side's windows: documents' token ids joined by the separator, cut into rows of `window`
    tokens and written in chunks of CHUNK_WINDOWS rows; the sha256 of every row written, in order."""

    def __init__(self, path: Path, window: int, dtype: np.dtype, separator: int):
        self.window, self.dtype, self.count, self.digest = window, dtype, 0, hashlib.sha256()
        self.separator = np.array([separator], dtype=dtype)
        self.parts: list[np.ndarray] = []
        self.pending = 0
        self.schema = pa.schema([pa.field("tokens", pa.list_(ARROW_TYPES[dtype], window))])
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_file(self.sink, self.schema)

    def add(self, ids: np.ndarray) -> None:
        self.parts += [ids.astype(self.dtype, copy=False), self.separator]
        self.pending += len(ids) + 1
        if self.pending >= CHUNK_WINDOWS * self.window:
            self._write(whole_chunks=True)

    def close(self) -> None:
        self._write(whole_chunks=False)
        self.writer.close()
        self.sink.close()

    def _write(self, whole_chunks: bool) -> None:
        """Write what is held: whole chunks (the rest stays), or every whole window (the tail goes)."""
        tokens = np.concatenate(self.parts) if self.parts else np.empty(0, dtype=self.dtype)
        chunk = CHUNK_WINDOWS * self.window
        cut = len(tokens) // (chunk if whole_chunks else self.window) * (chunk if whole_chunks else self.window)
        for lo in range(0, cut, chunk):
            rows = tokens[lo : min(cut, lo + chunk)].reshape(-1, self.window)
            self.digest.update(rows.tobytes())
            self.count += len(rows)
            flat = pa.array(rows.reshape(-1), type=ARROW_TYPES[self.dtype])
            self.writer.write_batch(pa.record_batch([pa.FixedSizeListArray.from_arrays(flat, self.window)], schema=self.schema))
        self.parts = [tokens[cut:]] if whole_chunks else []
        self.pending = len(tokens) - cut if whole_chunks else 0


def _documents(
    files: list[Path], fmt: str, text_field: str, max_bytes: int | None, read: Callable[[int], None] = lambda n: None
) -> Iterator[bytes]:
    """The source's documents, the last one cut where `max_bytes` of source are read."""
    taken = 0
    for whole in iter_documents(files, fmt, text_field, read):
        doc = whole if max_bytes is None else whole[: max(0, max_bytes - taken)]
        taken += len(doc)
        yield doc
        if max_bytes is not None and taken >= max_bytes:
            return


def tokens_for(tokenizer: str, vocab_size: int | None, training_texts: Callable[[], Iterator[str]]) -> Tokens:
    """`tokenizer`: bytes, bpe (trained on `training_texts` to `vocab_size` ids) or the path of a
    tokenizer.json."""
    if tokenizer == BYTES:
        return BYTE_TOKENS
    if tokenizer == BPE:
        if vocab_size is None:
            raise DataError("--tokenizer bpe needs --vocab-size (data.vocab_size): the ids it trains, e.g. 4096")
        return train_bpe(training_texts(), vocab_size)
    return read_bpe(tokenizer)


def prepare(
    source: str | list[str],
    output: str | Path,
    window: int,
    fmt: str = "auto",
    text_field: str = "text",
    max_bytes: int | None = None,
    eval_fraction: float | None = None,
    tokenizer: str = BYTES,
    vocab_size: int | None = None,
    on_progress: OnProgress | None = None,
) -> DatasetManifest:
    """Prepare the dataset into `output`; written to a temporary folder and renamed, so never torn.
    `eval_fraction`: the share of documents held out for evaluation (data.split). `tokenizer`:
    bytes, bpe (trained on the training documents, `vocab_size` ids) or a tokenizer.json path.
    `on_progress`: told of each phase's progress as the source is read (OnProgress)."""
    files = resolve_sources(source)
    if not files:
        raise DataError(f"data.source {source!r} holds no files")
    if eval_fraction is not None and (problem := fraction_problem(eval_fraction)):
        raise DataError(f"data.eval_fraction ({eval_fraction}) {problem}")
    fraction = eval_fraction or 0.0
    on_disk = sum(f.stat().st_size for f in files)
    total = on_disk if max_bytes is None else min(on_disk, max_bytes)

    def counter(phase: str) -> Callable[[int], None]:
        done = 0

        def read(n: int) -> None:
            nonlocal done
            done += n
            if on_progress is not None:
                on_progress(phase, min(done, total), total)

        return read

    def training_texts() -> Iterator[str]:  # a BPE learns from the training side only
        for doc in _documents(files, fmt, text_field, max_bytes, counter("training the tokenizer")):
            if not held_out(doc, fraction):
                yield doc.decode("utf-8", errors="replace")

    tokens = tokens_for(tokenizer, vocab_size, training_texts)
    dtype = token_dtype(tokens.vocab_size)
    output = Path(output)
    tmp = output.with_name(output.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    train = _WindowWriter(tmp / TOKENS_FILE, window, dtype, tokens.separator)
    held = _WindowWriter(tmp / EVAL_FILE, window, dtype, tokens.separator) if eval_fraction else None
    try:
        for doc in _documents(files, fmt, text_field, max_bytes, counter("tokenizing")):
            (held if held is not None and held_out(doc, fraction) else train).add(tokens.encode(doc))
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
    if tokens.json is not None:
        (tmp / TOKENIZER_FILE).write_text(tokens.json, encoding="utf-8")
    manifest = DatasetManifest(
        source=described,
        tokenizer=tokens.kind,
        window=window,
        count=train.count,
        dtype=dtype.name,
        content_hash=train.digest.hexdigest(),
        eval_fraction=eval_fraction,
        eval_count=held.count if held is not None else 0,
        eval_hash=held.digest.hexdigest() if held is not None else None,
        vocab_size=tokens.vocab_size,
        tokenizer_hash=tokens.sha256,
    )
    (tmp / MANIFEST_FILE).write_text(manifest.to_json())
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)
    return manifest


def ensure_prepared(data, on_progress: OnProgress | None = None) -> tuple[DatasetManifest, bool]:
    """Prepare `data` (a DataSpec) at data.path when missing or stale; returns (manifest, prepared_now)."""
    path = Path(data.path)
    if (path / MANIFEST_FILE).is_file():
        manifest = read_manifest(path)
        if _as_asked(manifest, data):
            return manifest, False
        if data.source is None:
            raise DataError(
                f"Dataset {path} has window {manifest.window} but data.window is {data.window}; "
                f"prepare it again with --window {data.window} or set data.source so the run re-prepares it"
            )
    elif data.source is None:
        raise DataError(
            f"No prepared dataset at {path}; run `elastune data prepare --source ... --output {path}` "
            f"or set data.source in the job spec"
        )
    prepared = prepare(
        data.source,
        path,
        data.window,
        data.format,
        data.text_field,
        data.max_bytes,
        data.eval_fraction,
        data.tokenizer,
        data.vocab_size,
        on_progress,
    )
    return prepared, True


def _as_asked(manifest: DatasetManifest, data) -> bool:
    """Whether a prepared dataset is what `data` asks for. Without a source it is the user's to
    prepare: its split and tokenizer are theirs, and only the window must match."""
    if manifest.window != data.window:
        return False
    if data.source is None:
        return True
    if manifest.eval_fraction != data.eval_fraction:
        return False
    if data.tokenizer == BYTES:
        return manifest.tokenizer == BYTES
    if data.tokenizer == BPE:  # trained here: of the vocabulary size asked for
        return manifest.tokenizer == BPE and manifest.vocab_size == data.vocab_size
    return manifest.tokenizer_hash == read_bpe(data.tokenizer).sha256  # the user's tokenizer.json: that very file
