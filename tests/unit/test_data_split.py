"""The held-out split: whole documents on one side, chosen by content alone, recorded in the
dataset's manifest and identity; bad fractions refused with the field and the fix."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastune.data.dataset import TokenWindows, read_manifest
from elastune.data.prepare import prepare
from elastune.data.split import held_out
from elastune.errors import DataError
from tests.helpers import ROOT, minimal, spec_problems


def _write_docs(folder, docs: list[bytes]):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": d.decode("latin-1")}) for d in docs]
    (folder / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=40), min_size=2, max_size=60),
    fraction=st.sampled_from([0.1, 0.25, 0.5]),
    window=st.integers(min_value=2, max_value=9),
)
def test_no_document_is_on_both_sides(tmp_path_factory, lengths, fraction, window):
    # Document i is the letter chr(65 + i % 26) repeated, prefixed by an id byte of its own: every
    # window's bytes name the documents it was cut from.
    docs = [bytes([1 + i]) + bytes([65 + i % 26]) * n for i, n in enumerate(lengths)]
    folder = tmp_path_factory.mktemp("split")
    _write_docs(folder / "src", docs)
    try:
        m = prepare(str(folder / "src" / "docs.jsonl"), folder / "ds", window=window, eval_fraction=fraction)
    except DataError as exc:  # a side with less than one window is refused, saying so
        assert "less than one window" in str(exc) or "fewer than" in str(exc)
        return
    sides = {}
    for split in ("train", "eval"):
        windows = TokenWindows(folder / "ds", split).take(np.arange(m.count if split == "train" else m.eval_count))
        sides[split] = {int(b) for b in windows.reshape(-1).tolist() if 1 <= b <= len(docs)}
    assert not sides["train"] & sides["eval"]
    want_eval = {1 + i for i, d in enumerate(docs) if held_out(d.decode("latin-1").encode("utf-8"), fraction)}
    assert sides["eval"] <= want_eval and sides["train"].isdisjoint(want_eval)


def test_the_split_depends_on_content_alone_and_holds_about_the_fraction():
    docs = [f"document {i}: some text".encode() for i in range(4000)]
    chosen = [held_out(d, 0.1) for d in docs]
    assert chosen == [held_out(d, 0.1) for d in docs]  # no state, no order
    n, p = len(docs), 0.1
    assert abs(sum(chosen) - n * p) < 5 * math.sqrt(n * p * (1 - p))  # a binomial draw, 5 sigma
    assert not any(held_out(d, 0.0) for d in docs[:50])
    assert all(held_out(d, 0.1) <= held_out(d, 0.2) for d in docs)  # a larger fraction holds out a superset


def test_the_manifest_and_identity_record_the_split(tmp_path):
    docs = [f"{i} ".encode() * 40 for i in range(200)]
    _write_docs(tmp_path / "src", docs)
    plain = prepare(str(tmp_path / "src" / "docs.jsonl"), tmp_path / "plain", window=16)
    split = prepare(str(tmp_path / "src" / "docs.jsonl"), tmp_path / "split", window=16, eval_fraction=0.2)
    assert plain.eval_fraction is None and "eval_hash" not in plain.identity
    assert split.eval_count > 0 and split.count < plain.count and split.identity != plain.identity
    assert read_manifest(tmp_path / "split").identity == split.identity
    again = prepare(str(tmp_path / "src" / "docs.jsonl"), tmp_path / "again", window=16, eval_fraction=0.2)
    assert again.identity == split.identity  # deterministic
    with pytest.raises(DataError, match="holds no held-out split; prepare it again with --eval-fraction"):
        TokenWindows(tmp_path / "plain", "eval")


@pytest.mark.parametrize("bad", ["0", "-0.1", "0.7", "nan", "abc"])
def test_data_prepare_refuses_a_bad_fraction_naming_the_rule(tmp_path, bad):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "elastune",
            "data",
            "prepare",
            "--source",
            "stdlib",
            "--output",
            str(tmp_path / "d"),
            "--eval-fraction",
            bad,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2 and "--eval-fraction" in out.stderr and "Traceback" not in out.stderr
    assert "at most 0.5" in out.stderr or "not a number" in out.stderr


@pytest.mark.parametrize("bad", [0, 0.6, -1])
def test_the_spec_refuses_a_bad_fraction_naming_the_field(bad):
    message = spec_problems(minimal(**{"data.eval_fraction": bad}))
    assert ("data.eval_fraction" in message and "0.5" in message) or "greater than 0" in message, message


def test_eval_needs_a_held_out_split(tmp_path):
    # The spec refuses an eval section whose data.source would be prepared without one ...
    message = spec_problems(minimal(**{"data.source": "stdlib", "eval": {"every_samples": 96}}))
    assert "eval needs held-out documents" in message and "set data.eval_fraction" in message
    # ... and a run refuses a dataset prepared without one (exit 2: a DataError), naming the fix.
    from elastune.recipes import load_recipe
    from elastune.spec import validate_spec
    from elastune.train.preflight import prepare_data

    docs = [f"{i} ".encode() * 40 for i in range(50)]
    _write_docs(tmp_path / "src", docs)
    prepare(str(tmp_path / "src" / "docs.jsonl"), tmp_path / "ds", window=17)
    spec = validate_spec(minimal(**{"data.path": str(tmp_path / "ds"), "eval": {"every_samples": 96}}))
    with pytest.raises(DataError, match="has no held-out split; prepare it again with --eval-fraction") as info:
        prepare_data(spec, load_recipe(spec.model, str(tmp_path)))
    assert info.value.exit_code == 2


def test_fitness_by_held_out_loss_needs_an_eval_section_and_plain_pbt():
    pbt = {"interval_samples": 96, "search": {"optimizer.lr": {"scale": "log", "low": 1e-4, "high": 1e-2}}}
    message = spec_problems(minimal(tune={**pbt, "fitness": "eval_loss"}))
    assert "tune.fitness eval_loss" in message and "add one" in message and "tune.fitness: loss" in message
    ranked = minimal(tune={**pbt, "fitness": "eval_loss", "rank_by": "predicted_final_loss"}, eval={"every_samples": 96})
    assert "use mode pbt with rank_by loss" in spec_problems(ranked)
    from elastune.spec import validate_spec

    assert validate_spec(minimal(tune={**pbt, "fitness": "eval_loss"}, eval={"every_samples": 96})).tune.fitness == "eval_loss"
