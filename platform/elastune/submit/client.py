"""The Ray Jobs API, as Elastune's commands use it: connect (with the token, if any), submit by an
idempotent submission id, read status and the driver's exit code, follow logs, stop, list.

Errors come back as three kinds the CLI turns into exit codes: `Unreachable` (nothing answers at
the address, within seconds), `Refused` (the cluster wants a token, or another one), and
ElastuneError for everything the user can fix in the command (an unknown id, a name taken by a
different job).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from elastune.errors import ElastuneError, Refused, Unreachable
from elastune.submit.address import Address, only, token_in_clear
from elastune.submit.package import Submission

CONNECT_TIMEOUT_S = 5.0
QUIET_LOGGERS = (
    "ray.dashboard.modules.dashboard_sdk",
    "ray._private.runtime_env.packaging",
    "ray._private.runtime_env.working_dir",
)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
TOKEN_HELP = (
    "give the cluster's token in RAY_AUTH_TOKEN, in a file named by RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token "
    "(`ray get-auth-token` on the head prints it)"
)


@dataclass
class JobView:
    """What the commands show of a job: Ray's JobDetails, in Elastune's words."""

    submission_id: str
    status: str
    job: str | None
    entrypoint: str
    message: str | None
    driver_exit_code: int | None
    start_time: float | None
    end_time: float | None
    metadata: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "metadata"} | {"spec": self.spec()}

    def spec(self) -> dict[str, Any] | None:
        raw = self.metadata.get("elastune_spec")
        return json.loads(raw) if raw else None


def token(env: dict[str, str] | os._Environ = os.environ) -> str | None:
    """The Ray auth token, found where Ray looks (never printed): RAY_AUTH_TOKEN, the file
    RAY_AUTH_TOKEN_PATH names, ~/.ray/auth_token. None when RAY_AUTH_MODE=disabled."""
    if env.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return env["RAY_AUTH_TOKEN"].strip()
    path = Path(env["RAY_AUTH_TOKEN_PATH"]) if env.get("RAY_AUTH_TOKEN_PATH") else Path.home() / ".ray" / "auth_token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def token_warning(address: Address, env: dict[str, str] | os._Environ = os.environ) -> str | None:
    """What JobsClient warns before it sends the token to `address` (address.token_in_clear), for
    --dry-run to say beforehand."""
    return token_in_clear(address.url, token(env) is not None)


def probe(address: Address, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail within `timeout` when nothing listens at the address (Ray's client would wait for the
    operating system's TCP timeout on an address that drops packets)."""
    url = urlparse(address.url)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            pass
    except OSError as exc:
        raise Unreachable(
            f"no Ray Jobs API answers at {address.describe()}: {exc.strerror or exc}; is the cluster's "
            f"dashboard up (ray[default]) and the address its dashboard URL, e.g. http://HOST:8265?"
        ) from None


