"""Which Ray Jobs API address a command talks to, and making Ray's own client use exactly that.

Ray's JobSubmissionClient prefers RAY_API_SERVER_ADDRESS and RAY_ADDRESS over the address it is
given, and Ray sets RAY_ADDRESS inside every job: `--address` would silently lose to whatever the
environment holds. Here `--address` wins; the environment is only a default, and the command says
which address it used and where it came from.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import urlparse

from elastune.errors import ElastuneError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ENV_ORDER = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
OVERRIDING_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # what Ray's client reads over its argument


@dataclass(frozen=True)
class Address:
    url: str
    source: str  # "--address", an environment variable's name, or "default"

    def describe(self) -> str:
        return f"{self.url} (from {self.source})"


def resolve_address(flag: str | None, env: Mapping[str, str]) -> Address:
    """`--address`, else RAY_API_SERVER_ADDRESS, else an http(s) RAY_ADDRESS, else the
    local default. A RAY_ADDRESS that is not http(s) (a GCS host:port, "auto", ray://) is the
    cluster's core address, not its Jobs API: it is passed over, not guessed into a URL."""
    if flag is not None:
        return Address(check_url(flag, "--address"), "--address")
    for name in ENV_ORDER:
        value = env.get(name, "").strip()
        if not value:
            continue
        if name == "RAY_ADDRESS" and urlparse(value).scheme not in ("http", "https"):
            continue
        return Address(check_url(value, name), name)
    return Address(DEFAULT_ADDRESS, "default")


def check_url(value: str, where: str) -> str:
    parsed = urlparse(value if "://" in value else f"http://{value}")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ElastuneError(f"{where} {value!r} is not a Ray Jobs API address; give the dashboard's URL, e.g. http://HOST:8265")
    try:
        parsed.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ElastuneError(f"{where} {value!r} has an invalid port; give e.g. http://HOST:8265") from None
    return parsed.geturl().rstrip("/")


def token_in_clear(url: str, sends_token: bool) -> str | None:
    """The warning for a token that would cross the network readable by anyone on the way: sent
    (token authentication on) over plain http to a host that is not this machine's loopback. None
    when it stays safe: no token, https://, or 127.0.0.0/8, ::1, localhost."""
    parsed = urlparse(url)
    if not sends_token or parsed.scheme != "http" or is_loopback(parsed.hostname or ""):
        return None
    host, port = parsed.hostname, parsed.port or 80
    return (
        f"the Ray token goes to {host} over plain http ({url}), readable by anyone on the network path, who can then use the "
        "cluster; reach the dashboard through https:// (a TLS-terminating proxy "
        "in front of it: --address https://...) or through "
        f"a tunnel to 127.0.0.1 (ssh -L 8265:127.0.0.1:{port} {host}, or kubectl port-forward to the head's port {port}; then "
        f"--address http://127.0.0.1:8265)"
    )


def is_loopback(host: str) -> bool:
    """Whether `host` (a URL's hostname) is this machine's loopback: localhost, 127.0.0.0/8, ::1."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name other than localhost: it may resolve anywhere
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1
    return ip.is_loopback


@contextlib.contextmanager
def only(address: Address) -> Iterator[None]:
    """Hide the variables Ray's client would prefer over `address` while the client is made."""
    saved = {name: os.environ.pop(name) for name in OVERRIDING_ENV if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)
