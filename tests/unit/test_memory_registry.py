"""MemoryRegistry: several MemoryEngines move images through one, as hosts through a registry."""

from __future__ import annotations

import pytest

from actors.engine.base import ContainerSpec, ImageConfig, ImageMissing, RegistryUnavailable
from actors.engine.memory import MemoryEngine, MemoryRegistry

REPO = "127.0.0.1:5000/snapyard/snapshots"


def child(engine: MemoryEngine, image: str, path: str, content: str, tag: str) -> str:
    container_id = engine.create_container(ContainerSpec(image=image))
    engine.write_file(container_id, path, content)
    return engine.commit_container(container_id, "snaps", tag, ImageConfig())


@pytest.fixture
def registry() -> MemoryRegistry:
    return MemoryRegistry("127.0.0.1:5000")


def test_an_image_moves_between_engines_with_its_id_files_and_config(
    registry: MemoryRegistry,
) -> None:
    here, there = MemoryEngine(registry=registry), MemoryEngine(registry=registry)
    base = here.add_worker_image()
    snapshot = child(here, base, "/workspace/f", "data", "one")
    reference = here.push_image(snapshot, REPO)
    assert there.pull_image(reference) == snapshot
    assert there.image_files(snapshot)["/workspace/f"] == "data"
    mine, theirs = here.inspect_image(snapshot), there.inspect_image(snapshot)
    assert (theirs.entrypoint, theirs.cmd, theirs.env) == (mine.entrypoint, mine.cmd, mine.env)
    assert theirs.layers == mine.layers
    assert theirs.parent_id == ""  # as on Docker: a pulled image has no parent


def test_only_layers_the_registry_lacks_are_uploaded(registry: MemoryRegistry) -> None:
    engine = MemoryEngine(registry=registry)
    base = engine.add_worker_image()
    first = child(engine, base, "/f", "1", "one")
    engine.push_image(first, REPO)
    assert len(registry.uploads) == engine.inspect_image(first).layers
    second = child(engine, first, "/f", "2", "two")
    engine.push_image(second, REPO)
    assert len(registry.uploads) == engine.inspect_image(second).layers
    # Pulled elsewhere and pushed back: nothing new travels.
    other = MemoryEngine(registry=registry)
    other.pull_image(engine.push_image(second, REPO))
    other.push_image(second, REPO)
    assert len(registry.uploads) == engine.inspect_image(second).layers


def test_a_delete_keeps_the_blobs_until_the_garbage_collection(registry: MemoryRegistry) -> None:
    engine = MemoryEngine(registry=registry)
    base = engine.add_worker_image()
    kept = engine.push_image(base, REPO)
    snapshot = child(engine, base, "/f", "1", "one")
    reference = engine.push_image(snapshot, REPO)
    stored = registry.blobs()
    registry.delete_manifest(reference)
    assert registry.blobs() == stored
    assert registry.manifests(REPO) == {kept.partition("@")[2]}
    freed = registry.garbage_collect()
    # Its config, its manifest and its own layer; the base's layers stay in use.
    assert snapshot in freed
    assert len(freed) == 3
    assert MemoryEngine(registry=registry).pull_image(kept) == base


def test_an_engine_reaches_only_its_own_registry_and_only_while_it_is_up(
    registry: MemoryRegistry,
) -> None:
    engine = MemoryEngine(registry=registry)
    base = engine.add_worker_image()
    with pytest.raises(RegistryUnavailable) as caught:
        engine.push_image(base, "127.0.0.1:5001/snapyard/snapshots")
    assert caught.value.registry == "127.0.0.1:5001"
    lone = MemoryEngine()  # given no registry: nothing listens anywhere
    with pytest.raises(RegistryUnavailable):
        lone.push_image(lone.add_worker_image(), REPO)
    reference = engine.push_image(base, REPO)
    registry.set_unavailable(True)
    with pytest.raises(RegistryUnavailable):
        MemoryEngine(registry=registry).pull_image(reference)
    with pytest.raises(RegistryUnavailable):
        registry.ping()
    registry.set_unavailable(False)
    with pytest.raises(ImageMissing):
        registry.delete_manifest(f"{REPO}@sha256:{'0' * 64}")


def test_push_and_pull_can_be_failed_on_purpose_like_any_engine_call(
    registry: MemoryRegistry,
) -> None:
    engine = MemoryEngine(registry=registry)
    base = engine.add_worker_image()
    engine.fail_next("push_image", error=RegistryUnavailable(registry.address, "injected"))
    with pytest.raises(RegistryUnavailable):
        engine.push_image(base, REPO)
    assert engine.calls_of("push_image") == [(base, REPO)]
    assert registry.uploads == []
