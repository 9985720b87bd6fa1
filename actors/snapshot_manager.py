"""The SnapshotManager actor: sole owner of the snapshot registry.

One entry per (project, work item), addressed by immutable image ID. The
registry is a cache of what the engine holds, so every rule here is about
never trusting it more than the engine: an entry that points at a missing
image is dropped on the first sign (``Invalidate``, ``ImageDeleted``, a
sweep), and a restart rebuilds it from image labels instead of a file.

This actor never asks anyone (Spawners ask it), and its Docker calls are only
quick image list/inspect/remove; a failing call is logged and retried on the
next sweep, it never crashes the actor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import pykka

from actors.clock import Clock
from actors.engine.base import Conflict, Engine, EngineError, ImageInfo, ImageMissing
from actors.eviction import created_at, over_limits, snapshot_from_labels
from actors.lineage import BaseImages, grew_from
from actors.messages import (
    ActorCrashed,
    ForgetSnapshot,
    ImageDeleted,
    Invalidate,
    ListSnapshots,
    Lookup,
    RecordSnapshot,
    Register,
    RemoveSnapshot,
    SetBaseImage,
    Supersede,
    SweepSnapshots,
)
from actors.metrics import Metrics
from actors.model import Snapshot, SnapshotKey
from actors.naming import bare_image_id, same_image
from actors.settings import Settings
from actors.snapshot_images import list_snapshot_images, own_bytes_of
from actors.snapshot_registry import SnapshotRegistry
from actors.store.base import StoreError
from actors.telemetry import capture_error
from actors.tombstones import Tombstones
from actors.usage import UsageLog

__all__ = [
    "SnapshotManager",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _DeletePending:
    """Self-tell: delete queued images after replying, so a Lookup never waits on rmi."""


class SnapshotManager(pykka.ThreadingActor):
    """Owns ``key -> Snapshot``; every change to it is a message handled here."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        clock: Clock,
        parent: pykka.ActorRef[Any] | None = None,
        name: str = "snapshot-manager",
        *,
        metrics: Metrics | None = None,
        usage: UsageLog | None = None,
        shipper: pykka.ActorRef[Any] | None = None,
        index: Callable[[Snapshot], bool] | None = None,
    ) -> None:
        """``parent`` hears every crash (``ActorCrashed``) and decides past how many
        the manager must stop (``actors.restarts.Root``); ``metrics`` is the app's
        (None: a private registry nobody scrapes). ``shipper`` (a cluster host's
        ``SnapshotShipper``) hears of every snapshot registered and evicted;
        ``index`` records a registered one in the cluster's index at once, False
        when the cluster has a newer one (``actors.cluster.shipping.index_snapshot``)."""
        self._shipper = shipper
        self._index = index
        super().__init__()
        self._metrics = metrics if metrics is not None else Metrics.unscraped()
        self._engine = engine
        self._settings = settings
        self._clock = clock
        self._parent = parent
        self._name = name
        self._registry = SnapshotRegistry()  # indexed by image ID: rebuilds stay O(n)
        # Evicted or replaced images not deleted yet: in use (409), a parent of
        # another image, or the engine did not answer. Retried every sweep.
        self._pending: dict[str, str] = {}
        self._tombstones = Tombstones()
        # Every configured base image (one per agent type's) and its current ID.
        self._bases = BaseImages(settings.worker_images())
        self._needs_rebuild = True
        self._usage = usage or UsageLog(None)  # LRU order across restarts (actors.usage)

    # --- life cycle --------------------------------------------------------

    def on_start(self) -> None:
        try:
            self._resolve_base()
            self._rebuild()
            self._delete_pending()
        except Exception as exc:
            # pykka calls no on_failure when on_start fails: report it here.
            capture_error(exc, source="snapshot_manager")
            self._report(f"{type(exc).__name__}: {exc}")
            raise

    def on_stop(self) -> None:
        self._usage.flush(self._registry.values(), complete=not self._needs_rebuild)

    def on_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # A bug, not an engine error: tell the parent so it restarts us; the
        # restarted manager rebuilds the registry from labels, losing nothing.
        if exception_value is not None:
            capture_error(exception_value, source="snapshot_manager")
        self._report(f"{exception_type}: {exception_value}")

    def on_receive(self, message: Any) -> Any:
        try:
            return self._handle(message)
        except Exception as exc:
            return self._restart_in_place(message, exc)

    def _restart_in_place(self, message: Any, exc: Exception) -> Any:
        """A bug hit a message: restart as OTP would, but keep our address.

        The registry is only a cache of the engine's labelled images, so a
        restart is a rebuild from them; Spawners, the Watcher and the API keep
        the same ActorRef and nothing in the inbox is lost. The crash goes to
        the parent, which stops us past its restart budget.
        """
        capture_error(exc, source="snapshot_manager", extras={"message": type(message).__name__})
        self._report(f"{type(exc).__name__}: {exc}", restarted=True)
        log.exception(
            "%s failed on %s; rebuilding the registry", self._name, type(message).__name__
        )
        self._registry.clear()
        self._needs_rebuild = True
        self._resolve_base()
        self._rebuild()
        if isinstance(message, Lookup):
            return None  # a miss: the job starts from the base image
        if isinstance(message, ListSnapshots | RemoveSnapshot):
            raise exc  # the asker gets the error; the actor lives on
        return None

    def _report(self, error: str, *, restarted: bool = False) -> None:
        if self._parent is None:
            return
        try:
            crash = ActorCrashed(self._name, error, urn=self.actor_urn, restarted=restarted)
            self._parent.tell(crash)
        except pykka.ActorDeadError:
            log.warning("%s: its parent is gone; the crash is only logged", self._name)

    def _handle(self, message: Any) -> Any:
        match message:
            case Lookup(key=key, base_image_id=base_image_id):
                return self._lookup(key, base_image_id)
            case Register(snapshot=snapshot):
                queued = set(self._pending)
                self._register(snapshot)
                # A light sweep: the policy in memory, deleting only what this
                # Register evicted. The engine listing (1 + N calls on Docker)
                # is left to the timer's sweep, so Lookups never queue behind it.
                self._sweep(full=False, queued_before=queued)
                return None
            case Invalidate(key=key, image_id=image_id, reason=reason):
                self._invalidate(key, image_id, reason)
                return None
            case Supersede(key=key, image_id=image_id, reason=reason):
                if (entry := self._registry.get(key)) and same_image(entry.image_id, image_id):
                    self._evict(entry, reason)
                    self._delete_pending()
                return None
            case ImageDeleted(image_id=image_id):
                self._image_deleted(image_id)
                return None
            case SweepSnapshots():
                self._sweep()
                self._usage.flush(self._registry.values(), complete=not self._needs_rebuild)
                return None
            case ListSnapshots():
                return sorted(self._registry.values(), key=lambda s: s.key)
            case RemoveSnapshot(key=key):
                return self._remove(key)
            case SetBaseImage(image_id=image_id, image=image):
                self._set_base(image or self._settings.worker.image, image_id)
                return None
            case _DeletePending():
                self._delete_pending()
                return None
            case _:
                return super().on_receive(message)

    # --- messages ----------------------------------------------------------

    def _lookup(self, key: SnapshotKey, base_image_id: str | None) -> Snapshot | None:
        entry = self._registry.get(key)
        if entry is not None:
            reason = self._unusable(entry)
            if reason is not None:
                self._evict(entry, reason)
                # Delete after this reply: the Spawner is waiting on us.
                self.actor_ref.tell(_DeletePending())
                entry = None
        if entry is not None and not grew_from(entry, base_image_id):
            # Another agent type's lineage: valid for it, so kept; this job
            # starts from its own base and its commit replaces the entry.
            log.info(
                "snapshot %s grew from %s, not %s: starting from the base image",
                key,
                entry.base_image_id,
                base_image_id,
            )
            entry = None
        if entry is None:
            self._metrics.snapshot_misses.inc()
            return None
        # No depth check here: the commit that reaches snapshots.max_layers is
        # flattened (Spawner), so a deep entry is still a hit and keeps its state.
        entry = dataclasses.replace(entry, last_used_at=self._clock.now())
        self._registry[key] = entry
        self._usage.used(entry)
        self._metrics.snapshot_hits.inc()
        return entry

    def _register(self, snapshot: Snapshot) -> None:
        if bare_image_id(snapshot.image_id) in self._tombstones:
            log.info(
                "ignoring Register of %s: image %s was deleted", snapshot.key, snapshot.image_id
            )
            return
        if self._bases.is_old(snapshot.base_image_id):
            # Committed from a base that has since been rebuilt: never usable.
            log.info("refusing snapshot %s of an old base image", snapshot.image_id)
            self._queue_delete(snapshot.image_id, "descends from an old base image")
            return
        current = self._registry.get(snapshot.key)
        if current is not None:
            if same_image(current.image_id, snapshot.image_id):
                return
            # Equal timestamps: arrival order decides, since one job per key
            # runs at a time and its Register follows the previous one.
            if snapshot.created_at < current.created_at:
                log.info("ignoring older snapshot %s for %s", snapshot.image_id, snapshot.key)
                self._queue_delete(snapshot.image_id, "older than the registered snapshot")
                return
            self._queue_delete(current.image_id, "replaced by a newer snapshot")
        self._pending.pop(bare_image_id(snapshot.image_id), None)
        self._registry[snapshot.key] = snapshot
        if not self._indexed(snapshot):
            self._evict(snapshot, "a newer snapshot exists in the cluster")
            return
        self._ship(RecordSnapshot(snapshot))

    def _indexed(self, snapshot: Snapshot) -> bool:
        """Before Register's reply: the key's next job may be claimed on any host."""
        if self._index is None:
            return True
        try:
            return self._index(snapshot)
        except StoreError as exc:
            # The shipper records it again (and retries) once the database is back.
            log.warning("snapshot %s not indexed yet: %s", snapshot.key, exc)
            return True

    def _invalidate(self, key: SnapshotKey, image_id: str, reason: str) -> None:
        # A 404 says the image is gone, whoever's entry it was.
        self._tombstones.add(image_id)
        entry = self._registry.get(key)
        if entry is None or not same_image(entry.image_id, image_id):
            log.info("Invalidate %s/%s is stale: the entry moved on", key, image_id)
            return
        del self._registry[key]
        log.warning("snapshot %s invalidated (%s): %s", key, image_id, reason)

    def _image_deleted(self, image_id: str) -> None:
        self._tombstones.add(image_id)
        self._pending.pop(bare_image_id(image_id), None)
        for key in self._registry.keys_of(image_id):
            del self._registry[key]
            log.warning("snapshot %s dropped: image %s was deleted", key, image_id)

    def _remove(self, key: SnapshotKey) -> bool:
        entry = self._registry.get(key)
        if entry is None:
            return False
        self._evict(entry, "removed on request")
        self._delete_pending()
        return True

    def _set_base(self, image: str, image_id: str) -> None:
        previous = self._bases.get(image)
        if not self._bases.set(image, image_id):
            return
        log.info("base image %s is now %s (was %s)", image, image_id, previous)
        for entry in list(self._registry.values()):
            if self._bases.is_old(entry.base_image_id):
                self._evict(entry, "descends from an old base image")
        self._delete_pending()

    # --- sweeping ----------------------------------------------------------

    def _sweep(self, full: bool = True, queued_before: set[str] | None = None) -> None:
        """Drop what is gone, then evict by TTL, count (LRU) and size; delete images.

        ``full=False`` skips the engine listing and retries only deletions queued
        since ``queued_before`` (the rest wait for the next full sweep).
        """
        if full:
            if self._needs_rebuild:
                self._rebuild()
            self._drop_gone()
        else:
            queued_before = queued_before or set()
        for entry in list(self._registry.values()):
            reason = self._unusable(entry)
            if reason is not None:
                self._evict(entry, reason)
        limits = self._settings.snapshots
        for entry, reason in over_limits(
            self._registry.values(), limits.max_count, limits.max_total_bytes
        ):
            self._evict(entry, reason)
        self._delete_pending(skip=None if full else queued_before)
        self._metrics.snapshots.set(len(self._registry))
        self._metrics.snapshot_bytes.set(sum(s.charged_bytes for s in self._registry.values()))
        self._metrics.snapshot_pending_deletions.set(len(self._pending))

    def _drop_gone(self) -> None:
        """One list call finds the images still there; orphans past a grace are deleted."""
        listed = self._list_snapshot_images()
        if listed is None:
            return
        present = {bare_image_id(info.id) for info in listed}
        for key, entry in list(self._registry.items()):
            if bare_image_id(entry.image_id) in present or self._exists(entry.image_id):
                continue
            del self._registry[key]
            self._tombstones.add(entry.image_id)
            log.warning("snapshot %s dropped: image %s is gone", key, entry.image_id)
        # A commit whose Register never arrived (a Spawner died in between)
        # leaves an image nobody owns. A grace period protects in-flight ones.
        grace = self._settings.supervisor.orphan_grace_s
        now = self._clock.now()
        for info in listed:
            if self._registry.holds(info.id) or bare_image_id(info.id) in self._pending:
                continue
            if now - created_at(info) > grace:
                self._queue_delete(info.id, "orphaned snapshot image")

    def _exists(self, image_id: str) -> bool:
        """For entries missing from the labelled listing: ask once before dropping."""
        try:
            self._engine.inspect_image(image_id)
        except ImageMissing:
            return False
        except EngineError as exc:
            log.warning("could not inspect %s (kept until the next sweep): %s", image_id, exc)
        return True

    def _unusable(self, entry: Snapshot) -> str | None:
        # TTL counts from the commit: a snapshot's environment ages whether or
        # not it is used; LRU (last_used_at) decides count and size evictions.
        ttl = self._settings.ttl_for(entry.key.project)
        if self._clock.now() - entry.created_at > ttl:
            return f"older than its TTL of {ttl:g}s"
        if self._bases.is_old(entry.base_image_id):
            return "descends from an old base image"
        return None

    def _evict(self, entry: Snapshot, reason: str) -> None:
        self._registry.pop(entry.key, None)
        self._metrics.snapshot_evictions.inc()
        log.info("evicting snapshot %s (%s): %s", entry.key, entry.image_id, reason)
        self._queue_delete(entry.image_id, reason)
        self._ship(ForgetSnapshot(entry.key, entry.image_id))

    def _ship(self, message: object) -> None:
        if self._shipper is not None:
            with contextlib.suppress(pykka.ActorDeadError):  # stopping
                self._shipper.tell(message)

    def _queue_delete(self, image_id: str, reason: str) -> None:
        if bare_image_id(image_id) not in self._tombstones:
            self._pending[bare_image_id(image_id)] = reason

    def _delete_pending(self, skip: set[str] | None = None) -> None:
        """Try every queued deletion; what the engine refuses stays for the next sweep."""
        for image_id, reason in list(self._pending.items()):
            if skip is not None and image_id in skip:
                continue
            try:
                self._engine.remove_image(image_id)
            except ImageMissing:
                pass
            except Conflict as exc:
                # In use by a container, or the parent of another snapshot:
                # Nomad's answer, deferred deletion, not an error.
                log.info("image %s still in use, deleting later: %s", image_id, exc)
                continue
            except EngineError as exc:
                log.warning("could not delete image %s (retrying next sweep): %s", image_id, exc)
                continue
            log.info("deleted snapshot image %s (%s)", image_id, reason)
            del self._pending[image_id]
            self._tombstones.add(image_id)

    # --- reconciliation ----------------------------------------------------

    def _resolve_base(self) -> None:
        for image in self._settings.worker_images():
            try:
                self._bases.set(image, self._engine.inspect_image(image).id)
            except EngineError as exc:
                # Unknown until a Spawner tells us (SetBaseImage): no base check meanwhile.
                log.warning("base image %s not resolved: %s", image, exc)

    def _rebuild(self) -> None:
        """Adopt every labelled snapshot image: newest per key wins, the rest are deleted."""
        listed = self._list_snapshot_images()
        if listed is None:
            return
        self._needs_rebuild = False
        adopted = 0
        for info in sorted(listed, key=lambda i: (created_at(i), i.created_at, i.id)):
            snapshot = snapshot_from_labels(info)
            if snapshot is None:
                log.warning("image %s is labelled a snapshot but lacks its key labels", info.id)
                continue
            if self._registry.holds(info.id):  # an index, not a set of all per image
                continue
            snapshot = dataclasses.replace(
                snapshot, own_bytes=own_bytes_of(self._engine, info, snapshot.base_image_id)
            )
            self._register(snapshot)
            adopted += 1
        self._usage.restore(self._registry)
        for entry in list(self._registry.values()):
            reason = self._unusable(entry)
            if reason is not None:
                self._evict(entry, reason)
        log.info("registry rebuilt: %d snapshot images, %d kept", adopted, len(self._registry))

    def _list_snapshot_images(self) -> list[ImageInfo] | None:
        return list_snapshot_images(self._engine, self._settings)
