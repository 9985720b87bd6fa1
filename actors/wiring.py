"""One wiring: the actors started in dependency order and stopped in reverse.

Start: Root (the top of the supervision tree) -> SnapshotManager -> Reaper ->
Supervisor (starts its Spawner pool, recovers unfinished jobs) -> Watcher ->
timers. Stop is the reverse, and never kills a running worker: its container
keeps running and the next start re-adopts it. ``actors.app`` and every test
kit start the actors here, so what the tests run is what production runs.

A cluster host (``Wiring.cluster``) adds the SnapshotShipper (before the
SnapshotManager, which tells it of each snapshot), the HostLease (before the
Supervisor: a host that cannot renew its lease does not start) and the Waker
(after it). Without ``cluster`` nothing of that starts.

Who restarts whom: the Supervisor restarts its Spawners; the Root counts the
crashes of the SnapshotManager and the Reaper (which restart in place, keeping
their addresses); both stop past the same bounded intensity
(``supervisor.restart_max`` within ``restart_window_s``) and call ``on_fatal``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pykka

from actors.clock import Clock
from actors.cluster.lease import HostLease
from actors.cluster.shipping import ImageMover, RemoteSnapshots, SnapshotShipper, index_snapshot
from actors.cluster.waker import Waker
from actors.engine.base import Engine
from actors.labels import LABEL_INSTANCE
from actors.messages import (
    Beat,
    PruneJobs,
    ReportTo,
    SetBaseImage,
    ShipSnapshots,
    Supervise,
    SweepOrphans,
    SweepSnapshots,
    Tick,
)
from actors.metrics import Metrics
from actors.model import Snapshot
from actors.outage import quiet_pykka
from actors.pool import SpawnerFactory
from actors.reaper import Reaper
from actors.restarts import RestartIntensity, Root
from actors.settings import Settings
from actors.snapshot_manager import SnapshotManager
from actors.spawner import RemoteLookup, Spawner
from actors.store import JobStore
from actors.store.cluster import ClusterStore
from actors.supervisor import Supervisor
from actors.telemetry import Secrets
from actors.timers import Scheduler
from actors.usage import UsageLog, UsageStore
from actors.watcher import Watcher

__all__ = ["Actors", "ClusterWiring", "Wiring", "spawner_factory", "start_actors", "start_root"]

log = logging.getLogger(__name__)

# How often finished jobs past supervisor.retention_s are deleted.
RETENTION_SWEEP_S = 3600.0


@dataclass(frozen=True)
class Wiring:
    """What the actors are built from. ``watcher_sleep`` waits the Watcher's
    reconnect backoff (tests hold it); ``run_timers`` False leaves the timers
    to the caller (``Scheduler.run_due``, or explicit Ticks)."""

    engine: Engine
    store: JobStore
    settings: Settings
    clock: Clock
    container_labels: Mapping[str, str] = field(default_factory=dict)
    on_fatal: Callable[[str], None] | None = None
    # Every configured base image (worker.image, each agent type's) -> its ID.
    base_image_ids: Mapping[str, str] = field(default_factory=dict)
    watcher: bool = True
    watcher_sleep: Callable[[float], None] | None = None
    run_timers: bool = True
    # The app's registry and scrub set; None: private ones nobody reads (tests).
    metrics: Metrics | None = None
    secrets: Secrets | None = None
    cluster: ClusterWiring | None = None


@dataclass(frozen=True)
class ClusterWiring:
    """What makes a host a cluster member: its share of the cluster store, the
    engine's registry calls (None: snapshots never leave this host) and how to
    delete a pushed manifest; ``api`` is this host's address for ``snapyard hosts``."""

    store: ClusterStore
    mover: ImageMover | None = None
    delete_manifest: Callable[[str], None] | None = None
    api: str = ""
    wait_for_work: Callable[[float], bool] | None = None


@dataclass
class Actors:
    """The running actors, in start order; ``stop`` goes in reverse."""

    scheduler: Scheduler
    root: pykka.ActorRef[Any] | None = None
    snapshots: pykka.ActorRef[Any] | None = None
    reaper: pykka.ActorRef[Any] | None = None
    supervisor: pykka.ActorRef[Any] | None = None
    watcher: Watcher | None = None
    shipper: pykka.ActorRef[Any] | None = None
    lease: pykka.ActorRef[Any] | None = None
    waker: Waker | None = None

    def stop(self, timeout_s: float) -> None:
        self.scheduler.stop()
        if self.waker is not None:
            self.waker.stop()
            self.waker = None
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        refs = (self.supervisor, self.lease, self.reaper, self.snapshots, self.shipper, self.root)
        for ref in refs:
            if ref is None:
                continue
            try:
                ref.stop(timeout=timeout_s)
            except (pykka.ActorDeadError, pykka.Timeout):
                log.warning("%s did not stop within %.1fs", ref, timeout_s)
        self.supervisor = self.reaper = self.snapshots = self.root = None
        self.lease = self.shipper = None


def start_root(
    settings: Settings, clock: Clock, on_fatal: Callable[[str], None] | None
) -> pykka.ActorRef[Any]:
    """The top of the tree, with the restart intensity every parent uses."""
    sup = settings.supervisor
    return Root.start(RestartIntensity(sup.restart_max, sup.restart_window_s), clock, on_fatal)


def start_snapshots(
    engine: Engine,
    settings: Settings,
    clock: Clock,
    root: pykka.ActorRef[Any],
    metrics: Metrics | None = None,
    usage: UsageStore | None = None,
    shipper: pykka.ActorRef[Any] | None = None,
    index: Callable[[Snapshot], bool] | None = None,
) -> pykka.ActorRef[Any]:
    """The SnapshotManager, a child of ``root``; ``usage`` keeps LRU order across restarts."""
    ref = SnapshotManager.start(
        engine,
        settings,
        clock,
        parent=root,
        metrics=metrics,
        usage=UsageLog(usage),
        shipper=shipper,
        index=index,
    )
    root.tell(Supervise("snapshot-manager", ref))
    return ref


