"""What a submitted job takes with it: the runtime_env, its entrypoint and its metadata.

- The entrypoint is `python -m elastune run SPEC`: on the cluster the job runs the same code path
  as `elastune run` here (it joins the cluster through the RAY_ADDRESS Ray sets inside a job).
- `py_modules` ships this elastune package; `working_dir` ships the job's own folder (the spec,
  custom model code beside it), without what should not travel: version control, virtual
  environments, run directories, checkpoints and datasets (the spec's own paths among them).
- Credentials and keys (SECRET_EXCLUDES) never travel; only --include-secret sends one, by name.
  What travels is worked out by Ray's own packing code (its walk, its gitignore matcher, its reading
  of .gitignore and .rayignore files), from the very `excludes` Ray receives: the dry run lists what
  Ray uploads.
- The environment is pinned: ELASTUNE_REQUIRE names the Python, torch and Ray versions the job
  was submitted with, and the job refuses to start (exit 2, naming both versions) on a cluster
  whose versions differ, instead of training with other numerics.
- The resolved spec travels as the job's metadata (JSON), so `elastune status` and the Ray
  dashboard show what exactly runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elastune.errors import ElastuneError
from elastune.spec.models import JobSpec

# Always left behind, as gitignore patterns relative to the working directory (Ray reads them as such).
EXCLUDES = (
    ".git",
    ".hg",
    ".venv",
    "venv",
    ".tox",
    ".pytest_cache",
    "__pycache__",
    "*.pyc",
    "node_modules",
    ".elastune",
    "runs",
    "*.safetensors",
    "*.pt",
    "*.ckpt",
)
# Credentials and keys: they never travel unless --include-secret names them. Gitignore semantics, as Ray
# applies them: a pattern without '/' matches at any depth; one with '/' inside is anchored at the working
# directory (hence '**/' on the nested ones); a trailing '/' means what a folder holds, which keeps the folder
# walkable for Ray, so that --include-secret can still send one file inside it.
SECRET_EXCLUDES = (
    ".env",
    ".env.*",
    ".envrc",  # dotenv and direnv; .env.example is kept back too: send it with --include-secret
    ".aws/",
    ".ssh/",
    ".gnupg/",
    ".azure/",
    "**/.config/gcloud/",
    ".kube/",
    "kubeconfig",
    "*.kubeconfig",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    # ssh's key file names, not `id_*`: that would also keep back innocent code such as id_map.py.
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    ".netrc",
    "_netrc",
    ".git-credentials",
    "**/.docker/config.json",
    ".pypirc",
    ".npmrc",
    ".pgpass",
    ".s3cfg",
    ".boto",
    "credentials.json",
    "service-account*.json",
    "*.tfstate",
    "*.tfstate.backup",
    ".vault-token",
    "**/.ray/auth_token",
)
MAX_UPLOAD_BYTES = 512 * 1024**2  # Ray refuses a working_dir package above its gRPC message size (512 MiB by default)
WARN_UPLOAD_BYTES = 50 * 1024**2
REQUIRE_ENV = "ELASTUNE_REQUIRE"
STOP_WAIT_S = 60  # above train.stopping.STOP_GRACE_S, with room for ending the workers
PINNED = ("torch", "ray")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Upload:
    """What travels from a working directory as Ray packs it, and what the secret rules kept back."""

    excludes: list[str]  # runtime_env["excludes"]: the excludes given, SECRET_EXCLUDES, then exact re-includes
    files: list[tuple[str, int]]  # (path relative to the working directory, bytes), largest first
    kept_back: dict[str, list[str]]  # secret pattern -> the files it keeps back (a file under its first pattern)
    secrets_sent: list[str]  # files a secret pattern matches that travel because --include-secret names them
    unused_includes: list[str]  # --include-secret patterns that send nothing

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.files)


@dataclass
class Submission:
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    upload: Upload
    warnings: list[str] = field(default_factory=list)

    @property
    def upload_files(self) -> int:
        return len(self.upload.files)

    @property
    def upload_bytes(self) -> int:
        return self.upload.bytes


def build_submission(
    spec: JobSpec,
    spec_path: Path,
    working_dir: Path,
    extra_excludes: list[str] | None = None,
    include_secret: list[str] | None = None,
    env: Mapping[str, str] = os.environ,
) -> Submission:
    """The submission of `spec` (read from `spec_path`) with `working_dir` as the job's folder;
    `extra_excludes` and `include_secret` as --exclude and --include-secret give them, `env` for
    Ray's packing settings (RAY_RUNTIME_ENV_IGNORE_GITIGNORE, RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES)."""
    working_dir, spec_path = working_dir.resolve(), spec_path.resolve()
    if not spec_path.is_relative_to(working_dir):
        raise ElastuneError(
            f"the job spec {spec_path} is outside the working directory {working_dir}, so it would not travel "
            f"with the job; run from the spec's project or pass --working-dir"
        )
    extra_excludes, include_secret = list(extra_excludes or []), list(include_secret or [])
    check_patterns(extra_excludes, include_secret)
    upload = plan_upload(
        working_dir, [*EXCLUDES, *own_paths(spec, working_dir), *extra_excludes], include_secret, **ray_packing(env)
    )
    files, total, biggest = len(upload.files), upload.bytes, upload.files[:5]
    if total > MAX_UPLOAD_BYTES:
        raise ElastuneError(
            f"the working directory {working_dir} would upload {total / 1024**2:.0f} MiB ({files} files), over Ray's "
            f"{MAX_UPLOAD_BYTES // 1024**2} MiB limit; the biggest: {_listing(biggest)}; leave them out with "
            f"--exclude PATTERN or keep data outside the job's folder"
        )
    warnings = (
        [
            f"the upload is {total / 1024**2:.0f} MiB ({files} files); the biggest: "
            f"{_listing(biggest)} (--exclude PATTERN leaves files out)"
        ]
        if total > WARN_UPLOAD_BYTES
        else []
    )
    if upload.secrets_sent:
        warnings.append(
            f"--include-secret sends {len(upload.secrets_sent)} file{'s' if len(upload.secrets_sent) > 1 else ''} that the "
            f"secret rules keep back: {', '.join(upload.secrets_sent)}"
        )
    for pattern in upload.unused_includes:
        warnings.append(
            f"--include-secret {pattern!r} sends nothing: no file that the secret rules keep back matches it "
            f"(or another exclude, .gitignore or .rayignore leaves that file out anyway)"
        )
    relative = [
        name
        for name, value in (("output_dir", spec.output_dir), ("checkpoint.path", spec.checkpoint_path))
        if "://" not in value and not os.path.isabs(value)
    ]
    if relative:
        warnings.append(
            f"{' and '.join(relative)} {'is' if len(relative) == 1 else 'are'} relative: on the cluster that is inside the "
            f"job's temporary working directory; give a path on shared storage (or s3://...) to keep runs and checkpoints"
        )
    pinned = pins()
    runtime_env = {
        "working_dir": str(working_dir),
        "py_modules": [str(Path(__file__).resolve().parents[1])],  # this elastune package
        "excludes": upload.excludes,
        "env_vars": {
            REQUIRE_ENV: pinned,
            "PYTHONUNBUFFERED": "1",  # the job's log streams as it is written
            # `elastune stop` (Ray's job stop) sends SIGTERM, then SIGKILL after this long (Ray's
            # default: 3 s): time for the run to make its newest step durable (train.stopping).
            "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S),
        },
    }
    metadata = {
        "elastune_job": spec.name,
        "elastune_spec": json.dumps(spec.to_dict(), sort_keys=True),
        "elastune_require": pinned,
    }
    entry = f"python -m elastune run {spec_path.relative_to(working_dir).as_posix()}"
    return Submission(entry, runtime_env, metadata, upload, warnings)


