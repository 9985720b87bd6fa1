"""The base worker image: built when its inputs change, never twice, old one cleaned up."""

from __future__ import annotations

from pathlib import Path

import pytest

import actors
from actors.engine.base import ImageMissing
from actors.engine.memory import MemoryEngine
from actors.labels import LABEL_ROLE, LABEL_WORKER_DIGEST
from actors.worker_image import (
    WORKER_DIR,
    WorkerImageError,
    ensure_base_image,
    is_demo_image,
)

TAG = "snapyard-worker:test"


def _worker_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "worker"
    folder.mkdir()
    for item in WORKER_DIR.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    return folder


def test_the_worker_context_ships_inside_the_package() -> None:
    """An installed wheel has no repository around it: the context is package data."""
    assert {item.name for item in WORKER_DIR.iterdir()} >= {"Dockerfile", "entrypoint.sh"}
    assert Path(str(WORKER_DIR)).resolve().parent == Path(actors.__file__).resolve().parent


def test_an_unchanged_context_is_not_rebuilt(tmp_path: Path) -> None:
    engine = MemoryEngine()
    worker = _worker_copy(tmp_path)
    first, built = ensure_base_image(engine, TAG, worker_dir=worker)
    assert built
    again, built_again = ensure_base_image(engine, TAG, worker_dir=worker)
    assert (again, built_again) == (first, False)
    assert len(engine.calls_of("build_image")) == 1


def test_a_rebuild_deletes_the_previous_base_when_nothing_stands_on_it(tmp_path: Path) -> None:
    """Seen after a CI run: the old base stayed behind, dangling, after every change."""
    engine = MemoryEngine()
    worker = _worker_copy(tmp_path)
    old, _ = ensure_base_image(engine, TAG, worker_dir=worker)
    entrypoint = worker / "entrypoint.sh"
    entrypoint.write_text(entrypoint.read_text() + "# changed\n")
    new, built = ensure_base_image(engine, TAG, worker_dir=worker)
    assert built
    assert new != old
    assert engine.inspect_image(TAG).id == new
    with pytest.raises(ImageMissing):
        engine.inspect_image(old)


USER_TAG = "acme/agent:1"


def test_a_users_image_is_used_as_it_is_never_built_over(tmp_path: Path) -> None:
    """Regression: `SNAPYARD_WORKER__IMAGE=ceo-custom:1 snapyard run` built the demo
    image under the user's tag, then deleted the user's original image."""
    engine = MemoryEngine()
    user_id = engine.add_image(USER_TAG, labels={"vendor": "acme"})
    assert ensure_base_image(engine, USER_TAG, worker_dir=_worker_copy(tmp_path)) == (
        user_id,
        False,
    )
    assert engine.inspect_image(USER_TAG).id == user_id
    assert engine.calls_of("build_image") == []
    assert engine.calls_of("remove_image") == []


def test_a_users_image_built_from_ours_is_still_never_rebuilt(tmp_path: Path) -> None:
    """An image FROM snapyard-worker inherits our labels, digest included: only
    the repository we build into makes an image ours to replace."""
    engine = MemoryEngine()
    user_id = engine.add_image(
        USER_TAG, labels={LABEL_ROLE: "base", LABEL_WORKER_DIGEST: "an-older-digest"}
    )
    assert ensure_base_image(engine, USER_TAG, worker_dir=_worker_copy(tmp_path))[0] == user_id
    assert engine.calls_of("build_image") == []


def test_force_refuses_to_replace_a_users_image(tmp_path: Path) -> None:
    engine = MemoryEngine()
    user_id = engine.add_image(USER_TAG)
    with pytest.raises(WorkerImageError, match=r"acme/agent:1 .* is not an image Snapyard built"):
        ensure_base_image(engine, USER_TAG, force=True, worker_dir=_worker_copy(tmp_path))
    # The same under our repository's name, when the image there is not ours.
    mine = engine.add_image("snapyard-worker:latest")
    with pytest.raises(WorkerImageError, match="never rebuilt or replaced"):
        ensure_base_image(engine, "snapyard-worker:latest", force=True, worker_dir=tmp_path)
    assert engine.inspect_image(USER_TAG).id == user_id
    assert engine.inspect_image("snapyard-worker:latest").id == mine
    assert engine.calls_of("build_image") == []


def test_a_missing_users_image_is_an_error_saying_how_to_get_it(tmp_path: Path) -> None:
    engine = MemoryEngine()
    with pytest.raises(WorkerImageError) as caught:
        ensure_base_image(engine, USER_TAG, worker_dir=_worker_copy(tmp_path))
    message = str(caught.value)
    assert "the worker image acme/agent:1 does not exist" in message
    assert "docker build -t acme/agent:1" in message
    assert "docker load" in message
    assert engine.calls_of("build_image") == []


@pytest.mark.parametrize(
    ("ref", "ours"),
    [
        ("snapyard-worker", True),
        ("snapyard-worker:latest", True),
        ("snapyard-worker:test", True),
        ("docker.io/library/snapyard-worker:x", True),
        ("snapyard-worker@sha256:" + "a" * 64, True),
        ("acme/snapyard-worker:latest", False),
        ("127.0.0.1:5000/snapyard-worker:latest", False),
        ("snapyard-workers:latest", False),
        ("ceo-custom:1", False),
    ],
)
def test_only_our_demo_repository_is_ours_to_build(ref: str, ours: bool) -> None:
    assert is_demo_image(ref) is ours
