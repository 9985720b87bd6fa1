"""The SnapshotManager's two engine reads for a rebuild: which images are its
snapshots, and what each adds over its parent. Moved out so the manager reads
as its messages; the decisions about them stay there."""

from __future__ import annotations

import logging

from actors.engine.base import Engine, EngineError, ImageInfo
from actors.instance import owned_snapshots
from actors.labels import LABEL_ROLE, ROLE_SNAPSHOT
from actors.layers import own_bytes
from actors.settings import Settings

__all__ = ["list_snapshot_images", "own_bytes_of"]

log = logging.getLogger("actors.snapshot_manager")


def list_snapshot_images(engine: Engine, settings: Settings) -> list[ImageInfo] | None:
    """This instance's snapshot images in its repository; None when the engine did not answer."""
    try:
        images = engine.list_images({LABEL_ROLE: ROLE_SNAPSHOT})
    except EngineError as exc:
        log.warning("could not list snapshot images (retrying next sweep): %s", exc)
        return None
    snapshots = settings.snapshots
    return owned_snapshots(images, snapshots.repository, settings.supervisor.instance_id)


def own_bytes_of(engine: Engine, info: ImageInfo, base_image_id: str) -> int | None:
    """What an adopted image adds over its parent (its base, when flattened).

    Unknown (None, charged at full size) when the parent cannot be inspected.
    """
    try:
        parent = engine.inspect_image(info.parent_id or base_image_id)
    except EngineError as exc:
        log.warning("size of %s over its parent unknown: %s", info.id, exc)
        return None
    return own_bytes(info, parent)
