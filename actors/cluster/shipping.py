"""Snapshots that follow their work: the index, the registry, and pulls.

Two halves, one per thread that needs them:

- ``SnapshotShipper`` (an actor): after a snapshot is registered on this host
  it records it in the cluster's snapshot index and pushes it to the registry
  in the background, retrying with backoff while the registry is down (a push
  never fails a job); the digest goes into the index. It keeps the local copies
  honest: a key whose newest snapshot is another image anywhere is dropped and
  deleted here (``superseded``), and an evicted snapshot is forgotten in the
  index and its manifest deleted from the registry.
- ``RemoteSnapshots`` (called on a Spawner's thread, where slow Docker calls
  belong): a Lookup whose key's newest snapshot is on another host pulls it by
  digest, registers it here, and starts from it. No registry, no digest yet,
  or a failed pull: the job starts from its base image, never fails.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import pykka

from actors.backoff import backoff, delay_after
from actors.clock import Clock
from actors.engine.base import EngineError, ImageInfo
from actors.eviction import snapshot_from_labels
from actors.lineage import grew_from
from actors.messages import (
    ForgetSnapshot,
    ListSnapshots,
    RecordSnapshot,
    Register,
    ReportTo,
    ShipSnapshots,
    Supersede,
)
from actors.model import Snapshot, SnapshotKey
from actors.naming import same_image, snapshot_image_name
from actors.outage import StoreOutage
from actors.settings import Settings
from actors.store.cluster import ClusterStore, SnapshotRecord

__all__ = [
    "ImageMover",
    "RemoteSnapshots",
    "SnapshotShipper",
    "index_snapshot",
    "registry_repository",
]

log = logging.getLogger(__name__)

# The manager's registry is in memory: a slower answer means it is wedged.
_LIST_TIMEOUT_S = 10.0


class ImageMover(Protocol):
    """The engine's registry calls (``actors.engine``): image IDs survive both."""

    def push_image(self, image_id: str, repository: str) -> str:
        """Push; return the pullable ``repository@sha256:...`` reference."""
        ...

    def pull_image(self, reference: str) -> str:
        """Pull by digest; return the local image ID."""
        ...

    def inspect_image(self, image: str) -> ImageInfo: ...


def registry_repository(registry: str, settings: Settings, key: SnapshotKey) -> str:
    """Where a key's snapshots live in the registry: ``host:port/<repository>/<slug>``."""
    repository, _tag = snapshot_image_name(
        settings.snapshots.repository, key.project, key.work_item
    )
    return f"{registry}/{repository}"


@dataclass
class _Push:
    """A push not done yet: tried again at ``due``, after ``failures`` failures."""

    snapshot: Snapshot
    failures: int = 0
    due: float = 0.0


def index_record(store: ClusterStore, snapshot: Snapshot) -> SnapshotRecord:
    """What the index says of ``snapshot`` once this host holds it.

    A snapshot pulled from another host keeps the digest it has in the
    registry; a fresh commit has none until its push is done. The agent type
    is not known here (a Snapshot names its base image): the index shows it
    only, and lineage is checked on pull (``grew_from``).
    """
    known = store.newest_snapshot(snapshot.key)
    digest = None
    if known is not None and same_image(known.image_id, snapshot.image_id):
        digest = known.digest  # pulled from another host: already in the registry
    return SnapshotRecord(
        key=snapshot.key,
        agent_type="",
        host_id=store.host_id,
        image_id=snapshot.image_id,
        created_at=snapshot.created_at,
        digest=digest,
    )


def index_snapshot(store: ClusterStore, snapshot: Snapshot) -> bool:
    """Record ``snapshot`` as its key's newest in the cluster, now; False if a newer one is.

    The SnapshotManager calls it inside Register, which the Spawner awaits
    before it reports the job's end: so the key's next job, claimed once this
    one's key is released, already sees where its snapshot is.
    """
    return store.record_snapshot(index_record(store, snapshot))


