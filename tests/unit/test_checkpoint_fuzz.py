"""The checkpoint fuzz tier: hypothesis mutates real manifests (every field: types, values,
paths, sizes, checksums, structure) and the files beside them (symlinks, truncations, flipped
bytes), then runs what users run on them: verify, load (with its fallback), show, prune and clear.

Properties, whatever the mutation:
- nothing but Elastune's own errors comes out (never a traceback in the CLI);
- no read lands outside the checkpoint root and the clone source the manifest names;
- prune and clear never delete outside the root, and never fail;
- verify's answer matches the truth: it says valid exactly when a load returns every tensor's
  original bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elastune.checkpoint.checkpointer import Checkpointer
from elastune.checkpoint.format import MANIFEST, step_dir
from elastune.checkpoint.storage import Storage
from elastune.errors import ElastuneError
from tests import helpers

STATE = helpers.adam_state()

RUNS = {"manifest": 200, "files": 40}  # cases per property; the note on the issue quotes these


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """root/ with steps 5 and 10 (2 ranks each), donor/ with step 3 that root's step 7 clones,
    and outside/ holding a valid copy of step 10 that nothing may read or delete."""
    base = tmp_path_factory.mktemp("fuzz")
    root = Checkpointer(str(base / "root"), keep_last=10)
    for step in (5, 10):
        helpers.save_from_ranks(root, (step, step * 8, "h"), STATE, 2)
    donor = Checkpointer(str(base / "donor"), keep_last=10)
    helpers.save_from_ranks(donor, (3, 24, "h"), STATE, 1)
    donor.clone(3, root, dst_step=7)
    shutil.copytree(base / "root" / step_dir(10), base / "outside" / step_dir(10))
    return base


def fresh(pristine: Path, tmp: Path) -> Path:
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(pristine, tmp, symlinks=True)
    # The clone's references are relative: the copy keeps them; its source markers name the old place.
    for marker in (tmp / "donor").rglob("referrers/*.json"):
        ref = json.loads(marker.read_text())
        marker.write_text(json.dumps({**ref, "uri": ref["uri"].replace(str(pristine), str(tmp))}))
    for manifest in (tmp / "root").glob("step-*/manifest.json"):
        manifest.write_text(manifest.read_text().replace(str(pristine), str(tmp)))
    return tmp


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def leaves(node, path=()):
    """Every (path, value) in a JSON tree, containers included."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from leaves(v, (*path, i))


HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 7, 4096, 2**62, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(
        [
            "../../outside/step-000000010/rank-00000-of-00002.safetensors",
            "/etc/passwd",
            "../step-000000005/rank-00000-of-00002.safetensors",
            "..",
            ".",
            "",
            "rank-00000-of-00002.safetensors\x00",
            "s3://bucket/x",
            "../" * 40 + "etc/passwd",
            "F32",
            "BF16",
            "U8",
            "0" * 64,
            "a" * 64,
            "sha256",
            "xxh3_64",
        ]
    ),
    st.lists(st.integers(-5, 10**6), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


@st.composite
def manifest_mutations(draw, raw: dict):
    """A few edits of a manifest's JSON: replace a value, delete a key, duplicate a list item, add a key."""
    out = json.loads(json.dumps(raw))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p, _ in leaves(out) if p]
        path = draw(st.sampled_from(paths))
        parent = out
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "duplicate", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(HOSTILE)
        elif action == "delete":
            del parent[path[-1]]
        elif action == "duplicate" and isinstance(parent, list):
            parent.append(json.loads(json.dumps(parent[path[-1]])))
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(HOSTILE)
    return out


class Reads:
    """Every path storage reads, as the test watches it (not a fake: the reads happen)."""

    def __init__(self, monkeypatch):
        self.paths: list[str] = []
        real = Storage.read_range

        def read_range(storage, rel, offset, length):
            data = real(storage, rel, offset, length)
            self.paths.append(os.path.realpath(storage.path(rel)))  # read: it did not refuse
            return data

        monkeypatch.setattr(Storage, "read_range", read_range)


