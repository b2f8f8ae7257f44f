"""A prepared token-window dataset: Arrow IPC file, memory-mapped, random access by index.

Layout of a prepared dataset folder:
  tokens.arrow     Arrow IPC file, one column `tokens`: fixed_size_list<uint8|uint16|uint32>[window]
                   (byte tokens, or a BPE's ids in the narrowest type that holds its vocabulary)
  tokenizer.json   a BPE's tokenizer (data.tokenize), when the dataset has one
  eval.arrow       the same for the documents held out for evaluation (with an eval fraction)
  manifest.json    format, source, tokenizer, window, count, dtype, content_hash, and the held-out
                   side's eval_fraction, eval_count and eval_hash

Reading maps the file; `take(indices)` touches only the pages holding those windows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from elastune.errors import DataError

FORMAT = "elastune.token-windows/1"
TOKENS_FILE = "tokens.arrow"
EVAL_FILE = "eval.arrow"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class DatasetManifest:
    source: str
    tokenizer: str
    window: int
    count: int
    dtype: str
    content_hash: str  # sha256 of the training windows, in order
    format: str = FORMAT
    eval_fraction: float | None = None  # the share of documents held out (None: none)
    eval_count: int = 0
    eval_hash: str | None = None  # sha256 of the held-out windows, in order
    vocab_size: int = 256
    tokenizer_hash: str | None = None  # sha256 of tokenizer.json (a BPE's), stored beside the windows

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True) + "\n"

    @property
    def identity(self) -> dict[str, object]:
        """What a checkpoint records of the data its positions refer to: the training windows and,
        when there is one, the held-out split (another split trains on other windows)."""
        out: dict[str, object] = {"count": self.count, "content_hash": self.content_hash}
        if self.tokenizer_hash is not None:
            out |= {"tokenizer": self.tokenizer, "vocab_size": self.vocab_size, "tokenizer_hash": self.tokenizer_hash}
        if self.eval_fraction is not None:
            out |= {"eval_fraction": self.eval_fraction, "eval_count": self.eval_count, "eval_hash": self.eval_hash}
        return out


def read_manifest(path: str | Path) -> DatasetManifest:
    folder = Path(path)
    file = folder / MANIFEST_FILE
    if not file.is_file():
        raise DataError(
            f"No prepared dataset at {folder} ({MANIFEST_FILE} missing); run `elastune data prepare` "
            f"or give data.source in the job spec so the run prepares it"
        )
    try:
        raw = json.loads(file.read_text())
        manifest = DatasetManifest(**raw)
    except (ValueError, TypeError) as exc:
        raise DataError(f"Dataset manifest {file} is malformed ({exc}); prepare the dataset again") from None
    if manifest.format != FORMAT:
        raise DataError(f"Dataset {folder} has format {manifest.format!r}, expected {FORMAT!r}; prepare it again")
    return manifest


class TokenWindows:
    """Memory-mapped fixed-length token windows; `take` returns a LongTensor [len(indices), window].
    `split`: "train", or "eval" for the held-out documents' windows."""

    def __init__(self, path: str | Path, split: str = "train"):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if split == "eval" and self.manifest.eval_fraction is None:
            raise DataError(
                f"Dataset {self.path} holds no held-out split; prepare it again with --eval-fraction "
                f"(or data.eval_fraction in the job spec)"
            )
        expected = self.manifest.count if split == "train" else self.manifest.eval_count
        file = TOKENS_FILE if split == "train" else EVAL_FILE
        reader = pa.ipc.open_file(pa.memory_map(str(self.path / file), "r"))
        chunks, starts, total = [], [], 0
        for i in range(reader.num_record_batches):
            column = reader.get_batch(i).column(0)
            # Zero-copy view of the mapped values: [rows, window].
            values = column.values.to_numpy(zero_copy_only=True).reshape(len(column), self.manifest.window)
            chunks.append(values)
            starts.append(total)
            total += len(column)
        if total != expected:
            raise DataError(
                f"Dataset {self.path} holds {total} {split} windows but its manifest says {expected}; prepare it again"
            )
        self._count = total
        self._chunks = chunks
        self._starts = np.asarray(starts, dtype=np.int64)

    def __len__(self) -> int:
        return self._count

    @property
    def window(self) -> int:
        return self.manifest.window

    def take(self, indices: np.ndarray) -> torch.Tensor:
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.window), dtype=np.int64)
        which = np.searchsorted(self._starts, indices, side="right") - 1
        for chunk in np.unique(which):
            sel = which == chunk
            out[sel] = self._chunks[chunk][indices[sel] - self._starts[chunk]]
        return torch.from_numpy(out)