class SnapshotShipper(pykka.ThreadingActor):
    """Indexes this host's snapshots, pushes them, and drops the superseded ones."""

    def __init__(
        self,
        store: ClusterStore,
        engine: ImageMover,
        settings: Settings,
        clock: Clock,
        *,
        delete_manifest: Callable[[str], None] | None = None,
    ) -> None:
        """``delete_manifest(reference)`` deletes a pushed ``repo@sha256:...`` from the
        registry; with no ``cluster.registry`` nothing is pushed and nothing deleted."""
        super().__init__()
        self._store = store
        self._engine = engine
        self._settings = settings
        self._registry = settings.cluster.registry
        self._clock = clock
        self._delete_manifest = delete_manifest
        self._wait = backoff(settings.retry)
        self._manager: pykka.ActorRef[Any] | None = None
        self._pending: dict[SnapshotKey, _Push] = {}
        # Registered here while the database was away: indexed at the next ShipSnapshots.
        self._unrecorded: dict[SnapshotKey, Snapshot] = {}
        # What this host pushed, by key: its image and digest, deleted when replaced.
        self._pushed: dict[SnapshotKey, tuple[str, str]] = {}
        self._outage = StoreOutage("shipper", log)

    def on_receive(self, message: Any) -> Any:
        try:
            match message:
                case RecordSnapshot(snapshot=snapshot):
                    self._unrecorded[snapshot.key] = snapshot
                    self._record(snapshot)
                case ForgetSnapshot(key=key, image_id=image_id):
                    self._forget(key, image_id)
                case ShipSnapshots(now=now):
                    for snapshot in list(self._unrecorded.values()):
                        self._record(snapshot)  # the database was away at its Register
                    self._retry_pushes(now)
                    self._drop_superseded()
                case ReportTo(ref=ref):
                    self._manager = ref
                case _:
                    log.warning("shipper: unexpected message %r", message)
        except Exception as exc:
            # The database or the registry away: the next ShipSnapshots tries again.
            if not self._outage.lost(exc):
                log.exception("shipper: %s failed", type(message).__name__)
            return None
        if isinstance(message, ShipSnapshots | RecordSnapshot):
            self._outage.answered()
        return None

    # --- index and push ----------------------------------------------------

    def _record(self, snapshot: Snapshot) -> None:
        record = index_record(self._store, snapshot)
        digest = record.digest
        accepted = self._store.record_snapshot(record)
        if self._unrecorded.get(snapshot.key) is snapshot:
            del self._unrecorded[snapshot.key]
        if not accepted:
            log.info(
                "snapshot %s of %s is older than the cluster's: deleting it",
                snapshot.image_id,
                snapshot.key,
            )
            self._pending.pop(snapshot.key, None)
            self._tell_manager(
                Supersede(snapshot.key, snapshot.image_id, "a newer one exists in the cluster")
            )
            return
        if digest is None and self._registry:
            self._pending[snapshot.key] = _Push(snapshot)
            self._push(self._pending[snapshot.key], self._clock.now())

    def _retry_pushes(self, now: float) -> None:
        for push in list(self._pending.values()):
            if push.due <= now:
                self._push(push, now)

    def _push(self, push: _Push, now: float) -> None:
        snapshot = push.snapshot
        repository = registry_repository(self._registry, self._settings, snapshot.key)
        try:
            reference = self._engine.push_image(snapshot.image_id, repository)
        except EngineError as exc:
            push.failures += 1
            push.due = now + delay_after(self._wait, push.failures)
            log.warning(
                "push of %s (%s) failed %d time(s), next try in %.1fs: %s",
                snapshot.key,
                snapshot.image_id,
                push.failures,
                push.due - now,
                exc,
            )
            return
        # Raises with the database away: the push stays pending (a second push of
        # the same image is the same manifest) and the digest is recorded next time.
        self._store.record_digest(snapshot.key, snapshot.image_id, reference)
        if self._pending.get(snapshot.key) is push:
            del self._pending[snapshot.key]
        log.info("pushed snapshot %s (%s) as %s", snapshot.key, snapshot.image_id, reference)
        previous = self._pushed.get(snapshot.key)
        self._pushed[snapshot.key] = (snapshot.image_id, reference)
        if previous is not None and not same_image(previous[0], snapshot.image_id):
            self._delete_pushed(previous[1])

    # --- dropping ----------------------------------------------------------

    def _forget(self, key: SnapshotKey, image_id: str) -> None:
        """Evicted here: out of the index (if still the newest) and out of the registry."""
        if self._pending_is(key, image_id):
            del self._pending[key]
        newest = self._store.newest_snapshot(key)
        self._store.forget_snapshot(key, image_id)
        pushed = self._pushed.get(key)
        if pushed is not None and same_image(pushed[0], image_id):
            del self._pushed[key]
            self._delete_pushed(pushed[1])
        elif newest is not None and same_image(newest.image_id, image_id) and newest.digest:
            self._delete_pushed(newest.digest)  # pulled here, and now evicted everywhere

    def _drop_superseded(self) -> None:
        if self._manager is None:
            return
        found = self._manager.ask(ListSnapshots(), timeout=_LIST_TIMEOUT_S)
        mine = {s.key: s.image_id for s in found} if isinstance(found, list) else {}
        for key in self._store.superseded(list(mine.items())):
            log.info("snapshot %s (%s) is superseded in the cluster: deleting it", key, mine[key])
            self._tell_manager(Supersede(key, mine[key], "a newer snapshot exists in the cluster"))

    def _delete_pushed(self, reference: str) -> None:
        if self._delete_manifest is None:
            return
        try:
            self._delete_manifest(reference)
        except Exception as exc:
            # The registry's own garbage collection is the backstop (README).
            log.warning("could not delete manifest %s: %s", reference, exc)

    # --- helpers -----------------------------------------------------------

    def _pending_is(self, key: SnapshotKey, image_id: str) -> bool:
        push = self._pending.get(key)
        return push is not None and same_image(push.snapshot.image_id, image_id)

    def _tell_manager(self, message: object) -> None:
        if self._manager is not None:
            with contextlib.suppress(pykka.ActorDeadError):
                self._manager.tell(message)