class JobsClient:
    def __init__(self, address: Address):
        from ray.job_submission import JobSubmissionClient

        for name in QUIET_LOGGERS:  # their upload notes would interleave with the job's own log
            logging.getLogger(name).setLevel(logging.ERROR)

        probe(address)
        secret = token()
        # Every command that talks to the Jobs API comes through here, where the token joins the headers.
        if warning := token_in_clear(address.url, secret is not None):
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        headers = {"Authorization": f"Bearer {secret}"} if secret else None
        self.address = address
        with only(address):
            self.client = self._call(JobSubmissionClient, address.url, headers=headers)

    def _http_error(self, status: int, text: str) -> ElastuneError:
        if status in (401, 403):
            sent = "a token was sent and refused" if token() else "no token was sent"
            return Refused(f"the Ray cluster at {self.address.describe()} refused the request ({status}: {sent}); {TOKEN_HELP}")
        return ElastuneError(f"the Ray Jobs API at {self.address.describe()} answered {status}: {text}")

    def _runtime_error(self, exc: RuntimeError) -> ElastuneError:
        """Ray's client raises RuntimeError('Request failed with status code N: ...') for HTTP errors."""
        text = str(exc)
        for status in (401, 403):
            if f"status code {status}" in text:
                return self._http_error(status, text)
        if "Version check returned 404" in text:
            return Unreachable(
                f"something answers at {self.address.describe()}, but not a Ray Jobs API (404 for /api/version); "
                f"give the Ray dashboard's URL (port 8265 by default) of a cluster with ray[default]"
            )
        if "status code 404" in text and "does not exist" in text:
            return ElastuneError(text.split(": ", 1)[-1].rstrip(".") + "; `elastune list` shows the jobs there")
        return ElastuneError(f"the Ray Jobs API at {self.address.describe()}: {text}")

    def _call(self, fn: Callable, *args, **kwargs):
        """`fn(*args, **kwargs)` with Ray's client errors turned into Elastune's."""
        import requests
        from ray.exceptions import AuthenticationError

        try:
            return fn(*args, **kwargs)
        except AuthenticationError as exc:
            raise self._http_error(403 if "Forbidden" in str(exc) else 401, str(exc)) from None
        except requests.HTTPError as exc:
            assert exc.response is not None  # raised by raise_for_status(), which attaches the response
            raise self._http_error(exc.response.status_code, str(exc)) from None
        except ConnectionError as exc:
            raise Unreachable(f"no Ray Jobs API answers at {self.address.describe()}: {exc}") from None
        except RuntimeError as exc:
            raise self._runtime_error(exc) from None

    # ------------------------------------------------------------------ the commands' operations

    def find(self, submission_id: str) -> JobView | None:
        try:
            return self.view(submission_id)
        except ElastuneError as exc:
            if "does not exist" in exc.message:
                return None
            raise

    def view(self, submission_id: str) -> JobView:
        return _view_of(self._call(self.client.get_job_info, submission_id))

    def submit(self, submission_id: str, submission: Submission) -> tuple[JobView, bool]:
        """Submit under `submission_id`, or find the same job already there (idempotent): returns
        (the job, whether this call submitted it). The same id with another spec is refused."""
        existing = self.find(submission_id)
        if existing is not None:
            if existing.metadata.get("elastune_spec") != submission.metadata["elastune_spec"]:
                raise ElastuneError(
                    f"--name {submission_id!r} is already a job at {self.address.url} ({existing.status}) with a "
                    f"different spec; pick another --name (a name stays taken while the cluster keeps the job's record)"
                )
            return existing, False
        self._call(
            self.client.submit_job,
            entrypoint=submission.entrypoint,
            submission_id=submission_id,
            runtime_env=submission.runtime_env,
            metadata=submission.metadata,
        )
        return self.view(submission_id), True

    def stop(self, submission_id: str) -> bool:
        self.view(submission_id)  # an unknown id is the user's mistake, named as such
        return bool(self._call(self.client.stop_job, submission_id))

    def list(self) -> list[JobView]:
        jobs = self._call(self.client.list_jobs)
        return sorted((_view_of(j) for j in jobs if j.submission_id), key=lambda v: v.start_time or 0)

    def logs(self, submission_id: str) -> str:
        return self._call(self.client.get_job_logs, submission_id)

    def follow(self, submission_id: str, write: Callable[[str], None]) -> JobView:
        """Write the job's logs as they come until it ends; returns its final view."""
        self.view(submission_id)

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(submission_id):
                write(chunk)

        self._call(asyncio.run, tail())
        view = self.view(submission_id)
        while view.status not in TERMINAL:  # the log stream closes as the driver exits; the status follows
            time.sleep(0.2)
            view = self.view(submission_id)
        return view


def _view_of(d) -> JobView:
    """A JobView of Ray's JobDetails."""
    meta = dict(d.metadata or {})
    return JobView(
        d.submission_id,
        getattr(d.status, "value", str(d.status)),
        meta.get("elastune_job"),
        d.entrypoint,
        d.message,
        d.driver_exit_code,
        _seconds(d.start_time),
        _seconds(d.end_time),
        meta,
    )


def _seconds(ms: int | None) -> float | None:
    return None if ms is None else ms / 1000.0