def check(tmp: Path, reads: Reads, allowed: tuple[Path, ...]) -> None:
    """The properties, on the checkpoint at tmp/root/step-000000010 as it now is."""
    outside = tree_digest(tmp / "outside")
    ckpt = Checkpointer(str(tmp / "root"), keep_last=10)
    valid = True
    try:
        manifest = ckpt.read_manifest(10)
        loaded = ckpt.load(manifest)
    except ElastuneError:
        valid = False
    roots = tuple(os.path.realpath(a) + os.sep for a in allowed)
    assert all(p.startswith(roots) for p in reads.paths), [p for p in reads.paths if not p.startswith(roots)]
    if valid:  # verify said valid: every byte a load returns is the original
        assert (
            set(loaded) <= set(STATE)
            and all(loaded[n].reshape(-1).view(torch.uint8).equal(STATE[n].reshape(-1).view(torch.uint8)) for n in loaded)
            and set(loaded) == set(STATE)
        ), "verify said valid, but the bytes differ"
    got = ckpt.load_latest_valid()  # the newest that loads: 10 if it is valid, else 7 (the clone) or 5
    assert got is not None and got[0].step in ((10,) if valid else (7, 5))
    ckpt.policy = ckpt.policy.__class__(keep_last=1)
    ckpt.prune()
    ckpt.clear()
    assert tree_digest(tmp / "outside") == outside  # nothing outside was touched
    assert (tmp / "donor" / step_dir(3) / MANIFEST).is_file()  # the clone's source stays (another root)


@settings(
    max_examples=RUNS["manifest"],
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_mutated_manifests(pristine, tmp_path_factory, monkeypatch, data):
    tmp = fresh(pristine, tmp_path_factory.getbasetemp() / "case")
    path = tmp / "root" / step_dir(10) / MANIFEST
    raw = json.loads(path.read_text())
    mutated = data.draw(manifest_mutations(raw))
    path.write_text(json.dumps(mutated, allow_nan=True))
    check(tmp, Reads(monkeypatch), (tmp / "root", tmp / "donor"))


FILE_MUTATIONS = [
    "flip a payload byte",
    "truncate a payload",
    "payload -> symlink to the outside copy",
    "step folder -> symlink to outside",
    "manifest -> symlink to the outside copy",
    "payload -> symlink to /etc/hosts",
    "empty manifest",
    "manifest is a folder",
    "payload is a folder",
    "remove a payload",
]


@settings(
    max_examples=RUNS["files"],
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(what=st.sampled_from(FILE_MUTATIONS), rank=st.integers(0, 1), where=st.integers(0, 10**6))
def test_mutated_files(pristine, tmp_path_factory, monkeypatch, what, rank, where):
    tmp = fresh(pristine, tmp_path_factory.getbasetemp() / "case")
    folder = tmp / "root" / step_dir(10)
    payload = folder / f"rank-{rank:05d}-of-00002.safetensors"
    if what == "flip a payload byte":
        data = bytearray(payload.read_bytes())
        data[where % len(data)] ^= 0x40
        payload.write_bytes(bytes(data))
    elif what == "truncate a payload":
        data = payload.read_bytes()
        payload.write_bytes(data[: where % len(data)])
    elif what.startswith("payload -> symlink"):
        payload.unlink()
        payload.symlink_to("/etc/hosts" if "hosts" in what else tmp / "outside" / step_dir(10) / payload.name)
    elif what == "step folder -> symlink to outside":
        shutil.rmtree(folder)
        folder.symlink_to(tmp / "outside" / step_dir(10), target_is_directory=True)
    elif what == "manifest -> symlink to the outside copy":
        (folder / MANIFEST).unlink()
        (folder / MANIFEST).symlink_to(tmp / "outside" / step_dir(10) / MANIFEST)
    elif what == "empty manifest":
        (folder / MANIFEST).write_text("")
    elif what == "manifest is a folder":
        (folder / MANIFEST).unlink()
        (folder / MANIFEST).mkdir()
    elif what == "payload is a folder":
        payload.unlink()
        payload.mkdir()
    else:
        payload.unlink()
    check(tmp, Reads(monkeypatch), (tmp / "root", tmp / "donor"))


def test_the_fuzz_reaches_both_answers(pristine, tmp_path):
    """Not vacuous: the unmutated case is valid, and one flipped byte is not."""
    tmp = fresh(pristine, tmp_path / "case")
    assert Checkpointer(str(tmp / "root")).load(Checkpointer(str(tmp / "root")).read_manifest(10))
    payload = tmp / "root" / step_dir(10) / "rank-00000-of-00002.safetensors"
    data = bytearray(payload.read_bytes())
    data[-1] ^= 1
    payload.write_bytes(bytes(data))
    with pytest.raises(ElastuneError):
        Checkpointer(str(tmp / "root")).load(Checkpointer(str(tmp / "root")).read_manifest(10))
    assert math.isfinite(len(data))
