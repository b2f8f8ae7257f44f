"""Submission rules: which address wins, what travels with a job (and what never does: credentials
and keys), the version pins, where the token comes from and where it must not go in clear."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import pytest
import yaml

from elastune.cli.main import main
from elastune.errors import ElastuneError
from elastune.spec import validate_spec
from elastune.submit.address import DEFAULT_ADDRESS, Address, resolve_address, token_in_clear
from elastune.submit.client import token, token_warning
from elastune.submit.package import (
    EXCLUDES,
    SECRET_EXCLUDES,
    build_submission,
    excluded,
    mismatches,
    plan_upload,
    ray_packing,
)

QUICKSTART = yaml.safe_load((Path(__file__).resolve().parents[2] / "jobs" / "quickstart.yaml").read_text())


def test_the_flag_wins_over_the_environment_which_only_defaults():
    env = {"RAY_ADDRESS": "http://ray-address:8265", "RAY_API_SERVER_ADDRESS": "http://api-server:8265"}
    assert resolve_address("http://flag:8265/", env).describe() == "http://flag:8265 (from --address)"
    assert resolve_address("head:8265", env).url == "http://head:8265"  # a bare host:port is a dashboard URL
    assert resolve_address(None, env).describe() == "http://api-server:8265 (from RAY_API_SERVER_ADDRESS)"
    assert resolve_address(None, {"RAY_ADDRESS": "http://ray-address:8265"}).source == "RAY_ADDRESS"
    # Inside a Ray job RAY_ADDRESS is the cluster's core address, not its Jobs API: not a guess.
    assert resolve_address(None, {"RAY_ADDRESS": "10.0.0.5:6379"}).url == DEFAULT_ADDRESS
    for bad in ("ray://head:10001", "http://head:port"):
        with pytest.raises(ElastuneError, match="--address"):
            resolve_address(bad, {})


def test_what_travels(tmp_path):
    for path in (
        "job.yaml",
        "model.py",
        "pkg/layers.py",
        ".git/HEAD",
        ".venv/lib/x.py",
        "pkg/__pycache__/a.pyc",
        "runs/q/metrics.jsonl",
        ".elastune/data/tokens.arrow",
        "data/big/tokens.arrow",
        "weights.safetensors",
    ):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x" * 10)
    raw = {**QUICKSTART, "data": {"path": str(tmp_path / "data" / "big"), "window": 65}, "output_dir": str(tmp_path / "out")}
    sub = build_submission(validate_spec(raw), tmp_path / "job.yaml", tmp_path)
    assert "/data/big" in sub.runtime_env["excludes"]  # the spec's own dataset, inside the folder
    assert (sub.upload_files, sub.upload_bytes) == (3, 30)  # job.yaml, model.py, pkg/layers.py
    assert sub.entrypoint == "python -m elastune run job.yaml"
    assert sub.runtime_env["py_modules"][0].endswith("elastune") and sub.runtime_env["working_dir"] == str(tmp_path)
    assert validate_spec(__import__("json").loads(sub.metadata["elastune_spec"])).name == "quickstart"
    assert not sub.warnings  # absolute output and checkpoint paths
    relative = build_submission(validate_spec({**raw, "output_dir": "runs"}), tmp_path / "job.yaml", tmp_path)
    assert any("output_dir and checkpoint.path are relative" in w for w in relative.warnings)
    assert len(plan_upload(tmp_path, ["*.py"]).files) == 7  # only the three .py files are out: no default excludes here
    with pytest.raises(ElastuneError, match="outside the working directory"):
        build_submission(validate_spec(raw), tmp_path / "job.yaml", tmp_path / "pkg")


def test_exclude_patterns():
    assert excluded(".venv/lib/x.py", [".venv"]) and excluded("a/b/__pycache__/c.pyc", ["__pycache__"])
    assert excluded("data/big/t.arrow", ["/data/big"]) and not excluded("src/data/big/t.arrow", ["/data/big"])
    assert excluded("w.safetensors", ["*.safetensors"]) and not excluded("model.py", ["*.safetensors"])
    assert excluded("logs/a/b.txt", ["logs/a"]) and not excluded("model.py", ["logs/a"])
    # gitignore, as Ray reads it: a '/' inside anchors the pattern at the working directory, '**/' frees it again;
    # a trailing '/' matches what a folder holds, not the folder itself (Ray still walks into it).
    anchored, free = [".docker/config.json"], ["**/.docker/config.json"]
    assert excluded(".docker/config.json", anchored) and not excluded("sub/.docker/config.json", anchored)
    assert excluded("sub/.docker/config.json", free) and excluded(".docker/config.json", free)
    assert excluded("sub/.aws/credentials", [".aws/"]) and not excluded("sub/.aws", [".aws/"])
    assert excluded("a/b.key", ["*.key"]) and not excluded("a/b.key", ["*.key", "!/a/b.key"])  # the last match decides


def test_pins_ignore_local_build_tags_but_not_releases():
    assert (
        mismatches("python==3.11 torch==2.13.0+cpu ray==2.60.0", {"python": "3.11", "torch": "2.13.0+cu128", "ray": "2.60.0"})
        == []
    )
    assert mismatches("python==3.11 torch==2.13.0 ray==2.60.0", {"python": "3.12", "torch": "2.12.0", "ray": "2.60.0"}) == [
        "python 3.12 (the job was submitted with 3.11)",
        "torch 2.12.0 (the job was submitted with 2.13.0)",
    ]
    assert mismatches("ray==2.60.0", {}) == ["ray missing (the job was submitted with 2.60.0)"]


def test_the_token_is_found_where_ray_looks(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert token({}) is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    (tmp_path / "file").write_text("from-path")
    assert token({}) == "from-home"
    assert token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "file")}) == "from-path"
    assert token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "file")}) == "from-env"
    assert token({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "from-env"}) is None


# ---------------------------------------------------------------- what never travels

# Each secret pattern -> files it keeps back (each file's first matching pattern), at the top and nested.
SECRETS = {
    ".env": [".env", "sub/.env"],
    ".env.*": [".env.example", "a/b/.env.production"],
    ".envrc": [".envrc", "sub/.envrc"],
    ".aws/": [".aws/credentials", "sub/.aws/config"],
    ".ssh/": [".ssh/known_hosts", "sub/.ssh/id_ed25519"],
    ".gnupg/": [".gnupg/private-keys-v1.d/k.key"],
    ".azure/": [".azure/msal_token_cache.json"],
    "**/.config/gcloud/": [".config/gcloud/application_default_credentials.json", "home/.config/gcloud/credentials.db"],
    ".kube/": [".kube/config", "ops/.kube/config"],
    "kubeconfig": ["kubeconfig", "ops/kubeconfig"],
    "*.kubeconfig": ["prod.kubeconfig", "ops/staging.kubeconfig"],
    "*.pem": ["server.pem", "certs/ca.pem"],
    "*.key": ["tls.key", "certs.key/inside.txt"],  # a folder a pattern matches: Ray skips all of it
    "*.p12": ["client.p12", "certs/client.p12"],
    "*.pfx": ["client.pfx"],
    "id_rsa*": ["id_rsa", "deploy/id_rsa.pub"],
    "id_dsa*": ["id_dsa"],
    "id_ecdsa*": ["keys/id_ecdsa_sk"],
    "id_ed25519*": ["id_ed25519", "deploy/id_ed25519"],
    ".netrc": [".netrc", "sub/.netrc"],
    "_netrc": ["_netrc"],
    ".git-credentials": [".git-credentials"],
    "**/.docker/config.json": [".docker/config.json", "sub/.docker/config.json"],
    ".pypirc": [".pypirc"],
    ".npmrc": ["web/.npmrc"],
    ".pgpass": [".pgpass"],
    ".s3cfg": [".s3cfg"],
    ".boto": [".boto"],
    "credentials.json": ["credentials.json", "google/credentials.json"],
    "service-account*.json": ["service-account.json", "gcp/service-account-prod.json"],
    "*.tfstate": ["terraform.tfstate", "infra/prod.tfstate"],
    "*.tfstate.backup": ["terraform.tfstate.backup"],
    ".vault-token": [".vault-token"],
    "**/.ray/auth_token": [".ray/auth_token"],
}
# Innocent files with secret-sounding names: all of them travel.
LOOK_ALIKES = [
    "job.yaml",
    "id_map.py",
    "keys.py",
    "environment.yaml",
    "pem_utils.py",
    "env.py",
    "envs/train.yaml",
    "monkey.py",
    "aws_utils.py",
    "ssh.py",
    "kube/deploy.yaml",
    "docker/config.json",
    ".docker/daemon.json",
    ".config/settings.json",
    "credentials.py",
    "service_account.md",
    "tfstate.py",
    "key.txt",
    "pem/README.md",
    "netrc.md",
    ".ray/notes.txt",
    "misc/.aws",
    ".environment",
    "identity.py",
    "identity_rsa.py",
]


def project(root: Path, extra: dict[str, str] | None = None) -> Path:
    """A working directory holding every SECRETS and LOOK_ALIKES file, sizes by position (all different)."""
    paths = [p for files in SECRETS.values() for p in files] + LOOK_ALIKES
    for i, path in enumerate(paths):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("x" * (i + 1))
    for path, text in (extra or {}).items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


def travelling(upload) -> set[str]:
    return {path for path, _ in upload.files}


def test_every_secret_pattern_has_cases_and_none_of_them_travel(tmp_path):
    assert list(SECRETS) == list(SECRET_EXCLUDES)  # every pattern covered, in its order
    upload = plan_upload(project(tmp_path), list(EXCLUDES))
    assert upload.kept_back == {pattern: sorted(files) for pattern, files in SECRETS.items()}
    assert travelling(upload) == set(LOOK_ALIKES)
    assert upload.secrets_sent == [] and upload.unused_includes == []
    assert upload.excludes == [*EXCLUDES, *SECRET_EXCLUDES]  # what Ray receives: every secret pattern, nothing put back


# --include-secret patterns -> the files they send (gitignore style, as --exclude): exactly those, nothing else.
INCLUDES = [
    ([".env"], [".env", "sub/.env"]),  # no '/': any depth
    (["/.env"], [".env"]),  # anchored
    ([".env.example"], [".env.example"]),
    ([".aws"], [".aws/credentials", "sub/.aws/config"]),  # a folder: all it holds
    (["sub/.ssh/id_ed25519"], ["sub/.ssh/id_ed25519"]),  # one file inside a kept-back folder
    (["*.pem"], ["certs/ca.pem", "server.pem"]),
    (["certs.key/inside.txt"], ["certs.key/inside.txt"]),  # inside a folder Ray would skip whole
    (["kubeconfig", "deploy/"], ["deploy/id_ed25519", "deploy/id_rsa.pub", "kubeconfig", "ops/kubeconfig"]),
]


@pytest.mark.parametrize(("include", "sent"), INCLUDES, ids=[" ".join(i) for i, _ in INCLUDES])
def test_include_secret_sends_exactly_what_it_names(tmp_path, include, sent):
    upload = plan_upload(project(tmp_path), list(EXCLUDES), include)
    assert upload.secrets_sent == sent and upload.unused_includes == []
    assert travelling(upload) == set(LOOK_ALIKES) | set(sent)
    kept = sorted(p for files in upload.kept_back.values() for p in files)
    assert kept == sorted({p for files in SECRETS.values() for p in files} - set(sent))
    assert all(e.startswith("!/") for e in upload.excludes[len(EXCLUDES) + len(SECRET_EXCLUDES) :])  # exact paths only


def test_an_exclude_wins_over_include_secret_and_nothing_else_puts_a_secret_back(tmp_path):
    project(tmp_path, {".gitignore": "!.env\n", ".rayignore": "# nothing\n"})
    upload = plan_upload(tmp_path, [*EXCLUDES, "*.pem"], ["*.pem", "nothing-matches"])
    assert upload.secrets_sent == [] and upload.unused_includes == ["*.pem", "nothing-matches"]
    assert ".env" not in travelling(upload)  # a '!' in .gitignore is Ray's other matcher: it cannot undo an exclude
    raw = {**QUICKSTART, "data": {"path": str(tmp_path / "data"), "window": 65}, "output_dir": str(tmp_path / "out")}
    with pytest.raises(ElastuneError, match=r"--exclude '!\.env' starts with '!'.*--include-secret"):
        build_submission(validate_spec(raw), tmp_path / "job.yaml", tmp_path, ["!.env"])
    for bad in ("", "!.env", "# .env"):
        with pytest.raises(ElastuneError, match="--include-secret"):
            build_submission(validate_spec(raw), tmp_path / "job.yaml", tmp_path, [], [bad])
    for unreadable in ("[z-a]", "\\"):  # Ray's packing fails on them: named before anything is sent
        with pytest.raises(ElastuneError, match=f"{re.escape(repr(unreadable))} is not one Ray can read"):
            build_submission(validate_spec(raw), tmp_path / "job.yaml", tmp_path, [unreadable])
    sub = build_submission(validate_spec(raw), tmp_path / "job.yaml", tmp_path, [], [".env", "none"])
    assert any(w == "--include-secret sends 2 files that the secret rules keep back: .env, sub/.env" for w in sub.warnings)
    assert any(w.startswith("--include-secret 'none' sends nothing") for w in sub.warnings)
    (tmp_path / "sub" / ".rayignore").write_text("[z-a]\n")  # Ray's upload would fail on it too
    with pytest.raises(ElastuneError, match=r"a \.gitignore or \.rayignore file under .* holds a line Ray's packing cannot read"):
        plan_upload(tmp_path, list(EXCLUDES))


def test_the_elastune_package_itself_travels_whole(tmp_path):
    # Ray applies the runtime_env's excludes to py_modules too: no secret pattern may cut into elastune.
    package = Path(__file__).resolve().parents[2] / "platform" / "elastune"
    assert plan_upload(package, list(EXCLUDES)).kept_back == {}


@pytest.mark.parametrize(
    "include",
    [[], ["certs/ca.pem", ".aws", "certs.key/inside.txt", "[[]odd].pem", r"we\*ird\?.key", "kubeconfig"]],
    ids=["none", "some"],
)
def test_the_listing_is_what_rays_packing_packs(tmp_path, include):
    """Ray's own code composes the excludes (its defaults first) and zips the folder: the same files."""
    from ray._private.runtime_env.packaging import _zip_files
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    root = project(
        tmp_path / "proj",
        {
            "[odd].pem": "x",
            "we*ird?.key": "y",
            "notes/.gitignore": "draft.txt\n",
            "notes/draft.txt": "z",
            "notes/final.txt": "z",
            ".rayignore": "*.log\n",
            "train.log": "z",
            ".venv/lib/x.py": "z",
        },
    )
    (root / "linked").symlink_to(root / "certs")  # Ray follows links: linked/ca.pem is a secret too
    upload = plan_upload(root, list(EXCLUDES), include)
    composed = {}
    upload_working_dir_if_needed(
        {"working_dir": str(root), "excludes": upload.excludes},
        include_gitignore=True,
        upload_fn=lambda wd, excludes, is_file=False: composed.update(excludes=excludes),
    )
    _zip_files(str(root), composed["excludes"], str(tmp_path / "package.zip"), include_gitignore=True)
    packed = {name for name in zipfile.ZipFile(tmp_path / "package.zip").namelist() if not name.endswith("/")}
    assert packed == travelling(upload)
    assert {"notes/final.txt", ".rayignore", "notes/.gitignore"} <= packed and not {"notes/draft.txt", "train.log"} & packed
    assert bool(include) == ("[odd].pem" in packed) == ("certs/ca.pem" in packed) and "linked/ca.pem" not in packed


