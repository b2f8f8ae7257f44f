"""Tokenizers a dataset is prepared with: bytes (vocabulary 256, the default) or a byte-level BPE.

A BPE is trained on the source's training documents with the `tokenizers` library, or read from a
user's `tokenizer.json`; it is stored beside the dataset, and its sha256 is part of the dataset's
identity (another tokenizer makes other tokens of the same text). Documents are separated by the
byte 0 (bytes) or the BPE's `<|endoftext|>` token. Token windows are stored in the narrowest
unsigned integer type that holds the vocabulary.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from elastune.errors import DataError

BYTES, BPE = "bytes", "bpe"
SEPARATOR = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
MIN_BPE_VOCAB = 257  # the 256 byte tokens and the separator
MAX_VOCAB = 2**32


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer type holding every id below `vocab_size`."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise DataError(f"a vocabulary of {vocab_size} does not fit 32-bit token ids; use at most {MAX_VOCAB}")


@dataclass(frozen=True)
class Tokens:
    """A tokenizer as preparation uses it: text in, ids out."""

    kind: str  # BYTES or BPE
    vocab_size: int
    separator: int  # the id between documents
    json: str | None = None  # a BPE's tokenizer.json

    def encode(self, doc: bytes) -> np.ndarray:
        if self.json is None:
            return np.frombuffer(doc, dtype=np.uint8)
        return np.asarray(_parsed(self.json).encode(doc.decode("utf-8", errors="replace")).ids, dtype=np.int64)

    @property
    def sha256(self) -> str | None:
        return None if self.json is None else hashlib.sha256(self.json.encode()).hexdigest()

    def decode(self, ids: Iterable[int]) -> str:
        if self.json is None:
            return bytes(ids).decode("utf-8", errors="replace")
        return str(_parsed(self.json).decode(list(ids)))


BYTE_TOKENS = Tokens(BYTES, 256, 0)

_PARSED: dict[str, object] = {}


def _parsed(text: str):
    """The `tokenizers.Tokenizer` of a tokenizer.json text (parsed once per process)."""
    if text not in _PARSED:
        from tokenizers import Tokenizer

        _PARSED[text] = Tokenizer.from_str(text)
    return _PARSED[text]


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokens:
    """A byte-level BPE of `vocab_size` ids trained on `texts` (DataError if the texts cannot
    give that many: too little text for so many merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not MIN_BPE_VOCAB <= vocab_size <= MAX_VOCAB:
        raise DataError(
            f"--vocab-size {vocab_size} is out of range: a byte-level BPE has at least {MIN_BPE_VOCAB} tokens "
            f"(256 bytes and the separator) and at most {MAX_VOCAB}; e.g. --vocab-size 4096"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SEPARATOR],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.get_vocab_size() < vocab_size:
        raise DataError(
            f"--vocab-size {vocab_size} cannot be reached: this source gives only {tokenizer.get_vocab_size()} tokens "
            f"(too little text for more merges); lower --vocab-size or add text"
        )
    return bpe_tokens(tokenizer.to_str(), "the trained BPE")


def bpe_tokens(text: str, where: str) -> Tokens:
    """A BPE from tokenizer.json text; DataError, naming `where`, if it does not parse or has no
    `<|endoftext|>` token to separate documents."""
    try:
        tokenizer = _parsed(text)
    except Exception as exc:  # tokenizers raises its own Exception subclass, with serde's message
        raise DataError(f"{where} is not a tokenizer.json the tokenizers library can read ({exc}); give another file") from None
    separator = tokenizer.token_to_id(SEPARATOR)
    if separator is None:
        raise DataError(f"{where} has no {SEPARATOR} token to separate documents with; add it as a special token")
    return Tokens(BPE, tokenizer.get_vocab_size(), separator, text)


def read_bpe(path: str | Path) -> Tokens:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the tokenizer {file} ({exc}); give a tokenizer.json file") from None
    return bpe_tokens(text, str(file))
