"""What a store shared by several hosts adds: hosts, leases, rescue, fencing, and
the snapshot index that lets work follow its snapshot.

Only the PostgreSQL store implements it; the single-host SQLite store does not
need to. Times are the callers' clocks (``now``), as everywhere in the store:
the hosts of a cluster must keep their clocks in step (NTP) to well within
``cluster.lease_s``.

Fencing: every claim of a job carries its ``attempt``; rescuing a dead host's
job re-queues it with ``attempt + 1``. ``JobStore.update`` writes only if the
row's attempt is still the job's, else raises ``Fenced``: a host that was cut
off and comes back writes nothing over the rescued attempt.
"""

from __future__ import annotations

import builtins
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from actors.model import Job, SnapshotKey
from actors.store.base import JobStore, StoreError

__all__ = ["ClusterStore", "Fenced", "HostInfo", "SnapshotRecord"]


class Fenced(StoreError):
    """An outcome write for an attempt the cluster has moved past (rescued elsewhere)."""

    def __init__(self, job_id: str, attempt: int) -> None:
        self.job_id = job_id
        self.attempt = attempt
        super().__init__(
            f"job {job_id}: attempt {attempt} was rescued by the cluster; this write is dropped"
        )


@dataclass(frozen=True)
class HostInfo:
    """A row of ``hosts``: what ``snapyard hosts`` shows."""

    host_id: str
    started_at: float
    last_seen: float
    lease_until: float
    # The host's API address, so any host can point a reader at another's logs.
    api: str
    max_workers: int
    running: int
    draining: bool

    def live(self, now: float) -> bool:
        return self.lease_until > now


@dataclass(frozen=True)
class SnapshotRecord:
    """The index's newest snapshot of a key: who holds it and how to pull it."""

    key: SnapshotKey
    agent_type: str
    host_id: str
    image_id: str
    created_at: float
    # The registry digest (repository@sha256:...), once the push is done; None before.
    digest: str | None


@runtime_checkable
class ClusterStore(JobStore, Protocol):
    """A ``JobStore`` for one host of a cluster (``host_id``)."""

    host_id: str

    # --- hosts and leases -------------------------------------------------

    def heartbeat(
        self, now: float, lease_s: float, *, api: str, max_workers: int, running: int
    ) -> None:
        """Upsert this host's row with ``lease_until = now + lease_s``."""

    def drain(self, draining: bool) -> None:
        """A draining host claims nothing new; its running jobs finish."""

    def hosts(self) -> builtins.list[HostInfo]:
        """Every host ever seen, by host ID."""
        ...

    def rescue_expired(self, now: float) -> builtins.list[Job]:
        """If this host wins the election (an advisory lock), re-queue the
        starting and running jobs of every host whose lease ended before
        ``now``, with ``attempt + 1`` and their keys released; return them.
        A host that loses the election returns ``[]`` at once."""
        ...

    # --- cancels across hosts (the database is the only channel) -----------

    def request_cancel(self, job_id: str) -> str | None:
        """A cancel of a job another host starts or runs: recorded on its row and
        NOTIFY'd; returns that host (None when no other host runs it now)."""
        ...

    def cancel_requests(self) -> builtins.list[str]:
        """IDs of this host's starting or running jobs whose cancel was requested
        elsewhere: this host cancels them as a local cancel does."""
        ...

    # --- the snapshot index -----------------------------------------------

    def record_snapshot(self, record: SnapshotRecord) -> bool:
        """This host committed a snapshot: it becomes the key's newest, unless a
        newer one is already recorded (then False, and the caller deletes its own)."""
        ...

    def record_digest(self, key: SnapshotKey, image_id: str, digest: str) -> None:
        """The push of ``image_id`` is done; a no-op if the key has moved on."""

    def newest_snapshot(self, key: SnapshotKey) -> SnapshotRecord | None: ...

    def forget_snapshot(self, key: SnapshotKey, image_id: str) -> None:
        """Drop the key's entry if it is still ``image_id`` (evicted or gone)."""

    def snapshots(self) -> builtins.list[SnapshotRecord]:
        """The whole index, by key: the cluster's view for the API and CLI."""
        ...

    def superseded(self, mine: Collection[tuple[SnapshotKey, str]]) -> builtins.list[SnapshotKey]:
        """Of this host's (key, image ID) pairs, the keys whose newest snapshot is
        another image: this host drops and deletes its copies of them."""
        ...