def test_rays_packing_settings_come_from_the_environment_as_ray_reads_them():
    from ray._private import ray_constants

    assert ray_packing({}) == {
        "include_gitignore": True,
        "ray_defaults": ray_constants.RAY_RUNTIME_ENV_DEFAULT_EXCLUDES.split(","),
    }
    off = {"RAY_RUNTIME_ENV_IGNORE_GITIGNORE": "1", "RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES": " data , "}
    assert ray_packing(off) == {"include_gitignore": False, "ray_defaults": ["data"]}


# ---------------------------------------------------------------- what the dry run shows


def test_the_dry_run_lists_every_file_largest_first_and_what_was_kept_back(tmp_path, monkeypatch, capsys):
    root = project(tmp_path)
    raw = {**QUICKSTART, "data": {"path": str(tmp_path / "data"), "window": 65}, "output_dir": str(tmp_path / "out")}
    (root / "job.yaml").write_text(yaml.safe_dump(raw))
    (root / "model.py").write_text("x" * 3000)
    monkeypatch.chdir(root)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # no token here: no token warning either
    argv = ["submit", "job.yaml", "--address", "http://head:8265", "--name", "dry", "--dry-run", "--include-secret", "*.pem"]
    assert main([*argv, "--json"]) == 0
    out = capsys.readouterr()
    upload = json.loads(out.out)["upload"]
    sizes = [f["bytes"] for f in upload["listing"]]
    assert sizes == sorted(sizes, reverse=True) and upload["listing"][0] == {"path": "model.py", "bytes": 3000}
    assert (upload["files"], upload["bytes"]) == (len(upload["listing"]), sum(sizes))
    assert upload["kept_back"][".env"] == [".env", "sub/.env"] and "*.pem" not in upload["kept_back"]
    assert upload["secrets_sent"] == ["certs/ca.pem", "server.pem"]
    assert "warning: --include-secret sends 2 files that the secret rules keep back: certs/ca.pem, server.pem" in out.err
    assert "token" not in out.err

    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"Travels ({len(sizes)} files," in text and "\n     2.9 KiB  model.py\n" in text
    listed = [line.split()[-1] for line in text.split("Travels", 1)[1].split("Kept back")[0].splitlines()[1:]]
    assert listed == [f["path"] for f in upload["listing"]]
    assert re.search(r"\n  \.env +2: \.env, sub/\.env\n", text)
    assert "Sent anyway (--include-secret): certs/ca.pem, server.pem" in text


