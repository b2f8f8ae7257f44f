"""One checkpoint root, one writer: the lease a run holds on its root while it trains.

`ROOT/LEASE.json` names the run holding the root (run id, job, host, process, when it took it and
last renewed it). A run refuses to start on a root another live run holds (LeaseHeld, exit 2,
naming the holder); it takes a lease over only once its holder is provably gone: on the same
host (and boot), its process is gone or is another process now; anywhere, it has not renewed
the lease for TTL_S. The holder renews every RENEW_S and removes the lease when it ends.

Taking the lease is atomic on local disks (create-exclusive; a stale one is renamed away first, so
of two runs taking it over one wins). Object stores have no create-exclusive PUT that pyarrow
exposes: there a run writes its lease, waits VERIFY_S and reads it back, and of two runs that
wrote at once only the last writer reads its own (a run whose read-back comes before the other's
write is the gap this leaves; docs/checkpoints.md).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

from elastune.checkpoint.storage import Storage
from elastune.errors import CheckpointError, LeaseHeld

LEASE = "LEASE.json"
TTL_S = 60.0
RENEW_S = 10.0
VERIFY_S = 1.0


@dataclass(frozen=True)
class Holder:
    run_id: str
    job: str
    host: str
    boot_id: str
    pid: int
    pid_started: str  # the process's start time (/proc/PID/stat field 22): a reused pid differs
    taken_at: float
    renewed_at: float

    def describe(self, now: float) -> str:
        return (
            f"run {self.run_id} of job {self.job} (host {self.host}, pid {self.pid}; holding it since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.taken_at))}, renewed {now - self.renewed_at:.0f} s ago)"
        )


Verdict = Literal["free", "mine", "gone", "held"]


def verdict(current: Holder | None, me: Holder, now: float, alive: Callable[[Holder], bool | None]) -> Verdict:
    """Whether `me` may take the root. `alive(holder)`: True or False where that can be known
    (the holder's process on this host), None where it cannot (another host)."""
    if current is None:
        return "free"
    if (current.run_id, current.host, current.pid) == (me.run_id, me.host, me.pid):
        return "mine"
    if alive(current) is False or now - current.renewed_at > TTL_S:
        return "gone"
    return "held"


def this_process(run_id: str, job: str, now: float | None = None) -> Holder:
    now = time.time() if now is None else now
    return Holder(run_id, job, socket.gethostname(), _boot_id(), os.getpid(), _started(os.getpid()) or "", now, now)


def process_alive(holder: Holder) -> bool | None:
    """The holder's process still running, where this host can tell (same host and boot)."""
    if holder.host != socket.gethostname() or holder.boot_id != _boot_id():
        return None
    started = _started(holder.pid)
    return started is not None and started == holder.pid_started


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _started(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None if not _pid_exists(pid) else ""


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """The lease of one run on one root: `acquire` once, `renew` as often as you like (it writes
    every RENEW_S), `release` at the end."""

    def __init__(self, storage: Storage, me: Holder, alive: Callable[[Holder], bool | None] = process_alive):
        self.storage, self.me, self.alive = storage, me, alive
        self.renewed = 0.0
        self.took_over: Holder | None = None

    def read(self) -> Holder | None:
        """The lease's holder; an unreadable lease reads as a holder gone long ago (it protects nothing)."""
        if not self.storage.exists(LEASE):
            return None
        try:
            return Holder(**json.loads(self.storage.read_bytes(LEASE)))
        except (ValueError, TypeError, CheckpointError, FileNotFoundError):
            return Holder("(unreadable lease)", "?", "?", "?", -1, "", 0.0, 0.0)

    def acquire(self) -> None:
        """Take the root, or raise LeaseHeld naming the run that holds it."""
        for _ in range(3):
            now = time.time()
            current = self.read()
            decision = verdict(current, self.me, now, self.alive)
            if decision == "held":
                assert current is not None  # verdict() says "held" only of a holder
                raise LeaseHeld(
                    f"checkpoint root {self.storage.uri} is in use by "
                    f"{current.describe(now)}: one root, one writer. Wait for that "
                    "run to end or stop it, or give this run another checkpoint.path; "
                    "a lease whose holder is gone is taken over "
                    f"(on another host, once it has not been renewed for {TTL_S:.0f} s)"
                )
            if decision == "gone":
                self.took_over = current
                self._set_aside()
            if self._create():
                self.renewed = time.monotonic()
                return
        raise LeaseHeld(
            f"checkpoint root {self.storage.uri}: another run took its lease at the same moment; run again to see which"
        )

    def renew(self) -> None:
        """Renew the lease if it is due; LeaseHeld if another run has taken it over meanwhile (this
        run went unrenewed for longer than TTL_S, e.g. its store did not answer): that run now
        holds the root, and this one must not write over its lease."""
        if time.monotonic() - self.renewed < RENEW_S:
            return
        self.renewed = time.monotonic()
        current = self.read()
        if current is not None and current.run_id != self.me.run_id:
            raise LeaseHeld(
                f"checkpoint root {self.storage.uri} was taken over by {current.describe(time.time())} while this run went "
                f"unrenewed; this run's further checkpoints may conflict with it"
            )
        self.me = Holder(**{**asdict(self.me), "renewed_at": time.time()})
        self.storage.commit_bytes(LEASE, self._record())

    def release(self) -> None:
        current = self.read()
        if current is not None and verdict(current, self.me, time.time(), self.alive) == "mine":
            self.storage.delete_file(LEASE)

    def _record(self) -> bytes:
        return json.dumps(asdict(self.me), indent=1).encode()

    def _create(self) -> bool:
        if self.storage.is_local:
            os.makedirs(self.storage.root, exist_ok=True)
            try:
                fd = os.open(self.storage.path(LEASE), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, self._record())
                os.fsync(fd)
            finally:
                os.close(fd)
            self.storage.sync_dir("")
            return True
        self.storage.write_bytes(LEASE, self._record())
        time.sleep(VERIFY_S)  # a run writing at the same moment: the last writer keeps it
        return self.read() == self.me

    def _set_aside(self) -> None:
        """Move a stale lease out of the way; of two runs doing so at once, one succeeds."""
        if self.storage.is_local:
            try:
                os.rename(self.storage.path(LEASE), self.storage.path(f"{LEASE}.{self.me.run_id}.stale"))
                os.unlink(self.storage.path(f"{LEASE}.{self.me.run_id}.stale"))
            except FileNotFoundError:
                pass
        else:
            self.storage.delete_file(LEASE)
