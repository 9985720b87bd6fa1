"""The SnapshotManager's registry: ``key -> Snapshot``, indexed by image ID too.

The manager asks "does any entry hold this image?" once per image it adopts
in a rebuild, once per ``ImageDeleted`` and for every image a sweep lists.
Answered by scanning the entries, each question cost O(n): a rebuild of 10k
snapshots took 8 s and 100k were out of reach (issue 15, scenario 7). The
index answers in O(1) and is kept by the only two writes a mapping has.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, KeysView, MutableMapping, ValuesView

from actors.model import Snapshot, SnapshotKey
from actors.naming import bare_image_id

__all__ = ["SnapshotRegistry"]


class SnapshotRegistry(MutableMapping[SnapshotKey, Snapshot]):
    """A dict of entries (insertion order kept) plus bare image ID -> the keys holding it."""

    def __init__(self) -> None:
        self._entries: dict[SnapshotKey, Snapshot] = {}
        # Ordered like the entries' arrival; a dict of keys, since nothing stops
        # two keys from naming one image (a Register of the same ID twice).
        self._by_image: dict[str, dict[SnapshotKey, None]] = {}

    def __getitem__(self, key: SnapshotKey) -> Snapshot:
        return self._entries[key]

    def __setitem__(self, key: SnapshotKey, entry: Snapshot) -> None:
        previous = self._entries.get(key)
        if previous is not None:
            self._unindex(key, previous)
        self._entries[key] = entry
        self._by_image.setdefault(bare_image_id(entry.image_id), {})[key] = None

    def __delitem__(self, key: SnapshotKey) -> None:
        self._unindex(key, self._entries.pop(key))

    def __iter__(self) -> Iterator[SnapshotKey]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    # The mixins would go through __getitem__ per entry; the dict's own views are faster.
    def keys(self) -> KeysView[SnapshotKey]:
        return self._entries.keys()

    def values(self) -> ValuesView[Snapshot]:
        return self._entries.values()

    def items(self) -> ItemsView[SnapshotKey, Snapshot]:
        return self._entries.items()

    def clear(self) -> None:
        # MutableMapping.clear pops the first key until empty: O(n^2) on a dict.
        self._entries.clear()
        self._by_image.clear()

    def holds(self, image_id: str) -> bool:
        """Whether any entry names this image (either ID spelling)."""
        return bare_image_id(image_id) in self._by_image

    def keys_of(self, image_id: str) -> list[SnapshotKey]:
        """The keys whose entry names this image, oldest arrival first."""
        return list(self._by_image.get(bare_image_id(image_id), ()))

    def _unindex(self, key: SnapshotKey, entry: Snapshot) -> None:
        bare = bare_image_id(entry.image_id)
        keys = self._by_image.get(bare)
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self._by_image[bare]
