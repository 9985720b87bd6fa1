"""The image half of the MemoryEngine: tags, inspect, list, build and Docker's
``ImageDelete`` with its conflict rules, step for step (image_delete.go)."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping

from actors.clock import Clock
from actors.engine._memory_build import build
from actors.engine._memory_events import EventLog
from actors.engine._memory_records import (
    COMMIT_OVERHEAD_BYTES,
    HEX,
    MIN_PREFIX,
    MemoryContainer,
    MemoryImage,
    has_labels,
    normalize_tag,
    short_id,
)
from actors.engine.base import Conflict, EngineError, ImageInfo, ImageMissing

__all__ = ["ImageStore", "sha"]


def sha(text: str) -> str:
    """A made-up content digest: ``sha256:`` and the hex of ``text``."""
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


class _DeleteConflict(Conflict):
    """Docker's ``imageDeleteConflict``: ``hard`` ones cannot be forced."""

    def __init__(self, image_id: str, message: str, *, hard: bool, used: bool) -> None:
        self.hard = hard
        self.used = used
        how = "cannot be forced" if hard else "must be forced"
        super().__init__(f"conflict: unable to delete {short_id(image_id)} ({how}) - {message}")


# Docker's conflict classes (image_delete.go): hard ones are never forced.
_CHILD, _RUNNING, _REFERENCE, _STOPPED = 1, 2, 4, 8
_HARD = _CHILD | _RUNNING
_SOFT = _REFERENCE | _STOPPED