# ---------------------------------------------------------------- the token in clear

TOKEN_IN_CLEAR = [  # (address, a token is sent, warns)
    ("http://10.0.0.5:8265", True, True),
    ("http://head.example.com:8265", True, True),
    ("http://[2001:db8::1]:8265", True, True),
    ("http://localhost.example.com:8265", True, True),
    ("http://10.0.0.5:8265", False, False),  # token authentication off: nothing to leak
    ("https://head.example.com", True, False),
    ("http://127.0.0.1:8265", True, False),
    ("http://127.3.4.5:8265", True, False),  # all of 127.0.0.0/8
    ("http://localhost:8265", True, False),
    ("http://LOCALHOST:8265", True, False),
    ("http://[::1]:8265", True, False),
    ("http://[::ffff:127.0.0.1]:8265", True, False),
]


@pytest.mark.parametrize(("url", "sends", "warns"), TOKEN_IN_CLEAR)
def test_a_token_over_plain_http_to_another_host_is_warned_about(url, sends, warns):
    warning = token_in_clear(url, sends)
    assert (warning is not None) == warns
    if warning:
        host = url.split("//")[1].rsplit(":", 1)[0].strip("[]").lower()
        assert f"goes to {host} over plain http" in warning and "https://" in warning and "ssh -L" in warning
        assert "port-forward" in warning and "--address http://127.0.0.1:8265" in warning


def test_the_warning_follows_the_token_that_would_be_sent(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    far = Address("http://10.0.0.5:8265", "--address")
    assert token_warning(far, {}) is None
    assert "10.0.0.5" in token_warning(far, {"RAY_AUTH_TOKEN": "t"})
    assert token_warning(far, {"RAY_AUTH_TOKEN": "t", "RAY_AUTH_MODE": "disabled"}) is None
