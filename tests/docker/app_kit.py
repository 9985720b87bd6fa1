"""A real Snapyard on the real engine, in its own snapshot repository, cleaned up after."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from session_labels import TEST_LABELS

from actors.app import Snapyard
from actors.engine.base import EngineError
from actors.engine.docker import DockerEngine
from actors.labels import LABEL_REPOSITORY
from actors.settings import load_settings


@contextlib.contextmanager
def real_app(
    engine: DockerEngine, base_image: str, data_dir: Path, name: str, **snapshots: Any
) -> Iterator[Snapyard]:
    """No setup cost, fast ticks; ``snapshots`` overrides the [snapshots] keys."""
    repository = f"snapyard-test-{name}-{uuid.uuid4().hex[:8]}"
    settings = load_settings(env=os.environ).replace(
        worker={"image": base_image, "setup_seconds": 0.0},
        snapshots={"repository": repository, **snapshots},
        supervisor={"data_dir": str(data_dir), "tick_interval_s": 0.05},
        sentry={"dsn": ""},
    )
    app = Snapyard(settings, engine=engine, container_labels=TEST_LABELS).start()
    try:
        yield app
    finally:
        app.stop(timeout_s=30.0)
        for _ in range(5):  # children before parents: one generation per pass
            for image in engine.list_images({LABEL_REPOSITORY: repository}):
                with contextlib.suppress(EngineError):
                    engine.remove_image(image.id, force=True)
