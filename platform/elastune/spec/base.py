"""What every section of the job spec shares: the Strict base model, the limits on counts, and
the rules for storage locations (paths and URIs)."""

from __future__ import annotations

import re
import unicodedata
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from pydantic import BaseModel, ConfigDict

NAME_RULE = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"

# Upper bounds: each is where a value stops describing any real run, well before it could break
# the arithmetic downstream. Samples, steps and bytes stay at most 2**53, so they fit an int64 and
# stay exact as the floats metrics carry; a seed fits the int64 torch seeds from; workers, batch
# samples and micro-batches per step are far beyond any cluster, yet small enough that a batch plan
# is built at once (`validate` builds two); kept checkpoints and restarts, threads, CPUs and GPUs
# per worker and model sizes are beyond anything trained.
MAX_SAMPLES = 2**53  # samples, steps, bytes
MAX_SEED = 2**63 - 1
MAX_WORKERS = 4096
MAX_BATCH = 2**24  # samples in one global batch
MAX_MICRO_BATCHES = 2**16  # micro-batches in one optimizer step
MAX_COUNT = 10_000  # checkpoints kept, worker-group restarts


class Strict(BaseModel):
    # allow_inf_nan=False: every float field refuses NaN and +-infinity (YAML's .nan, .inf, 1e999).
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


URI_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs")
"""Schemes a checkpoint URI may use: the pyarrow filesystems Elastune documents (gcs is gs's other
name, viewfs is federated HDFS). A location without '://' is a local path."""

_SCHEMES_SAID = "a local path or a " + ", ".join(f"{s}://" for s in URI_SCHEMES[:-1]) + f" or {URI_SCHEMES[-1]}:// URI"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_URI_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?@!$&'()*+,;=%]*")  # RFC 3986 less '#', '[' and ']'
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_CREDENTIALS = ("access_key", "secret_key", "session_token")


def check_uri(uri: str) -> str | None:
    """What is wrong with `uri` as a storage location, as "<rule>; <fix>", or None when nothing is.

    A location is a local path or a URI whose scheme is one of URI_SCHEMES. Pure: it reads no
    filesystem and contacts nothing, so a malformed URI is refused before any run starts.
    """
    problem = _check_text(uri)
    if problem or "://" not in uri:
        return problem
    scheme = uri.partition("://")[0]
    if not _SCHEME.fullmatch(scheme):
        return f"the text before '://' is not a URI scheme; give {_SCHEMES_SAID}"
    if scheme not in URI_SCHEMES:
        if scheme.lower() in URI_SCHEMES:
            return f"URI scheme '{scheme}' is not lower-case; write {scheme.lower()}://"
        return f"URI scheme '{scheme}' is not supported; give {_SCHEMES_SAID}"
    problem = _check_uri_chars(uri)
    if problem:
        return problem
    parts = urlsplit(uri)
    if "@" in parts.netloc or any(key in _CREDENTIALS for key, _ in parse_qsl(parts.query)):
        return "the URI holds credentials; remove them: they come from the environment (AWS_ACCESS_KEY_ID, ...), never the spec"
    if scheme == "file":
        return _check_file_uri(parts.netloc, parts.path, parts.query)
    if scheme in ("hdfs", "viewfs"):
        return _check_port(scheme, parts)
    return _check_bucket_uri(scheme, parts.netloc, parts.path)


def check_local_path(path: str) -> str | None:
    """What is wrong with `path` as a local (or mounted) path, as "<rule>; <fix>", or None.

    Datasets and run folders are read and written through the local filesystem only, so a URI
    here is refused rather than mangled into a folder named 's3:'."""
    problem = _check_text(path)
    if problem is None and "://" in path:
        return "datasets and run folders take local paths (a mounted volume works), not URIs; copy the data there, give its path"
    return problem


def checked(location: str, check: Any) -> str:
    """`location` if `check` (check_uri, check_local_path) finds nothing wrong; else ValueError."""
    problem = check(location)
    if problem:
        raise ValueError(problem)
    return location


def _check_text(location: str) -> str | None:
    if not location.strip():
        return "the location is empty; give a path"
    if location != location.strip():
        return "the location starts or ends with white space; remove it"
    control = next((c for c in location if unicodedata.category(c) == "Cc"), None)
    if control is not None:
        return f"the location holds a control character (U+{ord(control):04X}); remove it"
    typo = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):(?!//)", location)
    if typo and typo[1].lower() in URI_SCHEMES:
        return f"the location looks like a URI ({typo[1]}:) without '//'; write {typo[1].lower()}://..."
    return None


def _check_uri_chars(uri: str) -> str | None:
    bad = next((c for c in uri if not _URI_CHARS.fullmatch(c)), None)
    if bad == "#":
        return "the URI holds '#', which starts a fragment pyarrow drops; percent-encode it as %23"
    if bad == " ":
        return "the URI holds a space; percent-encode it as %20"
    if bad is not None:
        return f"the URI holds {bad!r}, which a URI cannot hold as it is; percent-encode it (%XX of its UTF-8 bytes)"
    if _BAD_ESCAPE.search(uri):
        return "the URI holds a '%' not followed by two hex digits; write a literal '%' as %25"
    return None


def _check_file_uri(host: str, path: str, query: str) -> str | None:
    if host:
        return "a file:// URI names no host; write file:///absolute/path (three slashes) or a plain local path"
    if not path.startswith("/"):
        return "the file:// URI names no path; write file:///absolute/path"
    if query:
        return "a file:// URI takes no query ('?...'); remove it, or percent-encode '?' as %3F"
    return None


def _check_bucket_uri(scheme: str, bucket: str, path: str) -> str | None:
    if not bucket:
        return f"the {scheme}:// URI names no bucket; write {scheme}://BUCKET/path"
    if not _BUCKET.fullmatch(bucket):
        return f"the {scheme}:// URI's bucket is not a bucket name (letters, digits, '.', '-', '_'); write {scheme}://BUCKET/path"
    if "//" in path:
        return f"the {scheme}:// URI has an empty path segment ('//'), which object stores refuse; remove the extra '/'"
    return None


def _check_port(scheme: str, parts: Any) -> str | None:
    try:
        _ = parts.port  # urllib checks the port only when it is read
    except ValueError:
        return f"the URI's port is not a number in 0..65535; write {scheme}://HOST:PORT/path"
    return None
