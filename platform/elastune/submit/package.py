"""What a submitted job takes with it: the runtime_env, its entrypoint and its metadata.

- The entrypoint is `python -m elastune run SPEC`: on the cluster the job runs the same code path
  as `elastune run` here (it joins the cluster through the RAY_ADDRESS Ray sets inside a job).
- `py_modules` ships this elastune package; `working_dir` ships the job's own folder (the spec,
  custom model code beside it), without what should not travel: version control, virtual
  environments, run directories, checkpoints and datasets (the spec's own paths among them).
- The environment is pinned: ELASTUNE_REQUIRE names the Python, torch and Ray versions the job
  was submitted with, and the job refuses to start (exit 2, naming both versions) on a cluster
  whose versions differ, instead of training with other numerics.
- The resolved spec travels as the job's metadata (JSON), so `elastune status` and the Ray
  dashboard show what exactly runs.
"""

from __future__ import annotations

import fnmatch
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elastune.errors import ElastuneError
from elastune.spec.models import JobSpec

# Always left behind, as gitignore-style patterns relative to the working directory.
EXCLUDES = (".git", ".hg", ".venv", "venv", ".tox", ".pytest_cache", "__pycache__", "*.pyc", "node_modules",
            ".elastune", "runs", "*.safetensors", "*.pt", "*.ckpt")  # fmt: skip
MAX_UPLOAD_BYTES = 512 * 1024**2  # Ray refuses a working_dir package above its gRPC message size (512 MiB by default)
WARN_UPLOAD_BYTES = 50 * 1024**2
REQUIRE_ENV = "ELASTUNE_REQUIRE"
PINNED = ("torch", "ray")


@dataclass
class Submission:
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    upload_files: int
    upload_bytes: int
    warnings: list[str] = field(default_factory=list)


def build_submission(spec: JobSpec, spec_path: Path, working_dir: Path, extra_excludes: list[str] | None = None) -> Submission:
    """The submission of `spec` (read from `spec_path`) with `working_dir` as the job's folder."""
    working_dir, spec_path = working_dir.resolve(), spec_path.resolve()
    if not spec_path.is_relative_to(working_dir):
        raise ElastuneError(f"the job spec {spec_path} is outside the working directory {working_dir}, so it would not travel "
                            f"with the job; run from the spec's project or pass --working-dir")  # fmt: skip
    excludes = [*EXCLUDES, *own_paths(spec, working_dir), *(extra_excludes or [])]
    files, total, biggest = upload_size(working_dir, excludes)
    if total > MAX_UPLOAD_BYTES:
        raise ElastuneError(f"the working directory {working_dir} would upload {total / 1024**2:.0f} MiB ({files} files), over Ray's "
                            f"{MAX_UPLOAD_BYTES // 1024**2} MiB limit; the biggest: {_listing(biggest)}; leave them out with "
                            f"--exclude PATTERN or keep data outside the job's folder")  # fmt: skip
    warnings = [f"the upload is {total / 1024**2:.0f} MiB ({files} files); the biggest: {_listing(biggest)} (--exclude PATTERN leaves files out)"] if total > WARN_UPLOAD_BYTES else []  # fmt: skip
    relative = [name for name, value in (("output_dir", spec.output_dir), ("checkpoint.path", spec.checkpoint_path)) if "://" not in value and not os.path.isabs(value)]  # fmt: skip
    if relative:
        warnings.append(f"{' and '.join(relative)} {'is' if len(relative) == 1 else 'are'} relative: on the cluster that is inside the "
                        f"job's temporary working directory; give a path on shared storage (or s3://...) to keep runs and checkpoints")  # fmt: skip
    pinned = pins()
    runtime_env = {
        "working_dir": str(working_dir),
        "py_modules": [str(Path(__file__).resolve().parents[1])],  # this elastune package
        "excludes": excludes,
        "env_vars": {REQUIRE_ENV: pinned, "PYTHONUNBUFFERED": "1"},  # the job's log streams as it is written
    }
    metadata = {"elastune_job": spec.name, "elastune_spec": json.dumps(spec.to_dict(), sort_keys=True), "elastune_require": pinned}
    entry = f"python -m elastune run {spec_path.relative_to(working_dir).as_posix()}"
    return Submission(entry, runtime_env, metadata, files, total, warnings)


def own_paths(spec: JobSpec, working_dir: Path) -> list[str]:
    """The spec's data, output and checkpoint paths that lie inside the working directory."""
    out = []
    for value in (spec.data.path, spec.output_dir, spec.checkpoint_path):
        if "://" in value:
            continue
        path = Path(value) if os.path.isabs(value) else Path.cwd() / value
        path = path.resolve()
        if path != working_dir and path.is_relative_to(working_dir):
            out.append("/" + path.relative_to(working_dir).as_posix())
    return out


def excluded(relative: str, excludes: list[str]) -> bool:
    """Whether `relative` (a POSIX path under the working directory) matches an exclude: a pattern
    with a leading '/' is anchored at the working directory, one without matches any component."""
    parts = relative.split("/")
    for pattern in excludes:
        if pattern.startswith("/"):
            anchored = pattern.strip("/")
            if relative == anchored or relative.startswith(anchored + "/"):
                return True
        elif "/" in pattern.strip("/"):
            if fnmatch.fnmatch(relative, pattern.strip("/")) or fnmatch.fnmatch(relative, pattern.strip("/") + "/*"):
                return True
        elif any(fnmatch.fnmatch(part, pattern.rstrip("/")) for part in parts):
            return True
    return False


def upload_size(root: Path, excludes: list[str]) -> tuple[int, int, list[tuple[str, int]]]:
    """(files, bytes, the five biggest files) that would travel from `root`."""
    count, total, sizes = 0, 0, []
    for folder, dirs, files in os.walk(root):
        rel_folder = Path(folder).relative_to(root).as_posix()
        prefix = "" if rel_folder == "." else rel_folder + "/"
        dirs[:] = [d for d in dirs if not excluded(prefix + d, excludes)]
        for name in files:
            if excluded(prefix + name, excludes):
                continue
            try:
                size = os.path.getsize(os.path.join(folder, name))
            except OSError:
                continue
            count, total = count + 1, total + size
            sizes.append((prefix + name, size))
    return count, total, sorted(sizes, key=lambda s: -s[1])[:5]


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
