"""Push and pull through a registry: what Docker does, the MemoryEngine must do too.

Part of the engine contract suite (test_engine_contract.py holds the rig):
each test runs on the real daemon with a throwaway ``docker-registry`` and on
MemoryEngine with a MemoryRegistry. Both are read from the registry's side
too (the blobs it stores), so "only the new layer travels" is what the
registry saw, not what the engine claims.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import registry_kit
import test_engine_contract
from test_engine_contract import READ, Rig

from actors.engine.base import EngineError, ImageMissing, RegistryUnavailable
from actors.engine.memory import MemoryEngine, MemoryRegistry
from actors.localcluster.registry import LocalRegistry

# The fixtures this suite shares: the engine contract's rig, the session's registry.
rig = test_engine_contract.rig
local_registry = registry_kit.local_registry


@dataclass
class Registry:
    """A test's handle on the registry its engine reaches, whichever kind it is."""

    address: str
    blobs: Callable[[], set[str]]
    down: Callable[[], None]
    up: Callable[[], None]

    def repository(self, rig: Rig) -> str:
        return f"{self.address}/{rig.repo}"


@pytest.fixture
def registry(rig: Rig, request: pytest.FixtureRequest) -> Iterator[Registry]:
    if isinstance(rig.engine, MemoryEngine):
        memory = MemoryRegistry("127.0.0.1:5000")
        rig.engine.registry = memory
        yield Registry(
            memory.address,
            memory.blobs,
            lambda: memory.set_unavailable(True),
            lambda: memory.set_unavailable(False),
        )
        return
    local: LocalRegistry = request.getfixturevalue("local_registry")
    yield Registry(local.address, local.blobs, local.stop, local.start)
    local.start()  # a test that failed while it was down leaves it up for the next


def test_a_pull_by_digest_gives_back_the_same_image_id_and_its_files(
    rig: Rig, registry: Registry
) -> None:
    snapshot = rig.snapshot()
    reference = rig.engine.push_image(snapshot, registry.repository(rig))
    repository, _, digest = reference.partition("@")
    assert repository == registry.repository(rig)
    assert digest.startswith("sha256:")
    rig.engine.remove_image(snapshot, force=True)
    with pytest.raises(ImageMissing):
        rig.engine.inspect_image(snapshot)
    assert rig.engine.pull_image(reference) == snapshot
    pulled = rig.engine.inspect_image(reference)
    assert pulled.id == snapshot
    # A digest reference is not a tag (Docker's RepoDigests).
    assert pulled.tags == ()
    container_id, code = rig.run(READ, image=reference)
    assert code == 0
    assert "data" in rig.engine.container_logs(container_id).lines()


def test_a_push_leaves_the_images_tags_as_they_were(rig: Rig, registry: Registry) -> None:
    snapshot = rig.snapshot()
    before = rig.engine.inspect_image(snapshot).tags
    first = rig.engine.push_image(snapshot, registry.repository(rig))
    assert rig.engine.inspect_image(snapshot).tags == before
    # Pushed again, the same image is the same manifest.
    assert rig.engine.push_image(snapshot, registry.repository(rig)) == first


def test_only_the_new_layer_travels_when_the_parent_is_in_the_registry(
    rig: Rig, registry: Registry
) -> None:
    first = rig.snapshot("first")
    rig.engine.push_image(first, registry.repository(rig))
    second = rig.snapshot("second", image=first)
    before = registry.blobs()
    reference = rig.engine.push_image(second, registry.repository(rig))
    added = registry.blobs() - before
    manifest = reference.partition("@")[2]
    # The image's config (its digest is the image ID), its manifest and one layer.
    assert second in added
    assert manifest in added
    assert len(added - {second, manifest}) == 1, added


def test_pulling_an_image_the_engine_has_changes_nothing_but_its_reference(
    rig: Rig, registry: Registry
) -> None:
    snapshot = rig.snapshot()
    reference = rig.engine.push_image(snapshot, registry.repository(rig))
    assert rig.engine.pull_image(reference) == snapshot
    assert rig.engine.inspect_image(snapshot).tags == (f"{rig.repo}:one",)