def ray_packing(env: Mapping[str, str]) -> dict[str, Any]:
    """How Ray's client packs a working_dir under `env`: whether it reads .gitignore files, and the
    excludes it puts before the runtime_env's (ray_constants reads them from os.environ alone)."""
    from ray._private import ray_constants

    defaults = env.get("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", ray_constants.RAY_RUNTIME_ENV_DEFAULT_EXCLUDES)
    return {
        "include_gitignore": env.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1",
        "ray_defaults": [x.strip() for x in defaults.split(",") if x.strip()],
    }


def check_patterns(excludes: list[str], include_secret: list[str]) -> None:
    """Refuse what would let a secret travel by accident: only --include-secret sends one."""
    for pattern in excludes:
        if pattern.strip().startswith("!"):
            raise ElastuneError(
                f"--exclude {pattern!r} starts with '!', which would put files back into the upload; --exclude only "
                f"leaves files out. To send a file the secret rules keep back, name it with --include-secret PATTERN"
            )
    for pattern in include_secret:
        if not pattern.strip() or pattern.strip().startswith(("!", "#")):
            raise ElastuneError(
                f"--include-secret {pattern!r} is not a pattern of files to send; give one the way --exclude takes "
                f"it (gitignore style, without a leading '!' or '#'), e.g. --include-secret .env.example"
            )