class RemoteSnapshots:
    """A Spawner's second opinion on a Lookup: the cluster's newest snapshot of the key."""

    def __init__(
        self,
        store: ClusterStore,
        engine: ImageMover,
        registry: str,
        manager: pykka.ActorRef[Any],
    ) -> None:
        self._store = store
        self._engine = engine
        self._registry = registry
        self._manager = manager

    def fetch(
        self, key: SnapshotKey, local: Snapshot | None, base_image_id: str | None
    ) -> Snapshot | None:
        """The snapshot to start from: ``local`` unless the index knows a newer one
        elsewhere; that one pulled and registered here; None to start from base."""
        try:
            newest = self._store.newest_snapshot(key)
        except Exception as exc:
            log.warning("snapshot index unreachable (%s): using the local copy of %s", exc, key)
            return local
        if newest is None or newest.host_id == self._store.host_id:
            return local
        if local is not None and (
            same_image(local.image_id, newest.image_id) or local.created_at >= newest.created_at
        ):
            return local
        # The local copy (if any) is older than the cluster's: never start from it.
        if not self._registry or newest.digest is None:
            log.info("snapshot %s is on %s and not pushed: starting from base", key, newest.host_id)
            return None
        return self._pull(key, newest, base_image_id)

    def _pull(
        self, key: SnapshotKey, newest: SnapshotRecord, base_image_id: str | None
    ) -> Snapshot | None:
        assert newest.digest is not None
        try:
            image_id = self._engine.pull_image(newest.digest)
            snapshot = snapshot_from_labels(self._engine.inspect_image(image_id))
        except EngineError as exc:
            log.warning("pull of %s (%s) failed: starting from base: %s", key, newest.digest, exc)
            return None
        if snapshot is None or snapshot.key != key or not grew_from(snapshot, base_image_id):
            log.warning(
                "pulled %s is not a usable snapshot of %s: starting from base", image_id, key
            )
            return None
        log.info("pulled snapshot %s (%s) from %s", key, image_id, newest.host_id)
        with contextlib.suppress(pykka.ActorDeadError):
            self._manager.tell(Register(snapshot))
        return snapshot
