"""A registry in memory, shared by several MemoryEngines: push, pull, delete, collect.

It holds what the CNCF distribution registry holds (manifests per repository,
blobs by digest), so tests can check what travelled: a push uploads only the
layers the registry lacks, and a deleted manifest keeps its blobs until
``garbage_collect``. The errors are Docker's, word for word, so code tested on
it meets the same messages on a real daemon (tests/contract checks both).
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

from actors.clock import Clock
from actors.engine._memory_images import ImageStore, sha
from actors.engine._memory_records import MemoryImage, normalize_tag
from actors.engine.base import ImageMissing, RegistryUnavailable
from actors.engine.references import digest_reference, push_tag, registry_of, split_digest

__all__ = ["MemoryRegistry", "RegistryClient", "refused"]


def refused(address: str) -> RegistryUnavailable:
    """What Docker says when nothing listens at the registry's address."""
    return RegistryUnavailable(
        address, f'Get "http://{address}/v2/": dial tcp {address}: connect: connection refused'
    )


@dataclass(frozen=True)
class _Manifest:
    digest: str
    image: MemoryImage  # a private copy: the pusher's record may change later
    layers: tuple[str, ...]


class MemoryRegistry:
    """One registry at ``address``; give it to each MemoryEngine that should reach it."""

    def __init__(self, address: str = "127.0.0.1:5000") -> None:
        self.address = address
        self._lock = threading.Lock()
        self._manifests: dict[str, dict[str, _Manifest]] = {}
        self._blobs: set[str] = set()
        self._unavailable = False
        # Every layer upload in order: what travelled, for tests and benchmarks.
        self.uploads: list[str] = []

    def describe(self) -> str:
        return f"http://{self.address}"

    def set_unavailable(self, flag: bool) -> None:
        """Like a registry that went down: every push, pull, ping and delete is refused."""
        with self._lock:
            self._unavailable = flag

    def blobs(self) -> set[str]:
        """Every blob stored: layers, image configs (digest = image ID) and manifests."""
        with self._lock:
            return set(self._blobs)

    def manifests(self, repository: str) -> set[str]:
        with self._lock:
            return set(self._manifests.get(repository, {}))

    # The registry's HTTP API (actors/cluster/registry_http.py speaks it to a real one)

    def ping(self) -> None:
        with self._lock:
            self._check()

    def delete_manifest(self, reference: str) -> None:
        """``DELETE /v2/<name>/manifests/<digest>``: unlinked; blobs stay until collected.

        As RegistryHttp.delete_manifest (actors/cluster/registry_http.py), errors included.
        """
        repository, digest = split_digest(reference)
        with self._lock:
            self._check()
            if self._manifests.get(repository, {}).pop(digest, None) is None:
                raise ImageMissing(reference, f"manifest unknown: {reference}")

    def garbage_collect(self) -> set[str]:
        """``docker-registry garbage-collect``: free blobs no manifest references."""
        with self._lock:
            kept = {
                blob
                for manifests in self._manifests.values()
                for manifest in manifests.values()
                for blob in (manifest.digest, manifest.image.id, *manifest.layers)
            }
            freed = self._blobs - kept
            self._blobs = kept & self._blobs
            return freed

    # What an engine's push and pull do on the wire

    def _check(self) -> None:
        if self._unavailable:
            raise refused(self.address)

    def receive(self, repository: str, image: MemoryImage, layers: tuple[str, ...]) -> str:
        """Store a pushed image; return its manifest digest (the same for the same image)."""
        with self._lock:
            self._check()
            for layer in layers:
                if layer not in self._blobs:
                    self._blobs.add(layer)
                    self.uploads.append(layer)
            digest = sha(f"manifest of {image.id} on {','.join(layers)}")
            self._blobs |= {image.id, digest}
            self._manifests.setdefault(repository, {})[digest] = _Manifest(digest, image, layers)
            return digest

    def send(self, repository: str, digest: str) -> _Manifest:
        reference = digest_reference(repository, digest)
        with self._lock:
            self._check()
            manifest = self._manifests.get(repository, {}).get(digest)
            if manifest is None:
                raise ImageMissing(
                    reference,
                    f"manifest for {reference} not found: manifest unknown: manifest unknown",
                )
            return manifest


class RegistryClient(ImageStore):
    """The MemoryEngine's push and pull: Docker's, against a shared MemoryRegistry.

    Docker 20.10 keeps the manifests it pulled in its content store: pulled
    again by digest, an image it still has comes back without the registry's
    manifest (the registry must still answer), even after that manifest was
    deleted. Copied here; a deleted manifest of an image this engine no longer
    has is ImageMissing (Docker would fetch the blobs if not yet collected).
    """

    registry: MemoryRegistry | None = None

    def __init__(self, clock: Clock | None = None) -> None:
        super().__init__(clock)
        self._pulled: dict[str, str] = {}  # digest reference -> image ID

    def _reach(self, address: str) -> MemoryRegistry:
        if self.registry is None or self.registry.address != address:
            raise refused(address)  # nothing listens there
        return self.registry

    def push_image(self, image_id: str, repository: str) -> str:
        self._enter("push_image", image_id, repository)
        address = registry_of(repository)
        with self._lock:
            image = self._find_image(image_id)
            tag = normalize_tag(f"{repository}:{push_tag(image.id)}")
            # As DockerEngine: keep our tag when it is the only one (untagging would delete).
            keep = not {t for t in image.tags if "@" not in t} - {tag}
            self._set_tag(image, tag)
            pushed = copy.deepcopy(image)
            pushed.tags = []
            layers = self._layers_of(image)
        try:
            digest = self._reach(address).receive(repository, pushed, layers)
        finally:
            with self._lock:
                if not keep and tag in image.tags:
                    self._untag(image, tag)
        return digest_reference(repository, digest)

    def pull_image(self, reference: str) -> str:
        self._enter("pull_image", reference)
        repository, digest = split_digest(reference)
        registry = self._reach(registry_of(repository))
        registry.ping()
        with self._lock:
            cached = self._images.get(self._pulled.get(reference, ""))
            if cached is not None:
                self._set_tag(cached, reference)
                return cached.id
        manifest = registry.send(repository, digest)
        with self._lock:
            image = self._images.get(manifest.image.id)
            if image is None:
                # A pulled image has no parent on Docker; its layers come from the manifest.
                image = copy.deepcopy(manifest.image)
                image.parent = None
                image.flattened_onto = None
                image.layer_ids = manifest.layers
                self._images[image.id] = image
            self._set_tag(image, reference)
            self._pulled[reference] = image.id
            return image.id
