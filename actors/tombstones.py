"""Image IDs reported gone, so a late Register or a stale deletion of one is ignored.

Bounded (oldest forgotten first), because a long-lived supervisor sees many.
"""

from __future__ import annotations

from collections import OrderedDict

from actors.naming import bare_image_id

__all__ = ["Tombstones"]


class Tombstones:
    MAX = 4096

    def __init__(self) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, image_id: str) -> None:
        bare = bare_image_id(image_id)
        self._ids[bare] = None
        self._ids.move_to_end(bare)
        while len(self._ids) > self.MAX:
            self._ids.popitem(last=False)

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, str) and bare_image_id(image_id) in self._ids
