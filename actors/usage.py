"""Snapshot LRU order that survives a restart.

The registry is rebuilt from image labels, which hold the commit time but
not the last use: without this, a restart made the LRU order the commit
order and ``max_count`` evicted the snapshot used a minute ago. Lookups are
hot and a store write costs an fsync, so uses are kept here and written in
one transaction per flush (every snapshot sweep, and when the manager stops);
a crash loses at most one sweep interval of use times, never a snapshot.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Iterable, Mapping, MutableMapping
from typing import Protocol

from actors.model import Snapshot, SnapshotKey

__all__ = ["UsageKey", "UsageLog", "UsageStore"]

log = logging.getLogger(__name__)

# (project, work item, image ID): a new snapshot of a key starts its own record.
UsageKey = tuple[str, str, str]


class UsageStore(Protocol):
    """The durable half (the job store implements it)."""

    def record_usage(
        self, uses: Mapping[UsageKey, float], keep: Collection[UsageKey] | None
    ) -> None:
        """Upsert ``uses`` (a later time wins); unless ``keep`` is None, drop
        every row not in it. One transaction."""

    def load_usage(self) -> dict[UsageKey, float]: ...


def usage_key(snapshot: Snapshot) -> UsageKey:
    return (snapshot.key.project, snapshot.key.work_item, snapshot.image_id)


class UsageLog:
    """The SnapshotManager's record of uses not yet written; owned by its thread."""

    def __init__(self, store: UsageStore | None) -> None:
        """``store`` None: uses are not kept across restarts (test kits)."""
        self._store = store
        self._pending: dict[UsageKey, float] = {}

    def used(self, snapshot: Snapshot) -> None:
        self._pending[usage_key(snapshot)] = snapshot.last_used_at

    def flush(self, registry: Iterable[Snapshot], *, complete: bool) -> None:
        """Write the pending uses; when the registry is ``complete`` (rebuilt,
        not waiting on a down engine) rows of snapshots not in it go."""
        if self._store is None:
            return
        keep = [usage_key(s) for s in registry] if complete else None
        try:
            self._store.record_usage(self._pending, keep)
        except Exception as exc:  # the next flush tries again; LRU order is not worth a crash
            log.warning("could not record snapshot use times: %s", exc)
            return
        self._pending.clear()

    def restore(self, registry: MutableMapping[SnapshotKey, Snapshot]) -> None:
        """Give rebuilt entries the last use the store remembers (if later)."""
        if self._store is None:
            return
        try:
            stored = self._store.load_usage()
        except Exception as exc:
            log.warning("could not read snapshot use times (LRU falls back to commits): %s", exc)
            return
        for key, entry in list(registry.items()):
            last = max(stored.get(usage_key(entry), 0.0), self._pending.get(usage_key(entry), 0.0))
            if last > entry.last_used_at:
                registry[key] = dataclasses.replace(entry, last_used_at=last)