def own_paths(spec: JobSpec, working_dir: Path) -> list[str]:
    """The spec's data, output and checkpoint paths that lie inside the working directory."""
    out = []
    for value in (spec.data.path, spec.output_dir, spec.checkpoint_path):
        if "://" in value:
            continue
        path = Path(value) if os.path.isabs(value) else Path.cwd() / value
        path = path.resolve()
        if path != working_dir and path.is_relative_to(working_dir):
            out.append(literal(path.relative_to(working_dir).as_posix()))
    return out


# ---------------------------------------------------------------- what Ray packs, and the secret rules


def plan_upload(
    root: Path,
    excludes: Sequence[str],
    include_secret: Sequence[str] = (),
    *,
    include_gitignore: bool = True,
    ray_defaults: Sequence[str] = (),
) -> Upload:
    """What travels from `root` when Ray packs it with `excludes` and SECRET_EXCLUDES, and, of what a
    secret pattern matches, exactly the files that match an `include_secret` pattern besides. Ray puts
    `ray_defaults` before the runtime_env's excludes and reads each folder's .rayignore (and .gitignore
    unless `include_gitignore` is False) on its own. `excludes` hold no '!' lines (check_patterns)."""
    _pathspec([*ray_defaults, *excludes])  # a pattern Ray cannot read is named here, not deep in Ray's walk
    candidates = _ray_walk(root, [*ray_defaults, *excludes], include_gitignore)  # what travels without the secret rules
    secrets = [(pattern, _pathspec([pattern])) for pattern in SECRET_EXCLUDES]
    wanted = [_pathspec([pattern]) for pattern in include_secret]

    def secret_of(path: str) -> str | None:
        return next((pattern for pattern, spec in secrets if spec.match_file(path)), None)

    reinclude: dict[str, None] = {}
    for path, _ in candidates:
        if secret_of(path) and any(spec.match_file(path) for spec in wanted):
            # Ray gets exact, anchored re-includes at the end of its list, never the user's pattern: that would
            # also put back what --exclude, EXCLUDES or the spec's own paths left out. The folders above the file
            # that a secret pattern matches (kubeconfig/, x.key/) go back too, or Ray would not look inside them.
            parts = path.split("/")
            folders = ["/".join(parts[:i]) for i in range(1, len(parts))]
            reinclude.update((f"!{literal(folder)}", None) for folder in folders if secret_of(folder))
            reinclude[f"!{literal(path)}"] = None
    ray_excludes = [*excludes, *SECRET_EXCLUDES, *reinclude]
    # What travels is then Ray's own walk over the list Ray receives (no second opinion).
    files = sorted(_ray_walk(root, [*ray_defaults, *ray_excludes], include_gitignore), key=lambda f: (-f[1], f[0]))
    travelling = {path for path, _ in files}
    kept: dict[str, list[str]] = {}
    for path, _ in sorted(candidates):
        pattern = secret_of(path)
        if pattern and path not in travelling:
            kept.setdefault(pattern, []).append(path)
    secrets_sent = sorted(path for path in travelling if secret_of(path))
    unused = [pattern for pattern, spec in zip(include_secret, wanted) if not any(map(spec.match_file, secrets_sent))]
    return Upload(ray_excludes, files, {p: kept[p] for p in SECRET_EXCLUDES if p in kept}, secrets_sent, unused)