def test_a_pulled_image_without_tags_survives_its_own_push(rig: Rig, registry: Registry) -> None:
    """Untagging the push's tag would delete an image that has no tag of its own."""
    snapshot = rig.snapshot()
    reference = rig.engine.push_image(snapshot, registry.repository(rig))
    rig.engine.remove_image(snapshot, force=True)
    rig.engine.pull_image(reference)
    assert rig.engine.push_image(snapshot, registry.repository(rig)) == reference
    assert rig.engine.inspect_image(snapshot).id == snapshot


def test_a_pull_of_a_digest_the_registry_lacks_is_image_missing(
    rig: Rig, registry: Registry
) -> None:
    missing = f"{registry.repository(rig)}@sha256:{'0' * 64}"
    with pytest.raises(ImageMissing) as caught:
        rig.engine.pull_image(missing)
    assert caught.value.image == missing
    assert str(caught.value) == (
        f"manifest for {missing} not found: manifest unknown: manifest unknown"
    )


def test_a_registry_that_is_down_is_registry_unavailable_and_named(
    rig: Rig, registry: Registry
) -> None:
    snapshot = rig.snapshot()
    reference = rig.engine.push_image(snapshot, registry.repository(rig))
    tags = rig.engine.inspect_image(snapshot).tags
    registry.down()
    for attempt in (
        lambda: rig.engine.push_image(snapshot, registry.repository(rig)),
        lambda: rig.engine.pull_image(reference),
    ):
        with pytest.raises(RegistryUnavailable) as caught:
            attempt()
        assert caught.value.registry == registry.address
        assert str(caught.value) == (
            f"the registry at {registry.address} does not answer "
            f'(Get "http://{registry.address}/v2/": dial tcp {registry.address}: '
            "connect: connection refused); start it, or check [cluster] registry"
        )
    # The failed push left no tag of the registry behind.
    assert rig.engine.inspect_image(snapshot).tags == tags
    registry.up()
    assert rig.engine.push_image(snapshot, registry.repository(rig)) == reference


def test_a_registry_nothing_listens_on_is_registry_unavailable(rig: Rig) -> None:
    snapshot = rig.snapshot()
    with pytest.raises(RegistryUnavailable) as caught:
        rig.engine.push_image(snapshot, "127.0.0.1:9/snapyard/nowhere")
    assert caught.value.registry == "127.0.0.1:9"


def test_a_push_of_a_missing_image_is_image_missing(rig: Rig, registry: Registry) -> None:
    with pytest.raises(ImageMissing):
        rig.engine.push_image("sha256:" + "0" * 64, registry.repository(rig))


@pytest.mark.parametrize(
    "repository", ["snapshots", "snapyard/snapshots", "127.0.0.1:5000/Not_Lowercase"]
)
def test_a_repository_that_names_no_registry_is_refused_before_any_call(
    rig: Rig, repository: str
) -> None:
    """Docker would read a bare name as Docker Hub: a snapshot must never go there."""
    with pytest.raises(EngineError) as caught:
        rig.engine.push_image(rig.base_id, repository)
    assert caught.value.status_code == 400
    assert repository in str(caught.value)


def test_a_pull_by_tag_is_refused(rig: Rig, registry: Registry) -> None:
    with pytest.raises(EngineError) as caught:
        rig.engine.pull_image(f"{registry.repository(rig)}:latest")
    assert caught.value.status_code == 400
    assert "not pinned by digest" in str(caught.value)


def test_a_pulled_snapshot_flattens_onto_the_base_like_a_committed_one(
    rig: Rig, registry: Registry
) -> None:
    """A pulled image has no parent; flatten goes by its layers, which it keeps."""
    first = rig.snapshot("first")
    second = rig.snapshot("second", image=first)
    reference = rig.engine.push_image(second, registry.repository(rig))
    rig.engine.remove_image(second, force=True)
    pulled = rig.engine.pull_image(reference)
    assert rig.engine.inspect_image(pulled).parent_id == ""
    flat = rig.engine.flatten_image(pulled, rig.base_id, rig.repo, "flat")
    assert rig.engine.inspect_image(flat).layers == rig.engine.inspect_image(rig.base_id).layers + 1
    container_id, code = rig.run(READ, image=flat)
    assert code == 0
    assert "data" in rig.engine.container_logs(container_id).lines()
