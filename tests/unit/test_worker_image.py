"""The base worker image: built when its inputs change, never twice, old one cleaned up."""

from __future__ import annotations

from pathlib import Path

import pytest

import actors
from actors.engine.base import ImageMissing
from actors.engine.memory import MemoryEngine
from actors.worker_image import WORKER_DIR, ensure_base_image

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
