"""Which snapshots go, and why: the SnapshotManager's decisions, pure.

TTL counts from the commit (a snapshot's environment ages whether or not it
is used); count and size evict the least recently used first. A snapshot is
charged what it adds over its parent, not the base it shares with others.
The registry is rebuilt from image labels after a restart; reading one
image's labels back into a ``Snapshot`` is here too, next to the rules that
read its fields.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from actors.engine.base import ImageInfo
from actors.labels import LABEL_BASE_IMAGE_ID, LABEL_CREATED_AT, LABEL_PROJECT, LABEL_WORK_ITEM
from actors.model import Snapshot, SnapshotKey

__all__ = ["created_at", "over_limits", "snapshot_from_labels"]


def over_limits(
    entries: Iterable[Snapshot], max_count: int, max_total_bytes: int
) -> list[tuple[Snapshot, str]]:
    """The entries to evict past ``max_count`` and then ``max_total_bytes``, LRU first."""
    by_lru = sorted(entries, key=lambda s: (s.last_used_at, s.created_at))
    # Walk an index, never pop(0): a sweep past a lowered cap evicts thousands.
    excess = max(0, len(by_lru) - max_count)
    evicted = [(s, "over snapshots.max_count") for s in by_lru[:excess]]
    total = sum(s.charged_bytes for s in by_lru[excess:])
    for victim in by_lru[excess:]:
        if total <= max_total_bytes:
            break
        total -= victim.charged_bytes
        evicted.append((victim, "over snapshots.max_total_bytes"))
    return evicted


def created_at(info: ImageInfo) -> float:
    """The commit time the Spawner labelled; the image's own creation time if unlabelled."""
    try:
        return float(info.labels[LABEL_CREATED_AT])
    except (KeyError, ValueError):
        return info.created_at


def snapshot_from_labels(info: ImageInfo) -> Snapshot | None:
    """The registry entry a labelled snapshot image stands for; None if its key labels lack."""
    labels: Mapping[str, str] = info.labels
    project = labels.get(LABEL_PROJECT)
    work_item = labels.get(LABEL_WORK_ITEM)
    base = labels.get(LABEL_BASE_IMAGE_ID)
    if not project or not work_item or not base:
        return None
    created = created_at(info)
    return Snapshot(
        key=SnapshotKey(project, work_item),
        image_id=info.id,
        tag=next(iter(info.tags), ""),
        base_image_id=base,
        created_at=created,
        last_used_at=created,
        size_bytes=info.size_bytes,
        layers=info.layers,
    )
