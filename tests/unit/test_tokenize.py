"""Tokenizers a dataset is prepared with: a byte-level BPE trained on the source (or the user's
tokenizer.json) round-trips text, is stored beside the windows in the narrowest integer type,
and is part of the dataset's identity; bad tokenizer input gets exit 2 with the fix."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from elastune.data.dataset import TokenWindows, read_manifest
from elastune.data.prepare import prepare
from elastune.data.tokenize import BYTE_TOKENS, read_bpe, token_dtype
from elastune.errors import DataError
from tests.helpers import ROOT, minimal, spec_problems

TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. "


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src")
    for i in range(20):
        (folder / f"{i}.txt").write_text(f"document {i}: " + TEXT * (5 + i) + "Ünïcödé ✓ ")
    return str(folder / "*.txt")


@pytest.fixture(scope="module")
def bpe(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe") / "ds"
    return out, prepare(source, out, window=9, tokenizer="bpe", vocab_size=320)


def test_a_trained_bpe_round_trips_text_and_windows_hold_its_ids(bpe):
    out, manifest = bpe
    tokens = read_bpe(out / "tokenizer.json")
    assert (manifest.tokenizer, manifest.vocab_size, tokens.vocab_size) == ("bpe", 320, 320)
    for text in (TEXT, "Ünïcödé ✓ and bytes \x01\x7f", ""):
        assert tokens.decode(tokens.encode(text.encode()).tolist()) == text
    assert BYTE_TOKENS.decode(BYTE_TOKENS.encode(TEXT.encode()).tolist()) == TEXT
    assert manifest.dtype == "uint16"  # 320 ids do not fit a byte
    ids = TokenWindows(out).take(np.arange(manifest.count)).reshape(-1)
    assert int(ids.max()) < 320 and int(ids.min()) >= 0
    whole = tokens.decode(ids.tolist())
    assert "document 0: The quick brown fox" in whole  # the windows are the text's tokens, in order


def test_the_narrowest_type_holds_the_vocabulary():
    assert [token_dtype(n).name for n in (256, 257, 65536, 65537, 2**32)] == ["uint8", "uint16", "uint16", "uint32", "uint32"]


def test_the_identity_changes_with_the_tokenizer_and_a_given_tokenizer_json_gives_the_same_tokens(bpe, source, tmp_path):
    out, trained = bpe
    plain = prepare(source, tmp_path / "bytes", window=9)
    other = prepare(source, tmp_path / "other", window=9, tokenizer="bpe", vocab_size=300)
    given = prepare(source, tmp_path / "given", window=9, tokenizer=str(out / "tokenizer.json"))
    assert len({str(m.identity) for m in (plain, trained, other)}) == 3
    assert "tokenizer_hash" not in plain.identity and trained.identity["tokenizer_hash"] == trained.tokenizer_hash
    assert given.identity == trained.identity and read_manifest(tmp_path / "given").content_hash == trained.content_hash


def test_bad_tokenizer_input_is_refused_with_the_fix(source, tmp_path):
    with pytest.raises(DataError, match="at least 257 tokens"):
        prepare(source, tmp_path / "a", window=9, tokenizer="bpe", vocab_size=100)
    with pytest.raises(DataError, match="cannot be reached: this source gives only .* lower --vocab-size or add text"):
        prepare(source, tmp_path / "b", window=9, tokenizer="bpe", vocab_size=60_000)
    (tmp_path / "broken.json").write_text('{"model": ')
    with pytest.raises(DataError, match="is not a tokenizer.json the tokenizers library can read"):
        prepare(source, tmp_path / "c", window=9, tokenizer=str(tmp_path / "broken.json"))
    with pytest.raises(DataError, match="needs --vocab-size"):
        prepare(source, tmp_path / "d", window=9, tokenizer="bpe")
    assert "set data.vocab_size" in spec_problems(minimal(**{"data.tokenizer": "bpe"}))
    assert "is for data.tokenizer bpe" in spec_problems(minimal(**{"data.vocab_size": 4096}))


@pytest.mark.parametrize(
    "args, says",
    [
        (["--tokenizer", "bpe", "--vocab-size", "100"], "at least 257 tokens"),
        (["--tokenizer", "bpe"], "needs --vocab-size"),
        (["--tokenizer", "/nonexistent/tokenizer.json"], "cannot read the tokenizer"),
    ],
)
def test_data_prepare_exits_2_on_bad_tokenizer_arguments(tmp_path, args, says):
    (tmp_path / "t.txt").write_text(TEXT * 20)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "elastune",
            "data",
            "prepare",
            "--source",
            str(tmp_path / "t.txt"),
            "--output",
            str(tmp_path / "d"),
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_a_run_refuses_byte_gpt_on_bpe_tokens_and_a_checkpoint_of_another_tokenizer(bpe, source, tmp_path):
    from elastune.recipes import load_recipe
    from elastune.spec import validate_spec
    from elastune.train.preflight import prepare_data

    out, trained = bpe
    spec = validate_spec(minimal(**{"data.path": str(out), "data.window": 9, "model.options.context": 8}))
    with pytest.raises(DataError, match="reads byte tokens .* holds bpe tokens .* --tokenizer bytes"):
        prepare_data(spec, load_recipe(spec.model, str(tmp_path)))
    plain = prepare(source, tmp_path / "bytes", window=9)
    spec = validate_spec(minimal(**{"data.path": str(tmp_path / "bytes"), "data.window": 9, "model.options.context": 8}))
    recipe = load_recipe(spec.model, str(tmp_path))
    assert prepare_data(spec, recipe, saved=plain.identity) == []  # the same tokens: resumes
    with pytest.raises(DataError, match="trained on tokens of another tokenizer .* --fresh"):
        prepare_data(spec, recipe, saved=trained.identity)
