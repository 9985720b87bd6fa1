"""The HostLease actor: this host's heartbeat, the rescue of dead hosts' jobs, self-fencing.

Every ``cluster.heartbeat_s`` the host renews its lease (``lease_until = now +
lease_s``) and, if it wins the election, rescues the jobs of hosts whose lease
ran out. The hazard it exists for: a host cut off from the database keeps
running its workers while another host, seeing the lease expire, runs the
same jobs again. So a host that has not renewed by ``last_renewal + lease_s -
heartbeat_s`` fences itself (the Supervisor claims nothing and kills its
workers) one heartbeat before anyone may rescue them, and unfences when a
renewal gets through again.

The store calls run on one helper thread, never on the actor's: a database
call that hangs (a cut TCP connection) must not delay the fencing decision,
which each Beat makes from the clock alone (``should_fence``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import pykka

from actors.clock import Clock
from actors.messages import Beat, Fence, GetLease, ReportTo, Unfence, WorkAvailable
from actors.model import Job
from actors.store.cluster import ClusterStore
from actors.telemetry import capture_error, job_log
from actors.wire import iso_time

__all__ = [
    "HostLease",
    "LeaseStatus",
    "fence_deadline",
    "fence_reason",
    "lease_action",
    "should_fence",
]

log = logging.getLogger(__name__)


# --- decisions ---------------------------------------------------------------


def fence_deadline(last_renewal: float, lease_s: float, heartbeat_s: float) -> float:
    """When a host that last renewed at ``last_renewal`` must have stopped its workers:
    one heartbeat before its lease ends, so the kill lands before any rescue."""
    return last_renewal + lease_s - heartbeat_s


def should_fence(last_renewal: float, now: float, lease_s: float, heartbeat_s: float) -> bool:
    """Fenced exactly while the newest renewal no longer covers ``now`` with a margin."""
    return now >= fence_deadline(last_renewal, lease_s, heartbeat_s)


def fence_reason(last_renewal: float, lease_s: float, now: float, last_error: str | None) -> str:
    """Why a host fences itself, in times a person reads (ISO-8601 UTC, and how long ago)."""
    return (
        f"no lease renewal since {iso_time(last_renewal)} ({now - last_renewal:.1f} s ago; "
        f"the lease ends at {iso_time(last_renewal + lease_s)}; last error: {last_error})"
    )


def lease_action(
    fenced: bool, last_renewal: float, now: float, lease_s: float, heartbeat_s: float
) -> Literal["fence", "unfence"] | None:
    """What to tell the Supervisor now, if anything: a change of ``should_fence``."""
    wanted = should_fence(last_renewal, now, lease_s, heartbeat_s)
    if wanted and not fenced:
        return "fence"
    if fenced and not wanted:
        return "unfence"
    return None


# --- messages private to the lease ---------------------------------------------


@dataclass(frozen=True)
class _Renewed:
    at: float
    rescued: tuple[Job, ...]


@dataclass(frozen=True)
class _RenewFailed:
    at: float
    error: str


@dataclass(frozen=True)
class LeaseStatus:
    """The lease as this host sees it (``snapyard doctor``, tests)."""

    host_id: str
    last_renewal: float
    lease_until: float
    fenced: bool
    renewals: int
    failures: int
    last_error: str | None


# --- the actor -----------------------------------------------------------------


class HostLease(pykka.ThreadingActor):
    """Heartbeats, rescues, and tells the Supervisor ``Fence``/``Unfence``/``WorkAvailable``."""

    def __init__(
        self,
        store: ClusterStore,
        clock: Clock,
        lease_s: float,
        heartbeat_s: float,
        *,
        api: str = "",
        max_workers: int = 0,
        running: Callable[[], int] = lambda: 0,
    ) -> None:
        """``api``/``max_workers``/``running`` go into the hosts table for ``snapyard hosts``."""
        super().__init__()
        if heartbeat_s >= lease_s:
            raise ValueError(
                f"cluster.heartbeat_s ({heartbeat_s:g}) must be shorter than cluster.lease_s "
                f"({lease_s:g}): a host would fence itself before every renewal"
            )
        self._store = store
        self._clock = clock
        self._lease_s = lease_s
        self._heartbeat_s = heartbeat_s
        self._api = api
        self._max_workers = max_workers
        self._running = running
        self._supervisor: pykka.ActorRef[Any] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="snapyard-lease")
        self._busy = threading.Event()  # a renewal is under way on the helper thread
        self._last_renewal = 0.0
        self._fenced = False
        self._renewals = 0
        self._failures = 0
        self._last_error: str | None = None
        # The first renewal happens here, on the caller's thread (pykka builds the
        # actor in ``start()``): a host that cannot reach the database fails to
        # start and claims nothing. In ``on_start`` the failure would only stop
        # this actor, and the host would run on without a lease.
        now = self._clock.now()
        self._rescued(self._renew(now))
        self._last_renewal = now
        self._renewals = 1
        log.info("host %s joined the cluster (lease %gs)", store.host_id, lease_s)

    def on_stop(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def on_receive(self, message: Any) -> Any:
        match message:
            case Beat(now=now):
                self._judge(now)
                if not self._busy.is_set():
                    self._busy.set()
                    self._executor.submit(self._renew_in_background, now)
            case _Renewed(at=at, rescued=rescued):
                self._busy.clear()
                self._renewals += 1
                self._last_renewal = max(self._last_renewal, at)
                self._last_error = None
                self._rescued(rescued)
                self._judge(self._clock.now())
            case _RenewFailed(at=at, error=error):
                self._busy.clear()
                self._failures += 1
                self._last_error = error
                log.warning("lease renewal at %s failed: %s", iso_time(at), error)
                self._judge(self._clock.now())
            case ReportTo(ref=ref):
                self._supervisor = ref
                if self._fenced:
                    self._tell(Fence("this host's lease is not renewed"))
            case GetLease():
                return self._status()
            case _:
                log.warning("host lease: unexpected message %r", message)
        return None

    # --- effects -----------------------------------------------------------

    def _renew(self, now: float) -> tuple[Job, ...]:
        self._store.heartbeat(
            now,
            self._lease_s,
            api=self._api,
            max_workers=self._max_workers,
            running=self._running(),
        )
        return tuple(self._store.rescue_expired(now))

    def _renew_in_background(self, now: float) -> None:
        """On the helper thread: the store calls, then the verdict to the actor's inbox."""
        try:
            rescued = self._renew(now)
        except Exception as exc:
            reply: object = _RenewFailed(now, f"{type(exc).__name__}: {exc}")
        else:
            reply = _Renewed(now, rescued)
        with contextlib.suppress(pykka.ActorDeadError):  # stopping
            self.actor_ref.tell(reply)

    def _judge(self, now: float) -> None:
        action = lease_action(
            self._fenced, self._last_renewal, now, self._lease_s, self._heartbeat_s
        )
        if action == "fence":
            self._fenced = True
            reason = fence_reason(self._last_renewal, self._lease_s, now, self._last_error)
            log.error("host %s fences itself: %s", self._store.host_id, reason)
            capture_error(RuntimeError(f"host fenced: {reason}"), source="lease")
            self._tell(Fence(reason))
        elif action == "unfence":
            self._fenced = False
            log.warning("host %s renewed its lease again; unfencing", self._store.host_id)
            self._tell(Unfence())

    def _rescued(self, jobs: tuple[Job, ...]) -> None:
        for job in jobs:
            spec = job.spec
            job_log(log, job.id, spec.project, spec.work_item).warning(
                "rescued from a host whose lease ran out: queued again"
            )
        if jobs:
            self._tell(WorkAvailable())

    def _tell(self, message: object) -> None:
        if self._supervisor is None:
            return
        try:
            self._supervisor.tell(message)
        except pykka.ActorDeadError:
            log.warning("host lease: the supervisor is gone; dropped %s", type(message).__name__)

    def _status(self) -> LeaseStatus:
        return LeaseStatus(
            host_id=self._store.host_id,
            last_renewal=self._last_renewal,
            lease_until=self._last_renewal + self._lease_s,
            fenced=self._fenced,
            renewals=self._renewals,
            failures=self._failures,
            last_error=self._last_error,
        )