def excluded(relative: str, excludes: Sequence[str]) -> bool:
    """Whether the gitignore patterns `excludes` leave out `relative` (a POSIX path under the working
    directory), as Ray's packing reads them: the last pattern that matches decides ('!' puts back)."""
    return _pathspec(excludes).match_file(relative)


def literal(path: str) -> str:
    """A gitignore pattern that matches `path` (relative, POSIX) alone: anchored, wildcards escaped."""
    return "/" + re.sub(r"([\\\[\]!*#?])", r"\\\1", path)


def _pathspec(patterns: Sequence[str]) -> Any:
    """Ray's gitignore matcher for `patterns` (its vendored pathspec, built as packaging._get_excludes builds
    it), or an ElastuneError naming the first pattern Ray's packing would fail on."""
    from ray._private.thirdparty.pathspec import PathSpec

    compiled = []
    for pattern in patterns:
        try:
            with warnings.catch_warnings():  # "possible nested set" for '[[': the pattern means what pathspec makes of it
                warnings.simplefilter("ignore", FutureWarning)
                compiled += PathSpec.from_lines("gitwildmatch", [pattern]).patterns
        except (re.error, IndexError) as exc:  # '[z-a]'; '!' or '\\' with nothing after it
            reason = exc if isinstance(exc, re.error) else "nothing follows its '!' or '\\'"
            raise ElastuneError(
                f"the pattern {pattern!r} is not one Ray can read ({reason}); write it as a gitignore "
                f"pattern (escape a literal '[' as '\\[')"
            ) from None
    return PathSpec(compiled)


def _ray_walk(root: Path, excludes: list[str], include_gitignore: bool) -> list[tuple[str, int]]:
    """(path relative to `root`, bytes) of every file Ray's packing takes from `root` with `excludes`: Ray's own
    walk, with the matcher and the .gitignore/.rayignore handling its _zip_files uses. packaging._dir_travel and
    _get_excludes are private to Ray; this adapter is tested against Ray 2.60.0 (the pin in pyproject.toml)."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = root.absolute()  # as _zip_files takes it
    out: list[tuple[str, int]] = []

    def handler(path: Path) -> None:
        if path.is_file():  # what _zip_files writes, less empty folders (no bytes)
            out.append((path.relative_to(root).as_posix(), path.stat().st_size))

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # Our own logger: on its own, Ray notes each ignore file it reads at INFO on a logger that prints it.
            _dir_travel(root, [_get_excludes(root, excludes)], handler, include_gitignore=include_gitignore, logger=_log)
    except (re.error, IndexError, UnicodeDecodeError) as exc:  # the excludes were read before: a .gitignore or .rayignore
        raise ElastuneError(
            f"a .gitignore or .rayignore file under {root} holds a line Ray's packing cannot read ({exc}); "
            f"Ray would fail to upload the folder too: fix or escape that line"
        ) from None
    except OSError as exc:  # Ray's walk stops at the first file or folder it cannot read, and so would its upload
        raise ElastuneError(
            f"Ray's packing cannot read {exc.filename} ({exc.strerror}); make it readable or leave it out with --exclude PATTERN"
        ) from None
    return out


def _listing(biggest: list[tuple[str, int]]) -> str:
    return ", ".join(f"{name} ({size / 1024**2:.1f} MiB)" for name, size in biggest)


def pins() -> str:
    """This environment's versions the job must find on the cluster: 'python==3.11 torch==... ray==...'."""
    return " ".join(f"{name}=={version}" for name, version in installed_versions().items())


def mismatches(required: str, installed: dict[str, str]) -> list[str]:
    """Each pin in `required` that `installed` (name -> version) does not meet, described. Local
    build tags do not count (torch 2.13.0+cpu here meets 2.13.0+cu128 there: the same release)."""
    out = []
    for pin in required.split():
        name, _, version = pin.partition("==")
        have = installed.get(name)
        if have is None or have.split("+")[0] != version.split("+")[0]:
            out.append(f"{name} {have or 'missing'} (the job was submitted with {version})")
    return out


def installed_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    for name in PINNED:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out
