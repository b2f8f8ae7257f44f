"""The trust boundary the operator enforces, as pure rules (docs/kubernetes.md, "Trust boundary").

Whoever creates an ElastuneJob runs code of their choosing (the image, model.factory) with the
storage Secret it names. These rules bound what the operator itself does on their behalf:

- `deletable_root`: the one checkpoint root a clean-up Job (checkpoint.deleteOnFinish) may
  delete: the job's checkpoint path, when it is inside the job's own prefix.
- `image_allowed`: the images the job's pods may run, when the operator has an allowlist.
- `parse_egress`: the addresses (CIDR and port) the job's Ray pods may connect to beyond DNS and
  each other, from the operator's settings.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass

from elastune.errors import ElastuneError, SpecError

# pyarrow reads these in a URI (query options such as endpoint_override, fragments, %-escapes
# it decodes): a URI holding one might not name what its text seems to, so deletion refuses it.
URI_UNSAFE = re.compile(r"[?#%\\\s\x00-\x1f\x7f]")
TEMPLATE_FIELDS = ("{namespace}", "{name}")


def refusal(source: str, field: str, value: object, rule: str, fix: str) -> SpecError:
    """A SpecError in the job spec's own format (spec/load.py): field = value, rule, fix."""
    return SpecError(f"Invalid job spec {source} (1 problem):\n  {field} = {value!r}\n    rule: {rule}\n    fix:  {fix}")


def canonical(location: str) -> str:
    """`location` as storage resolves it: duplicate slashes collapsed, `.` and `..` resolved.
    A URI's bucket and key are resolved together (Storage normalises them as one path, so a
    `..` can leave the bucket); `file:///x` is the local path /x; the scheme is lower-cased."""
    scheme, sep, rest = location.partition("://")
    if not sep:
        return _normpath(location)
    scheme = scheme.lower()
    if scheme == "file" and rest.startswith("/"):
        return _normpath(rest)
    return f"{scheme}://{_normpath(rest)}"


def _normpath(path: str) -> str:
    return posixpath.normpath(re.sub("/+", "/", path)) if path else ""


def inside(location: str, prefix: str) -> bool:
    """Whether `location` is `prefix` or under it, compared whole path component by component
    after both are made canonical: .../ns/job-2 is not inside .../ns/job."""
    loc, pre = canonical(location), canonical(prefix)
    return loc == pre or loc.startswith(pre if pre.endswith("/") else pre + "/")


def is_uri(location: str) -> bool:
    """An object-store (or other remote) URI; file:///x and plain paths are local."""
    return not canonical(location).startswith("/") and "://" in location


def deletable_root(location: str, volume_prefix: str, uri_prefix: str | None, source: str) -> str:
    """The canonical checkpoint root a clean-up Job may delete, for a job whose checkpoints are
    at `location` (already placed on the volume): itself when inside the job's own prefix
    (`volume_prefix` for paths on the shared volume, `uri_prefix` for URIs); SpecError otherwise."""
    field = "spec.checkpoint.path"
    keep = "or set checkpoint.deleteOnFinish: false and delete them yourself"
    if "://" in location and (bad := URI_UNSAFE.search(location)):
        raise refusal(
            source,
            field,
            location,
            f"checkpoint.deleteOnFinish refuses a URI holding {bad.group()!r} (query options, "
            "fragments and %-escapes can make it name another place than its text)",
            f"write the URI plainly, {keep}",
        )
    if is_uri(location):
        if uri_prefix is None:
            raise refusal(
                source,
                field,
                location,
                "checkpoint.deleteOnFinish deletes checkpoints in an object store only under the "
                "operator's ELASTUNE_CHECKPOINT_PREFIX, and this operator has none",
                f"keep the checkpoints on the shared volume under {volume_prefix}, have the operator configured with "
                f"ELASTUNE_CHECKPOINT_PREFIX, {keep}",
            )
        prefix = uri_prefix
    else:
        prefix = volume_prefix
    resolved = canonical(location)
    if not inside(resolved, prefix):
        shown = "" if resolved == location else f" (resolved: {resolved})"
        raise refusal(
            source,
            field,
            location,
            f"checkpoint.deleteOnFinish deletes only inside the job's own prefix {prefix}{shown}",
            f"set checkpoint.path to {prefix} or a folder under it, {keep}",
        )
    return resolved


