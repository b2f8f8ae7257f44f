"""Checkpoints that cannot lie or escape: every manifest field held to its rule on load, verify,
show and export; files confined to their folder (or a clone's named, committed, marked source);
prune and clear that never follow a symlink or delete what Elastune did not write; a content hash
that reads the bytes. The CLI runs in-process here (exit codes, no traceback); tests/e2e runs it
as a user does."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from elastune.checkpoint.checkpointer import Checkpointer
from elastune.checkpoint.format import MANIFEST, SELF_CHECK, content_digest, step_dir
from elastune.checkpoint.storage import Storage
from elastune.cli.main import main
from elastune.errors import CheckpointError, StorageError
from tests import helpers

STATE = helpers.adam_state()


@pytest.fixture()
def root(tmp_path) -> Path:
    """Steps 5 and 10, each saved by 2 ranks (two payload files)."""
    ckpt = Checkpointer(str(tmp_path / "root"), keep_last=10)
    for step in (5, 10):
        helpers.save_from_ranks(ckpt, (step, step * 8, "h"), STATE, 2)
    return tmp_path / "root"


def edit(root: Path, step: int, change, reseal: bool = True) -> None:
    """Change a committed manifest; `reseal` recomputes its manifest_sha256, as a writer that
    produced the bad content would have, so the per-field rules are what must catch it."""
    path = root / step_dir(step) / MANIFEST
    raw = json.loads(path.read_text())
    change(raw)
    if reseal:
        raw.pop(SELF_CHECK, None)
        raw[SELF_CHECK] = content_digest(raw)
    path.write_text(json.dumps(raw))


def frag(raw: dict, name: str = "model/tok.weight") -> dict:
    return raw["tensors"][name]["fragments"][0]


def cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return code, out.out + out.err


def assert_falls_back(root: Path, reason: str) -> None:
    """Step 10 is corrupt: a load takes step 5, and says why."""
    ckpt = Checkpointer(str(root))
    manifest, tensors = ckpt.load_latest_valid()
    assert manifest.step == 5 and all(torch.equal(tensors[n], t) for n, t in STATE.items())
    assert len(ckpt.skipped) == 1 and reason in ckpt.skipped[0], ckpt.skipped


def test_a_fragment_without_checksums_is_corrupt_not_valid(root, capsys):
    def strip(raw):
        f = frag(raw)
        f["sha256"] = None

    edit(root, 10, strip)
    payload = (
        root
        / step_dir(10)
        / json.loads((root / step_dir(10) / MANIFEST).read_text())["tensors"]["model/tok.weight"]["fragments"][0]["file"]
    )
    data = bytearray(payload.read_bytes())
    data[-1] ^= 0xFF
    payload.write_bytes(bytes(data))
    code, out = cli(capsys, "ckpt", "verify", str(root / step_dir(10)))
    assert code == 1 and "CORRUPT" in out and "model/tok.weight" in out and "carries no checksums" in out
    assert_falls_back(root, "carries no checksums")


MALFORMED = {
    # field -> (mutation of step 10's manifest, words the reason holds)
    "a tenth of the tensor": (lambda r: frag(r).update(elements=[0, 409], length=409 * 4, sha256=frag(r)["sha256"]), "cover"),
    "block_bytes 0": (lambda r: frag(r).update(block_bytes=0), "block_bytes"),
    "block_bytes text": (lambda r: frag(r).update(block_bytes="4096"), "block_bytes"),
    "a short checksum list": (lambda r: frag(r).update(block_bytes=1024), "must list"),
    "an empty checksum list": (lambda r: frag(r).update(sha256=[]), "must list"),
    "a checksum that is not hex": (lambda r: frag(r).update(sha256=["z" * 64]), "hex digest"),
    "elements upside down": (lambda r: frag(r).update(elements=[5, 3]), "elements"),
    "elements past the tensor": (lambda r: frag(r).update(elements=[0, 10**12]), "elements"),
    "elements not a pair": (lambda r: frag(r).update(elements=[0]), "elements"),
    "a negative offset": (lambda r: frag(r).update(offset=-8), "offset"),
    "an offset past any file": (lambda r: frag(r).update(offset=2**62), "offset"),
    "a length that disagrees with dtype x elements": (lambda r: frag(r).update(length=frag(r)["length"] - 4), "disagrees"),
    "an unknown dtype": (lambda r: r["tensors"]["model/tok.weight"].update(dtype="F128"), "dtype"),
    "a negative size": (lambda r: r["tensors"]["model/tok.weight"].update(shape=[-256, 16]), "shape"),
    "no fragments": (lambda r: r["tensors"]["model/tok.weight"].update(fragments=[]), "fragments"),
    "a fragment that is a string": (lambda r: r["tensors"]["model/tok.weight"].update(fragments=["x"]), "not an object"),
    "tensors as a list": (lambda r: r.update(tensors=[]), "tensors"),
    "step as text": (lambda r: r.update(step="10"), "step"),
    "a missing field": (lambda r: r.pop("samples_seen"), "malformed"),
    "a file that is an absolute path": (lambda r: frag(r).update(file="/etc/passwd"), "refusing to read"),
    "a file that is a URI": (lambda r: frag(r).update(file="s3://bucket/x.safetensors"), "refusing to read"),
    "a file with an empty part": (
        lambda r: frag(r).update(file="../step-000000005//rank-00000-of-00002.safetensors"),
        "refusing",
    ),
    "a file in another step not named a source": (
        lambda r: frag(r).update(file="../step-000000005/" + frag(r)["file"]),
        "outside",
    ),
    "sources that are not records": (lambda r: r["meta"].update(sources="everything"), "sources"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_every_malformed_field_is_a_corrupt_checkpoint_named_and_the_previous_one_loads(root, capsys, case):
    mutate, reason = MALFORMED[case]
    edit(root, 10, mutate)
    code, out = cli(capsys, "ckpt", "verify", str(root / step_dir(10)))
    assert code == 1 and "CORRUPT" in out and reason in out, out
    for command in (
        ["ckpt", "show", str(root / step_dir(10))],
        ["ckpt", "export", str(root / step_dir(10)), "--format", "torch", str(root.parent / "x.pt")],
    ):
        code, out = cli(capsys, *command)
        assert code == 1 and reason in out, (command, out)  # a corrupt checkpoint: a failure, told in a line
    code, out = cli(capsys, "ckpt", "ls", str(root))
    assert code == 0 and "no:" in out
    assert_falls_back(root, reason)


def test_a_valid_payload_outside_the_root_is_never_read(root, tmp_path, capsys):
    """A manifest naming a real payload elsewhere, with its correct checksums, still does not load."""
    elsewhere = tmp_path / "elsewhere" / step_dir(5)
    shutil.copytree(root / step_dir(5), elsewhere)
    (root / step_dir(10)).joinpath("rank-00000-of-00002.safetensors").unlink()  # nothing of its own to fall back on
    edit(
        root,
        10,
        lambda r: [
            f.update(file=f"../../elsewhere/{step_dir(5)}/{f['file']}") for e in r["tensors"].values() for f in e["fragments"]
        ],
    )
    code, out = cli(capsys, "ckpt", "verify", str(root / step_dir(10)))
    assert code == 1 and "outside" in out
    # ... nor by naming it a source: the source holds no referrer marker for this checkpoint.
    edit(root, 10, lambda r: r["meta"].update(sources=[{"uri": str(tmp_path / "elsewhere"), "step": 5}]))
    edit(
        root,
        10,
        lambda r: [
            f.update(file=f"../../elsewhere/{step_dir(5)}/{Path(f['file']).name}")
            for e in r["tensors"].values()
            for f in e["fragments"]
        ],
    )
    code, out = cli(capsys, "ckpt", "verify", str(root / step_dir(10)))
    assert code == 1 and "no referrer marker" in out
    assert_falls_back(root, "referrer marker")


def test_a_symlinked_payload_is_not_read_through(root, tmp_path):
    m = Checkpointer(str(root)).read_manifest(10)
    name = frag(m.__dict__)["file"]
    target = tmp_path / "outside.safetensors"
    shutil.copy(root / step_dir(10) / name, target)
    (root / step_dir(10) / name).unlink()
    (root / step_dir(10) / name).symlink_to(target)
    assert_falls_back(root, "symlink")


def test_prune_and_clear_never_follow_a_symlink_or_delete_what_is_not_theirs(root, tmp_path, capsys):
    outside = tmp_path / "outside"
    shutil.copytree(root / step_dir(5), outside / step_dir(99))  # somebody else's checkpoint
    (root / step_dir(99)).symlink_to(outside / step_dir(99), target_is_directory=True)
    (root / step_dir(3)).mkdir()  # a torn save below the newest: ours to sweep
    (root / step_dir(3) / "rank-00000-of-00002.safetensors").write_bytes(b"partial")
    (root / step_dir(4)).mkdir()  # a folder named like a step holding a user's notes: not ours
    (root / step_dir(4) / "notes.txt").write_text("mine")
    ckpt = Checkpointer(str(root), keep_last=1)
    assert ckpt.committed_steps() == [5, 10]  # the symlinked folder is not a checkpoint of this root
    assert ckpt.prune() == [5]
    assert not (root / step_dir(3)).exists() and (root / step_dir(4) / "notes.txt").read_text() == "mine"
    assert any("did not write" in n for n in ckpt.notes)
    code, out = cli(capsys, "ckpt", "clear", str(root), "--yes")
    assert code == 0 and "deleted 1 checkpoint(s)" in out and "symlink" in out and "did not write" in out
    assert sorted(p.name for p in (outside / step_dir(99)).iterdir()) == sorted(
        p.name for p in (tmp_path / "root").parent.joinpath("outside", step_dir(99)).iterdir()
    )
    assert (outside / step_dir(99) / MANIFEST).is_file() and len(list((outside / step_dir(99)).glob("*.safetensors"))) == 2


@pytest.mark.parametrize(
    "marker",
    [
        b"not json",
        b'{"uri": "nosuchscheme://x", "step": 1}',
        b'{"uri": 5, "step": 1}',
        b'{"uri": "/tmp/x"}',
        b'{"uri": "hdfs://nohost:1/x", "step": 2}',
        b"[1, 2]",
    ],
)
def test_a_bad_referrer_marker_is_reported_and_never_blocks_retention(root, marker):
    folder = root / step_dir(5) / "referrers"
    folder.mkdir()
    (folder / "0123456789abcdef.json").write_bytes(marker)
    ckpt = Checkpointer(str(root), keep_last=1)
    assert ckpt.prune() == [5]  # the marker protects nothing
    assert any("ignored the referrer marker" in n for n in ckpt.notes), ckpt.notes
    assert not (root / step_dir(5)).exists()


def test_the_content_hash_reads_the_bytes_a_clone_points_at(root, tmp_path):
    donor = Checkpointer(str(root))
    recipient = Checkpointer(str(tmp_path / "recipient"))
    clone = donor.clone(10, recipient, dst_step=10)
    assert recipient.content_hash(clone) == donor.content_hash(donor.read_manifest(10))
    # A clone whose files point at the other step's payloads, with the donor's checksums: unverifiable.
    helpers.save_from_ranks(donor, (11, 88, "h"), {n: t + 1 if t.is_floating_point() else t for n, t in STATE.items()}, 2)
    edit(
        tmp_path / "recipient",
        10,
        lambda r: [
            f.update(file=f["file"].replace(step_dir(10), step_dir(11))) for e in r["tensors"].values() for f in e["fragments"]
        ],
    )
    edit(tmp_path / "recipient", 10, lambda r: r["meta"].update(sources=[{"uri": str(root), "step": 11}]))
    (root / step_dir(11) / "referrers").mkdir()
    shutil.copy(next((root / step_dir(10) / "referrers").iterdir()), root / step_dir(11) / "referrers")
    wrong = recipient.read_manifest(10)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        recipient.content_hash(wrong)
    # ... and with that step's own checksums too: it loads, and its hash tells it apart.
    other = donor.read_manifest(11)
    edit(
        tmp_path / "recipient",
        10,
        lambda r: [
            e.update(fragments=[{**f, "file": f"../../root/{step_dir(11)}/{f['file']}"} for f in other.tensors[n]["fragments"]])
            for n, e in r["tensors"].items()
        ],
    )
    assert recipient.content_hash(recipient.read_manifest(10)) != donor.content_hash(donor.read_manifest(10))


def test_a_checkpoint_folder_copied_under_another_name_verifies(root, tmp_path, capsys):
    shutil.copytree(root / step_dir(10), tmp_path / "my-copy")
    code, out = cli(capsys, "ckpt", "verify", str(tmp_path / "my-copy"))
    assert code == 0 and "valid" in out, out
    code, out = cli(capsys, "ckpt", "show", str(tmp_path / "my-copy"))
    assert code == 0 and "step 10" in out


@pytest.mark.parametrize("uri", ["nosuchscheme://x", "s3://", "s3:///x", "hdfs://nohost:1/x", "file://host/x"])
def test_unusable_locations_are_bad_input_naming_the_uri(uri, capsys):
    with pytest.raises(StorageError, match="checkpoint location"):
        Storage.from_uri(uri)
    for command in (["ckpt", "show", uri], ["ckpt", "ls", uri], ["ckpt", "prune", uri, "--keep-last", "1"]):
        code, out = cli(capsys, *command)
        assert code == 2 and uri in out and len(out.strip().splitlines()) <= 3, out


def test_a_missing_root_is_bad_input(tmp_path, capsys):
    for command in (
        ["ckpt", "ls", str(tmp_path / "nope")],
        ["ckpt", "show", str(tmp_path / "nope")],
        ["ckpt", "clear", str(tmp_path / "nope"), "--yes"],
    ):
        code, out = cli(capsys, *command)
        assert code == 2 and "does not exist" in out, out
    code, out = cli(capsys, "ckpt", "verify", str(tmp_path / "nope"))
    assert code == 2 and "not a checkpoint" in out


def test_a_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    ckpt = Checkpointer(str(tmp_path / "root"))
    helpers.save_from_ranks(ckpt, (5, 40, "h"), STATE, 1)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.storage, "commit_bytes", full)
    with pytest.raises(OSError):
        helpers.save_from_ranks(ckpt, (10, 80, "h"), STATE, 2)
    assert not (tmp_path / "root" / step_dir(10)).exists()
    assert sorted(os.listdir(tmp_path / "root")) == [step_dir(5)]


def _dcp_folder(tmp_path: Path) -> Path:
    import warnings

    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(
            {"model": {"w": torch.ones(3)}, "progress": {"step": torch.tensor(4), "samples_seen": torch.tensor(32)}},
            checkpoint_id=str(folder),
            no_dist=True,
        )
    return folder


def _rewrite_metadata(folder: Path, change) -> None:
    import pickle

    metadata = pickle.loads((folder / ".metadata").read_bytes())  # the test's own file: a trusted pickle here
    change(metadata)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize(
    "case",
    [
        "outside the folder",
        "an absolute path",
        "a symlink out",
        "an unknown layout",
        "a non-mapping",
        "a float step",
        "truncated",
    ],
)
def test_dcp_import_refuses_malformed_metadata_and_files_outside_its_folder(tmp_path, capsys, case):
    folder = _dcp_folder(tmp_path)
    (tmp_path / "secret.distcp").write_bytes((folder / "__0_0.distcp").read_bytes())  # a valid payload, outside
    relocate = {"outside the folder": "../secret.distcp", "an absolute path": str(tmp_path / "secret.distcp")}
    if case in relocate:
        _rewrite_metadata(folder, lambda m: [setattr(info, "relative_path", relocate[case]) for info in m.storage_data.values()])
    elif case == "a symlink out":
        (folder / "__0_0.distcp").unlink()
        (folder / "__0_0.distcp").symlink_to(tmp_path / "secret.distcp")
    elif case == "an unknown layout":
        (folder / ".metadata").write_bytes((folder / ".metadata").read_bytes().replace(b"torch.strided", b"torch.stridez"))
    elif case == "a non-mapping":
        _rewrite_metadata(folder, lambda m: setattr(m, "storage_data", [1, 2]))
    elif case == "a float step":
        import torch.distributed.checkpoint as dcp

        dcp.save(
            {"model": {"w": torch.ones(3)}, "progress": {"step": torch.tensor(4.5)}}, checkpoint_id=str(folder), no_dist=True
        )
    else:
        (folder / ".metadata").write_bytes((folder / ".metadata").read_bytes()[:40])
    code, out = cli(capsys, "ckpt", "import", str(folder), str(tmp_path / "ours"))
    assert code == 2 and str(folder) in out, out
    assert not (tmp_path / "ours").exists() or not list((tmp_path / "ours").rglob("manifest.json"))


def test_an_unreachable_store_is_bad_input_naming_it(monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    code, out = cli(capsys, "ckpt", "ls", "s3://bucket/x")
    assert code == 2 and "'s3://bucket/x' does not answer" in out and "AWS_ENDPOINT_URL_S3" in out


def test_a_manifest_edited_after_it_was_written_is_corrupt_even_when_every_field_is_legal(root):
    """Dropping a tensor's entry leaves a manifest that follows every rule; its own digest
    still tells: the load falls back instead of returning a state without that tensor."""
    edit(root, 10, lambda raw: raw["tensors"].pop("optim/tok.weight/exp_avg"), reseal=False)
    assert_falls_back(root, "does not match its manifest_sha256")


def test_a_version_2_manifest_without_its_own_digest_still_loads(root):
    def as_v2(raw):
        raw.pop(SELF_CHECK)
        raw["format"] = "elastune.checkpoint/2"

    edit(root, 10, as_v2, reseal=False)
    manifest, tensors = Checkpointer(str(root)).load_latest_valid()
    assert manifest.step == 10 and all(torch.equal(tensors[n], t) for n, t in STATE.items())
