"""Which image a job starts from: a pure rule, shared by the Spawner and the SnapshotManager.

Snapshots are addressed by (project, work item), not by agent type, so a key
may hold a snapshot that grew from another agent type's image. Starting a job
from it would run the job in a foreign image (another toolchain, another
entrypoint), so a snapshot is used only when it grew from the very base the
job's agent type is configured with; otherwise the job starts from its base,
and its clean run's commit replaces the key's snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from actors.engine.base import ImageMissing
from actors.model import Snapshot
from actors.naming import bare_image_id, same_image

__all__ = [
    "BaseImageMissing",
    "BaseImages",
    "StaleSnapshot",
    "StartImage",
    "grew_from",
    "start_image",
]


@dataclass(frozen=True)
class StartImage:
    """What a container is created from, and the lineage it belongs to."""

    # A snapshot by ID (immutable); the base by its configured reference.
    image: str
    base_image_id: str
    snapshot: Snapshot | None

    @property
    def from_snapshot(self) -> bool:
        return self.snapshot is not None


def grew_from(snapshot: Snapshot, base_image_id: str | None) -> bool:
    """Whether ``snapshot`` descends from that base (None: any base will do)."""
    return base_image_id is None or same_image(snapshot.base_image_id, base_image_id)


def start_image(snapshot: Snapshot | None, base_image: str, base_image_id: str) -> StartImage:
    """The job's snapshot if it grew from the job's own base, else that base."""
    if snapshot is not None and grew_from(snapshot, base_image_id):
        return StartImage(snapshot.image_id, snapshot.base_image_id, snapshot)
    return StartImage(base_image, base_image_id, None)


class BaseImages:
    """Each configured base image (``worker.image``, every agent type's) and its current ID.

    A snapshot of any of them is valid; of none, it grew from a base that has
    since been rebuilt or unconfigured, and is stale. That is decided only once
    every configured image is known: until then a snapshot of an image not yet
    looked up could be taken for stale and deleted.
    """

    def __init__(self, configured: Iterable[str]) -> None:
        self._configured = tuple(configured)
        self._ids: dict[str, str] = {}
        # is_old runs per snapshot in every rebuild and sweep: both answers are
        # kept ready here (set() is rare) rather than recomputed each time.
        self._complete = not self._configured
        self._known: frozenset[str] = frozenset()

    def get(self, image: str) -> str | None:
        return self._ids.get(image)

    def set(self, image: str, image_id: str) -> bool:
        """Record ``image``'s ID; whether it changed."""
        previous = self._ids.get(image)
        self._ids[image] = image_id
        self._complete = all(image in self._ids for image in self._configured)
        self._known = frozenset(bare_image_id(known) for known in self._ids.values())
        return previous is None or not same_image(previous, image_id)

    def is_old(self, base_image_id: str) -> bool:
        return self._complete and bare_image_id(base_image_id) not in self._known


class StaleSnapshot(ImageMissing):
    """The snapshot image the registry named is gone: fall back to the base image."""

    def __init__(self, image: str, cause: ImageMissing) -> None:
        super().__init__(image, f"snapshot image {image} is gone: {cause}")


class BaseImageMissing(ImageMissing):
    """The configured base image does not exist: retrying cannot help, building can."""

    def __init__(self, image: str, engine: str) -> None:
        super().__init__(
            image,
            f"the worker base image {image!r} does not exist on {engine}; "
            "build it with `make image` (or `snapyard image build`), "
            "or point worker.image (or the agent type's image) at an existing image",
        )
