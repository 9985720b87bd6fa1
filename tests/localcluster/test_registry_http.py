"""The registry's HTTP API (ping, manifest delete) on a real registry, and its memory twin.

The same checks run against ``RegistryHttp`` on a throwaway ``docker-registry``
(with the real daemon pushing and pulling) and against a ``MemoryRegistry``
with MemoryEngines, so code tested on the twin meets the same errors.
"""

from __future__ import annotations

import io
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import registry_kit
from session_labels import TEST_LABELS

from actors.cluster.registry_http import ManifestStore, RegistryHttp
from actors.engine.base import Engine, EngineError, ImageMissing, RegistryUnavailable
from actors.engine.memory import MemoryEngine, MemoryRegistry
from actors.localcluster.registry import LocalRegistry

local_registry = registry_kit.local_registry


@dataclass
class Pair:
    """An engine, the registry it pushes to, and that registry's HTTP side."""

    engine: Engine
    store: ManifestStore
    address: str
    base: str
    local: LocalRegistry | None = None

    def repository(self) -> str:
        return f"{self.address}/snapyard-test/http-{uuid.uuid4().hex[:8]}"

    def unique_image(self) -> str:
        """A small image of its own on the base: one layer no other test pushes."""
        dockerfile = f"FROM {self.base}\nRUN echo {uuid.uuid4().hex} > /unique\n".encode()
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            entry = tarfile.TarInfo("Dockerfile")
            entry.size = len(dockerfile)
            tar.addfile(entry, io.BytesIO(dockerfile))
        tag = f"snapyard-test-http:{uuid.uuid4().hex[:8]}"
        return self.engine.build_image(buffer.getvalue(), tag, TEST_LABELS)


@pytest.fixture(params=["memory", pytest.param("docker", marks=pytest.mark.docker)])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    if request.param == "memory":
        registry = MemoryRegistry("127.0.0.1:5000")
        engine = MemoryEngine(registry=registry)
        yield Pair(engine, registry, registry.address, engine.add_worker_image())
        return
    docker: Engine = request.getfixturevalue("docker_engine")
    base: str = request.getfixturevalue("base_image")
    local: LocalRegistry = request.getfixturevalue("local_registry")
    yield Pair(docker, RegistryHttp(local.address), local.address, base, local)
    local.start()


def test_ping_answers_while_the_registry_is_up_and_names_it_when_down(pair: Pair) -> None:
    pair.store.ping()
    if pair.local is not None:
        pair.local.stop()
    else:
        assert isinstance(pair.store, MemoryRegistry)
        pair.store.set_unavailable(True)
    with pytest.raises(RegistryUnavailable) as caught:
        pair.store.ping()
    assert caught.value.registry == pair.address
    assert pair.address in str(caught.value)


def test_a_deleted_manifest_can_no_longer_be_pulled(pair: Pair) -> None:
    image = pair.unique_image()
    reference = pair.engine.push_image(image, pair.repository())
    pair.store.delete_manifest(reference)
    with pytest.raises(ImageMissing) as caught:
        pair.engine.pull_image(reference)
    assert caught.value.image == reference
    # Deleted twice: the registry no longer knows it.
    with pytest.raises(ImageMissing):
        pair.store.delete_manifest(reference)


def test_an_engine_that_pulled_a_digest_before_pulls_it_again_after_the_delete(
    pair: Pair,
) -> None:
    """Docker 20.10 caches pulled manifests: no registry manifest needed for an image it has.

    So a delete does not stop a host that pulled the snapshot already; it
    stops every host that has not. The registry must still answer.
    """
    image = pair.unique_image()
    reference = pair.engine.push_image(image, pair.repository())
    assert pair.engine.pull_image(reference) == image
    pair.store.delete_manifest(reference)
    assert pair.engine.pull_image(reference) == image


def test_a_reference_on_another_registry_is_refused_without_a_request() -> None:
    store = RegistryHttp("127.0.0.1:9")  # nothing listens there: a request would fail
    with pytest.raises(EngineError) as caught:
        store.delete_manifest(f"127.0.0.2:5000/x@sha256:{'0' * 64}")
    assert caught.value.status_code == 400
    assert "not on the configured registry 127.0.0.1:9" in str(caught.value)
    with pytest.raises(EngineError, match="not pinned by digest"):
        store.delete_manifest("127.0.0.1:9/x:latest")


def test_the_registrys_garbage_collection_frees_a_deleted_images_own_layer(
    docker_engine: Engine, base_image: str, local_registry: LocalRegistry
) -> None:
    pair = Pair(
        docker_engine, RegistryHttp(local_registry.address), local_registry.address, base_image
    )
    kept_image = pair.unique_image()
    kept = pair.engine.push_image(kept_image, pair.repository())
    image = pair.unique_image()
    before = local_registry.blobs()
    reference = pair.engine.push_image(image, pair.repository())
    added = local_registry.blobs() - before
    assert image in added  # the config blob: its digest is the image ID
    pair.store.delete_manifest(reference)
    assert added <= local_registry.blobs(), "a delete alone frees nothing"
    report = local_registry.garbage_collect()
    assert local_registry.answers(), "the registry serves again after the collection"
    left = local_registry.blobs()
    assert not added & left, f"still stored after the collection: {added & left}\n{report}"
    # What a manifest still uses (the base's layers among them) stays.
    assert {kept_image, kept.partition("@")[2]} <= left