class ImageStore(EventLog):
    """Images and tags; the containers table is the engine's, read here for conflicts."""

    _containers: dict[str, MemoryContainer]

    def __init__(self, clock: Clock | None = None) -> None:
        super().__init__(clock)
        self._images: dict[str, MemoryImage] = {}
        self._tags: dict[str, str] = {}

    # Reading state without recording a call (for test kits and benchmarks)

    def images(self) -> list[MemoryImage]:
        """Every image record, oldest first, hidden parents included (live, not copies)."""
        with self._lock:
            return list(self._images.values())

    def image(self, ref: str) -> MemoryImage:
        """The live image record for an ID, tag or unique prefix; ImageMissing if none."""
        with self._lock:
            return self._find_image(ref)

    def has_children(self, image_id: str) -> bool:
        """True while another image stands on this one (Docker hides it from ``images``)."""
        with self._lock:
            return bool(self._children(image_id))

    # Engine: images

    def flatten_image(self, image: str, base: str, repository: str, tag: str) -> str:
        """Docker's save, squash and load: the same files and config, ``base``'s depth + 1.

        As on Docker the result has no parent (a loaded image), its ID depends
        only on what it holds (flattening twice gives one image), and the
        image flattened is left as it was.
        """
        self._enter("flatten_image", image, base, repository, tag)
        with self._lock:
            source = self._find_image(image)
            under = self._find_image(base)
            if source.id == under.id or not self._built_on(source, under.id):
                raise EngineError(
                    f"cannot flatten {image} onto {base}: the image is not built on the given "
                    "base, or has no layer above it"
                )
            flat_id = "sha256:" + hashlib.sha256(f"{source.id} on {under.id}".encode()).hexdigest()
            flat = self._images.get(flat_id)
            if flat is None:
                written = sum(
                    len(content.encode())
                    for path, content in source.files.items()
                    if under.files.get(path) != content
                )
                flat = MemoryImage(
                    id=flat_id,
                    tags=[],
                    labels=dict(source.labels),
                    layers=under.layers + 1,
                    size_bytes=under.size_bytes + COMMIT_OVERHEAD_BYTES + written,
                    created_at=source.created_at,
                    env=source.env,
                    cmd=source.cmd,
                    entrypoint=source.entrypoint,
                    working_dir=source.working_dir,
                    files=dict(source.files),
                    container_env=source.container_env,
                    flattened_onto=under.id,
                )
                self._images[flat.id] = flat
            self._set_tag(flat, normalize_tag(f"{repository}:{tag}"))
            return flat.id

    def _built_on(self, image: MemoryImage, base_id: str) -> bool:
        node: MemoryImage | None = image
        while node is not None:
            if base_id in (node.id, node.flattened_onto):
                return True
            node = self._images.get(node.parent) if node.parent else None
        # A pulled image has no parent: Docker (and squash) compare the layers.
        below = self._layers_of(self._images[base_id])
        return self._layers_of(image)[: len(below)] == below

    def _layers_of(self, image: MemoryImage) -> tuple[str, ...]:
        """The image's layer digests: its parent's (or flatten base's) and its own.

        Made up from IDs, so the same image has the same layers on every
        engine that has it, which is what lets a push skip what a registry has.
        """
        if image.layer_ids:
            return image.layer_ids
        under = self._images.get(image.parent or image.flattened_onto or "")
        if under is not None:
            return (*self._layers_of(under), sha(f"layer of {image.id}"))
        return tuple(sha(f"layer {i} of {image.id}") for i in range(image.layers))

    def inspect_image(self, image: str) -> ImageInfo:
        self._enter("inspect_image", image)
        with self._lock:
            return self._find_image(image).info()

    def list_images(self, labels: Mapping[str, str]) -> list[ImageInfo]:
        """Like ``docker images`` (all=False): untagged parents of other images are hidden."""
        self._enter("list_images", dict(labels))
        with self._lock:
            shown = [
                image
                for image in self._images.values()
                if has_labels(image.labels, labels) and (image.tags or not self._children(image.id))
            ]
            return [image.info() for image in reversed(shown)]

    def remove_image(self, image: str, force: bool = False) -> None:
        self._enter("remove_image", image, force)
        with self._lock:
            self._remove_image(image, force)

    def tag_image(self, image: str, repository: str, tag: str) -> None:
        self._enter("tag_image", image, repository, tag)
        with self._lock:
            self._set_tag(self._find_image(image), normalize_tag(f"{repository}:{tag}"))

    def build_image(self, context: bytes, tag: str, labels: Mapping[str, str]) -> str:
        """A Dockerfile interpreter good enough for layers, config, labels and COPY'd text."""
        self._enter("build_image", len(context), tag, dict(labels))
        with self._lock:
            image = build(
                context,
                labels,
                image_id=self._new_image_id(),
                created_at=self.clock.now(),
                find_image=self._find_image,
            )
            self._images[image.id] = image
            self._set_tag(image, normalize_tag(tag))
            return image.id

    # Internals (the caller holds the lock)

    def _new_image_id(self) -> str:
        return "sha256:" + hashlib.sha256(secrets.token_bytes(32)).hexdigest()

    def _find_image(self, ref: str) -> MemoryImage:
        """Docker's ``GetImage``: a full ID, then a tag, then a unique ID prefix."""
        bare = ref.removeprefix("sha256:")
        if HEX.match(bare) and len(bare) == 64:
            image = self._images.get("sha256:" + bare)
            if image is None:
                raise ImageMissing(ref)
            return image
        image_id = self._tags.get(normalize_tag(ref))
        if image_id is not None:
            return self._images[image_id]
        if HEX.match(bare) and len(bare) >= MIN_PREFIX:
            matches = [i for i in self._images.values() if i.id[7:].startswith(bare)]
            if len(matches) == 1:
                return matches[0]
        raise ImageMissing(ref)

    def _children(self, image_id: str) -> list[MemoryImage]:
        return [image for image in self._images.values() if image.parent == image_id]

    def _set_tag(self, image: MemoryImage, tag: str) -> None:
        # Docker moves a tag silently: the image that loses it gets no "untag" event.
        previous = self._tags.get(tag)
        if previous is not None and previous != image.id and previous in self._images:
            self._images[previous].tags.remove(tag)
        self._tags[tag] = image.id
        if tag not in image.tags:
            image.tags.append(tag)

    def _untag(self, image: MemoryImage, tag: str) -> None:
        image.tags.remove(tag)
        del self._tags[tag]
        self._emit("image_untagged", image.id, labels=image.labels)

    def _remove_image(self, ref: str, force: bool) -> None:
        """Docker's ``ImageDelete`` with prune on, step for step."""
        image = self._find_image(ref)
        bare = ref.removeprefix("sha256:")
        by_id = image.id.startswith(ref) or image.id[7:].startswith(bare)
        quiet = False
        if not by_id:
            tag = normalize_tag(ref)
            if not force and len(image.tags) == 1:
                user = next((c for c in self._containers.values() if c.image_id == image.id), None)
                if user is not None:
                    raise Conflict(
                        f'conflict: unable to remove repository reference "{ref}" (must force)'
                        f" - container {short_id(user.id)} is using its referenced image "
                        f"{short_id(image.id)}",
                        status_code=409,
                    )
            self._untag(image, tag)
            if image.tags:
                return
            quiet = True
        elif len(image.tags) == 1:
            mask = _HARD if force else _HARD | _STOPPED
            conflict = self._delete_conflict(image, mask)
            if conflict is not None:
                raise conflict
            self._untag(image, image.tags[0])
        self._delete(image, force=force, quiet=quiet)

    def _delete(self, image: MemoryImage, force: bool, quiet: bool) -> None:
        conflict = self._delete_conflict(image, _HARD if force else _HARD | _SOFT)
        if conflict is not None:
            dangling = not image.tags and not self._children(image.id)
            if quiet and (not dangling or conflict.used):
                return
            raise conflict
        for tag in list(image.tags):
            self._untag(image, tag)
        del self._images[image.id]
        self._emit("image_deleted", image.id)
        parent = self._images.get(image.parent) if image.parent else None
        if parent is not None:
            # Prune the parent only if nothing else holds it; never forced, never loud.
            self._delete(parent, force=False, quiet=True)

    def _delete_conflict(self, image: MemoryImage, mask: int) -> _DeleteConflict | None:
        if mask & _CHILD and self._children(image.id):
            return _DeleteConflict(
                image.id, "image has dependent child images", hard=True, used=False
            )
        users = [c for c in self._containers.values() if c.image_id == image.id]
        running = next((c for c in users if c.status == "running"), None)
        if mask & _RUNNING and running is not None:
            return _DeleteConflict(
                image.id,
                f"image is being used by running container {short_id(running.id)}",
                hard=True,
                used=True,
            )
        if mask & _REFERENCE and image.tags:
            return _DeleteConflict(
                image.id, "image is referenced in multiple repositories", hard=False, used=False
            )
        stopped = next((c for c in users if c.status != "running"), None)
        if mask & _STOPPED and stopped is not None:
            return _DeleteConflict(
                image.id,
                f"image is being used by stopped container {short_id(stopped.id)}",
                hard=False,
                used=True,
            )
        return None
