"""Image names derived from (project, work item): injective, valid, readable;
and the one way to compare image IDs.

The tag is only for people; snapshots are addressed by image ID. Still, two
work items must never share a name, whatever characters or lengths their IDs
have, or an operator's ``docker rmi`` of one would look like the other's.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["bare_image_id", "same_image", "snapshot_image_name"]

_SLUG_MAX = 40
_NOT_NAME_CHAR = re.compile(r"[^a-z0-9]+")


def _slug(text: str) -> str:
    slug = _NOT_NAME_CHAR.sub("-", text.lower()).strip("-")
    return slug[:_SLUG_MAX].strip("-") or "x"


def snapshot_image_name(repository: str, project: str, work_item: str) -> tuple[str, str]:
    """Return ``(repository, tag)`` for a snapshot of this key.

    The repository path carries a readable slug; the tag carries the full
    SHA-256 of the length-prefixed pair, which is what makes the mapping
    injective ("Proj_1" and "proj-1" share a slug, never a tag).
    """
    encoded = f"{len(project)}:{project}{len(work_item)}:{work_item}".encode(
        "utf-8", "surrogatepass"
    )
    digest = hashlib.sha256(encoded).hexdigest()
    return f"{repository}/{_slug(project)}.{_slug(work_item)}", f"k{digest}"


def same_image(a: str, b: str) -> bool:
    """Docker spells an ID with or without ``sha256:``; both name one image."""
    return bare_image_id(a) == bare_image_id(b)


def bare_image_id(image_id: str) -> str:
    """An image ID without its ``sha256:``: one spelling to compare and key by."""
    return image_id.removeprefix("sha256:")