def check_prefix_template(template: str, var: str = "ELASTUNE_CHECKPOINT_PREFIX") -> str:
    """An object-store prefix template: a plain URI whose path holds {namespace} and {name} each
    as a whole component (so one job's expansion is never the start of another's)."""
    scheme, sep, rest = template.partition("://")
    parts = rest.split("/")
    problems = []
    if not sep or not scheme or scheme.lower() == "file" or not parts[0] or "{" in parts[0]:
        problems.append("it must be an object-store URI with a bucket, such as s3://bucket/elastune/{namespace}/{name}")
    if URI_UNSAFE.search(template):
        problems.append("it must hold no '?', '#', '%', '\\' or white space")
    for field in TEMPLATE_FIELDS:
        if parts[1:].count(field) != 1:
            problems.append(f"its path must hold {field} once, as a whole component between slashes")
    leftover = template.replace("{namespace}", "").replace("{name}", "")
    if "{" in leftover or "}" in leftover:
        problems.append("{namespace} and {name} are the only fields it may hold")
    if "." in parts[1:] or ".." in parts[1:] or "" in parts[1:-1]:
        problems.append("its path must hold no '.', '..' or '//'")
    if problems:
        raise ElastuneError(
            f"{var} {template!r} is not a usable prefix: {'; '.join(problems)}; fix it in the operator's Deployment"
        )
    return template.rstrip("/")


def expand_prefix(template: str, namespace: str, name: str) -> str:
    return template.replace("{namespace}", namespace).replace("{name}", name)


def image_allowed(image: str, allowed: Sequence[str]) -> bool:
    """Whether `image` is admitted by the allowlist `allowed` (empty: any image). An entry
    admits itself and what continues it at a component boundary: '/' (a repository below it),
    '@' (a digest) or ':' and a tag. A ':' followed later by '/' is a registry's port, not a
    tag: registry.example.com does not admit registry.example.com:5000/x; nor does
    registry.example.com/elastune admit registry.example.com/elastune-evil."""
    if not allowed:
        return True
    for prefix in allowed:
        if image == prefix:
            return True
        rest = image[len(prefix) :] if image.startswith(prefix) else ""
        if rest[:1] in ("/", "@") or (rest[:1] == ":" and "/" not in rest):
            return True
    return False


def parse_image_prefixes(value: str, var: str = "ELASTUNE_ALLOWED_IMAGES") -> tuple[str, ...]:
    """Comma-separated registry/repository prefixes; white space around them and a trailing
    '/' are dropped."""
    out = tuple(p.strip().rstrip("/") for p in value.split(",") if p.strip().rstrip("/"))
    for prefix in out:
        if re.search(r"\s|[:@]$", prefix):
            raise ElastuneError(
                f"{var} entry {prefix!r} is not an image prefix; give registry/repository prefixes such as "
                "registry.example.com/elastune, separated by commas"
            )
    return out


@dataclass(frozen=True)
class Egress:
    """Ray pods may open connections to `cidr`, on TCP `port` (None: every port)."""

    cidr: str
    port: int | None = None

    def rule(self) -> dict[str, list[dict[str, object]]]:
        """The NetworkPolicy egress rule."""
        out: dict[str, list[dict[str, object]]] = {"to": [{"ipBlock": {"cidr": self.cidr}}]}
        return {**out, "ports": [{"protocol": "TCP", "port": self.port}]} if self.port else out


def parse_egress(value: str, var: str) -> tuple[Egress, ...]:
    """Comma-separated CIDR[:PORT] entries (10.0.0.0/8:9000, 0.0.0.0/0:443, ::/0:443); `none`
    for no entry at all."""
    if value.strip().lower() == "none":
        return ()
    out = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        address, slash, rest = entry.rpartition("/")
        bits, _, port = rest.partition(":")
        try:
            if not slash or not bits.isdigit() or (port and not port.isdigit()):
                raise ValueError("not CIDR[:PORT]")
            network = ipaddress.ip_network(f"{address}/{bits}", strict=False)
            if port and not 1 <= int(port) <= 65535:
                raise ValueError(f"port {port} is outside 1..65535")
        except ValueError as exc:
            raise ElastuneError(
                f"{var} entry {entry!r} is not CIDR[:PORT] ({exc}); write e.g. 10.0.0.0/8:9000 or "
                "0.0.0.0/0:443, separated by commas, or none"
            ) from None
        out.append(Egress(str(network), int(port) if port else None))
    return tuple(out)