def spawner_factory(
    engine: Engine,
    snapshots: pykka.ActorRef[Any],
    settings: Settings,
    clock: Clock,
    labels: Mapping[str, str] | None = None,
    metrics: Metrics | None = None,
    remote: RemoteLookup | None = None,
) -> SpawnerFactory:
    """Builds (and, after a crash, rebuilds) the Spawner ``name`` under ``parent``."""
    # The instance label rides on every container, whatever the caller stamps.
    stamped = {**(labels or {}), LABEL_INSTANCE: settings.supervisor.instance_id}

    def start(name: str, parent: pykka.ActorRef[Any]) -> pykka.ActorRef[Any]:
        return Spawner.start(
            engine,
            snapshots,
            settings,
            clock,
            name,
            parent,
            stamped,
            metrics=metrics,
            remote=remote,
        )

    return start


def start_lease(
    cluster: ClusterWiring, settings: Settings, clock: Clock, metrics: Metrics | None
) -> pykka.ActorRef[Any]:
    """The HostLease; its first renewal happens before this returns (or raises)."""

    def running() -> int:
        if metrics is None:
            return 0
        value = metrics.registry.get_sample_value("snapyard_running_workers")
        return int(value or 0)

    c = settings.cluster
    return HostLease.start(
        cluster.store,
        clock,
        c.lease_s,
        c.heartbeat_s,
        api=cluster.api,
        max_workers=settings.supervisor.max_workers,
        running=running,
    )


def start_actors(wiring: Wiring) -> Actors:
    """Start every actor in dependency order; on a failure, stop what started."""
    engine, settings, clock = wiring.engine, wiring.settings, wiring.clock
    sup = settings.supervisor
    if not sup.instance_id:
        raise ValueError("supervisor.instance_id is empty: resolve it first (resolve_instance_id)")
    quiet_pykka()  # a store away is reported by the asker, not by pykka too
    actors = Actors(Scheduler(clock))
    try:
        root = actors.root = start_root(settings, clock, wiring.on_fatal)
        metrics = wiring.metrics
        cluster = wiring.cluster
        if cluster is not None and cluster.mover is not None:
            actors.shipper = SnapshotShipper.start(
                cluster.store,
                cluster.mover,
                settings,
                clock,
                delete_manifest=cluster.delete_manifest,
            )
        index = None if cluster is None else partial(index_snapshot, cluster.store)
        snapshots = actors.snapshots = start_snapshots(
            engine, settings, clock, root, metrics, wiring.store, actors.shipper, index
        )
        remote = None
        if cluster is not None and cluster.mover is not None:
            assert actors.shipper is not None
            actors.shipper.tell(ReportTo(snapshots))
            mover, registry = cluster.mover, settings.cluster.registry
            remote = RemoteSnapshots(cluster.store, mover, registry, snapshots).fetch
        for image, image_id in wiring.base_image_ids.items():
            snapshots.tell(SetBaseImage(image_id, image=image))
        reaper = actors.reaper = Reaper.start(engine, root, instance_id=sup.instance_id)
        root.tell(Supervise("reaper", reaper))
        factory = spawner_factory(
            engine, snapshots, settings, clock, wiring.container_labels, metrics, remote
        )
        if cluster is not None:
            actors.lease = start_lease(cluster, settings, clock, metrics)
        # Events from here on are replayed to the Watcher: an exit between the
        # Supervisor's recovery listing and the stream opening is not lost.
        since = clock.now()
        supervisor = actors.supervisor = Supervisor.start(
            engine,
            wiring.store,
            settings,
            clock,
            snapshots,
            reaper,
            factory,
            wiring.on_fatal,
            metrics=metrics,
            secrets=wiring.secrets,
        )
        if actors.lease is not None:
            actors.lease.tell(ReportTo(supervisor))
        if cluster is not None and cluster.wait_for_work is not None:
            actors.waker = Waker(cluster.wait_for_work, supervisor, settings.cluster.heartbeat_s)
            actors.waker.start()
        if wiring.watcher:
            actors.watcher = Watcher(
                engine,
                supervisor,
                snapshots,
                clock,
                since=since,
                retry=settings.retry,
                sleep=wiring.watcher_sleep,
            )
            actors.watcher.start()
        scheduler = actors.scheduler
        scheduler.every(sup.tick_interval_s, supervisor, Tick)
        scheduler.every(
            settings.snapshots.sweep_interval_s, snapshots, lambda _now: SweepSnapshots()
        )
        # The first orphan sweep waits one grace period: re-adoption comes first.
        scheduler.every(
            sup.orphan_sweep_interval_s, supervisor, SweepOrphans, first_after_s=sup.orphan_grace_s
        )
        # Retention: an hourly run deletes what aged past retention_s meanwhile.
        scheduler.every(
            min(RETENTION_SWEEP_S, sup.retention_s), supervisor, lambda _now: PruneJobs()
        )
        granularity = sup.tick_interval_s
        if actors.lease is not None:
            beat = settings.cluster.heartbeat_s
            scheduler.every(beat, actors.lease, Beat)
            granularity = min(granularity, beat / 2)
        if actors.shipper is not None:
            scheduler.every(settings.cluster.heartbeat_s, actors.shipper, ShipSnapshots)
        if wiring.run_timers:
            scheduler.start(granularity_s=granularity)
    except BaseException:
        with contextlib.suppress(Exception):
            actors.stop(timeout_s=sup.shutdown_timeout_s)
        raise
    return actors
