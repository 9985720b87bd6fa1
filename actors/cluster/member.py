"""Making this host a cluster member: its store, and what the wiring adds for it.

``actors.app`` calls these only when ``[cluster] database_url`` is set; without
it nothing here runs and Snapyard is one host on SQLite, as ever.
"""

from __future__ import annotations

import dataclasses
import logging
import socket

from actors.clock import Clock
from actors.cluster.registry_http import ManifestStore, RegistryHttp
from actors.engine.base import Engine
from actors.model import Job, Snapshot, SnapshotKey
from actors.settings import Settings
from actors.store.base import JobStore
from actors.store.cluster import ClusterStore, HostInfo
from actors.wiring import ClusterWiring

__all__ = [
    "RunsElsewhere",
    "SnapshotElsewhere",
    "cluster_snapshots",
    "cluster_wiring",
    "held_elsewhere",
    "host_id_of",
    "open_cluster_store",
    "runs_elsewhere",
]

log = logging.getLogger(__name__)


class NotAClusterStore(TypeError):
    """[cluster] is set, but the store given to Snapyard cannot be shared by hosts."""


class RunsElsewhere(Exception):
    """A cancel answered by a host that does not run the job: it was handed to the
    host that does (recorded on the job's row), which stops it. Not an error: the
    API says so (202), never a silent "running"."""

    def __init__(self, job: Job, host: str, api: str | None) -> None:
        self.job = job
        self.host = host
        self.api = api
        where = f" (its API at {api})" if api else ""
        super().__init__(
            f"job {job.id} is {job.state} on host {host}{where}: the cancel was handed to it"
        )


def runs_elsewhere(job: Job, host_id: str, hosts: list[HostInfo]) -> RunsElsewhere | None:
    """Why a cancel this host answered left ``job`` alone, if it runs on another host
    (a queued or finished job, or one of this host's, is always this host's to answer)."""
    if job.state.terminal or job.host is None or job.host == host_id:
        return None
    api = next((h.api for h in hosts if h.host_id == job.host), None)
    return RunsElsewhere(job, job.host, api)


def host_id_of(settings: Settings) -> str:
    """``cluster.host_id``, else this machine's host name (stable across restarts)."""
    return settings.cluster.host_id or socket.gethostname()


def open_cluster_store(settings: Settings, clock: Clock) -> ClusterStore:
    """The PostgreSQL store at ``cluster.database_url``, as this host (migrated on open).

    Imported here, so a single host never loads psycopg.
    """
    from actors.store.postgres import PostgresStore  # noqa: PLC0415

    c = settings.cluster
    store = PostgresStore(c.database_url, host_id_of(settings), clock, c.locality_wait_s)
    log.info("cluster member %s on %s", store.host_id, store.where)
    return store


def cluster_wiring(
    settings: Settings,
    store: JobStore,
    engine: Engine,
    manifests: ManifestStore | None = None,
) -> ClusterWiring:
    """The HostLease, the SnapshotShipper and the Waker for ``store``; ``manifests``
    deletes evicted snapshots from the registry (default: ``cluster.registry``'s HTTP API)."""
    if not isinstance(store, ClusterStore):
        raise NotAClusterStore(
            f"[cluster] database_url is set, but the job store is {type(store).__name__}, "
            "which one host alone can use: pass no store (Snapyard opens the cluster's)"
        )
    registry = settings.cluster.registry
    if manifests is None and registry:
        manifests = RegistryHttp(registry)
    wait = getattr(store, "wait_for_work", None)
    api = settings.api
    return ClusterWiring(
        store,
        # Always: without a registry nothing is pushed or pulled, but the index
        # still records where each key's newest snapshot is (affinity).
        mover=engine,
        delete_manifest=None if manifests is None else manifests.delete_manifest,
        api=f"{api.host}:{api.port}",
        wait_for_work=wait if callable(wait) else None,
    )


class SnapshotElsewhere(LookupError):
    """A snapshot to remove is held by another host: only that host can delete it."""


def held_elsewhere(store: ClusterStore, key: SnapshotKey) -> SnapshotElsewhere | None:
    """Why ``snapshots rm`` found nothing here although the listing shows the key:
    the index's newest is on another host, whose API removes it (None: it is not)."""
    record = store.newest_snapshot(key)
    if record is None or record.host_id == store.host_id:
        return None
    api = {h.host_id: h.api for h in store.hosts()}.get(record.host_id)
    where = f"SNAPYARD_API={api} " if api else ""
    return SnapshotElsewhere(
        f"the snapshot of {key} is held by host {record.host_id}, not this one; remove it "
        f"there: {where}snapyard snapshots rm {key.project} {key.work_item}"
    )


def cluster_snapshots(local: list[Snapshot], store: ClusterStore) -> list[Snapshot]:
    """The cluster's snapshots: this host's (with their sizes), then the newest of
    every other key from the index (its host). The index knows no sizes, layers or
    base of another host's image: they are 0, 0 and "" here, which the wire and the
    CLI show as unknown (a committed snapshot has at least one layer)."""
    mine = {s.key: dataclasses.replace(s, host=store.host_id) for s in local}
    for record in store.snapshots():
        if record.key in mine:
            continue
        mine[record.key] = Snapshot(
            key=record.key,
            image_id=record.image_id,
            tag=record.digest or "",  # pullable by digest once pushed
            base_image_id="",
            created_at=record.created_at,
            last_used_at=record.created_at,
            size_bytes=0,
            layers=0,
            host=record.host_id,
        )
    return sorted(mine.values(), key=lambda s: s.key)
