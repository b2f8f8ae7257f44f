import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from elastune.data.dataset import TokenWindows, read_manifest
from elastune.data.prepare import prepare, stdlib_files
from elastune.errors import DataError


def test_text_windows_are_the_bytes_in_order(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"abcdefghij")
    (tmp_path / "b.txt").write_bytes(b"0123456789")
    m = prepare(str(tmp_path / "*.txt"), tmp_path / "ds", window=4)
    stream = b"abcdefghij\x000123456789\x00"
    assert m.count == len(stream) // 4 and m.tokenizer == "bytes" and m.window == 4
    ds = TokenWindows(tmp_path / "ds")
    got = ds.take(np.array([0, 3, 1]))
    want = [list(stream[i * 4 : i * 4 + 4]) for i in (0, 3, 1)]
    assert got.tolist() == want


def test_jsonl_and_parquet_sources(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in ["hello world", "second doc"]) + "\n")
    a = prepare(str(tmp_path / "d.jsonl"), tmp_path / "j", window=5, text_field="body")
    pq.write_table(pa.table({"body": ["hello world", "second doc"]}), tmp_path / "d.parquet")
    b = prepare(str(tmp_path / "d.parquet"), tmp_path / "p", window=5, text_field="body")
    assert a.content_hash == b.content_hash and a.count == b.count == len(b"hello world\x00second doc\x00") // 5


def test_bad_jsonl_names_line_and_field(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"d.jsonl:2 .* field 'text'"):
        prepare(str(tmp_path / "d.jsonl"), tmp_path / "out", window=4)


def test_chunks_and_random_access_across_them(tmp_path, monkeypatch):
    import elastune.data.prepare as prep

    monkeypatch.setattr(prep, "CHUNK_WINDOWS", 3)
    data = bytes(range(256)) * 4
    (tmp_path / "x.txt").write_bytes(data)
    prepare(str(tmp_path / "x.txt"), tmp_path / "ds", window=8)
    ds = TokenWindows(tmp_path / "ds")
    stream = data + b"\x00"
    idx = np.array([len(ds) - 1, 0, 4, 7, 3])
    assert ds.take(idx).tolist() == [list(stream[i * 8 : i * 8 + 8]) for i in idx]


def test_stdlib_corpus_is_deterministic(tmp_path):
    assert any(p.name == "os.py" for p in stdlib_files())
    a = prepare("stdlib", tmp_path / "a", window=65, max_bytes=100_000)
    b = prepare("stdlib", tmp_path / "b", window=65, max_bytes=100_000)
    assert a.content_hash == b.content_hash and a.count == b.count
    assert 100_000 // 65 <= a.count <= 101_000 // 65  # separators add a byte per file
    assert read_manifest(tmp_path / "a").source == "stdlib"


def test_missing_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(DataError, match="elastune data prepare"):
        TokenWindows(tmp_path / "nothing")


def test_source_matching_nothing(tmp_path):
    with pytest.raises(DataError, match="matches no file"):
        prepare(str(tmp_path / "*.txt"), tmp_path / "out", window=4)


@pytest.mark.parametrize("kind", ["text", "jsonl", "parquet"])
def test_a_preparation_reports_its_progress_to_the_whole_source(tmp_path, kind):
    """Every phase climbs to the source's size on disk, never past it (a BPE reads it twice: once
    to train, once to tokenize), and a terminal shows a bar for each."""
    import io

    from rich.console import Console

    from elastune.data.progress_bar import preparing

    texts = [f"document {i}: " + "lorem ipsum dolor " * (5 + i % 7) for i in range(300)]
    src = tmp_path / "src"
    src.mkdir()
    if kind == "text":
        for i, t in enumerate(texts):
            (src / f"{i}.txt").write_text(t)
    elif kind == "jsonl":
        (src / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    else:
        pq.write_table(pa.table({"text": texts}), src / "docs.parquet", row_group_size=50)
    size = sum(f.stat().st_size for f in src.iterdir())
    seen: dict[str, list[int]] = {}
    prepare(
        str(src),
        tmp_path / "ds",
        window=9,
        tokenizer="bpe",
        vocab_size=300,
        on_progress=lambda phase, done, total: seen.setdefault(phase, []).append((done, total)),
    )
    assert list(seen) == ["training the tokenizer", "tokenizing"]
    for reports in seen.values():
        done = [d for d, _ in reports]
        assert {t for _, t in reports} == {size} and done == sorted(done) and done[-1] <= size
        # Parquet reports row groups by their share of the file (integer division: a few bytes short).
        assert done[-1] == size if kind != "parquet" else size - done[-1] < 8
    shown = io.StringIO()
    with preparing(Console(file=shown, force_terminal=True, width=120)) as on_progress:
        prepare(str(src), tmp_path / "ds2", window=9, on_progress=on_progress)
    assert "tokenizing" in shown.getvalue()
    with preparing(Console(file=io.StringIO())) as on_progress:  # not a terminal: no bar
        assert on_progress is None
