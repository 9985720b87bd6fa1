"""Two Snapyard instances on one engine leave each other's workers alone.

Regression (issue 11, item 1): the orphan sweep matched only
``snapyard.managed=true``, so with a short ``orphan_grace_s`` instance B
removed A's running worker (and A removed B's): both jobs failed with "its
container disappeared". Each instance here has its own data dir, hence its own
generated instance ID, and both share one snapshot repository.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from session_labels import TEST_LABELS

from actors.app import Snapyard
from actors.engine.base import EngineError
from actors.engine.docker import DockerEngine
from actors.labels import LABEL_INSTANCE, LABEL_REPOSITORY
from actors.model import JobState, validate_spec
from actors.settings import load_settings

pytestmark = pytest.mark.docker

JOB_S = 90.0
# Longer than two sweep intervals (1 s): each instance sweeps while the other's job runs.
LONG_JOB = ["sh", "-c", "sleep 4; echo long job done"]


@pytest.fixture
def pair(
    docker_engine: DockerEngine, base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Snapyard, Snapyard]]:
    repository = f"snapyard-test-pair-{uuid.uuid4().hex[:8]}"
    configured = load_settings(env=os.environ)
    apps: list[Snapyard] = []
    try:
        for name in ("a", "b"):
            data_dir: Path = tmp_path_factory.mktemp(f"instance-{name}")
            settings = configured.replace(
                worker={"image": base_image, "setup_seconds": 0.0},
                snapshots={"repository": repository},
                supervisor={
                    "data_dir": str(data_dir),
                    "tick_interval_s": 0.05,
                    "orphan_grace_s": 0.2,
                    "orphan_sweep_interval_s": 1.0,
                },
                sentry={"dsn": ""},
            )
            apps.append(
                Snapyard(settings, engine=docker_engine, container_labels=TEST_LABELS).start()
            )
        yield apps[0], apps[1]
    finally:
        for app in apps:
            app.stop(timeout_s=30.0)
        for _ in range(5):  # children before parents: one generation per pass
            for image in docker_engine.list_images({LABEL_REPOSITORY: repository}):
                with contextlib.suppress(EngineError):
                    docker_engine.remove_image(image.id, force=True)


def test_two_instances_with_a_tiny_orphan_grace_both_finish_their_long_jobs(
    pair: tuple[Snapyard, Snapyard], docker_engine: DockerEngine
) -> None:
    a, b = pair
    ids = {a.settings.supervisor.instance_id, b.settings.supervisor.instance_id}
    assert len(ids) == 2
    assert "" not in ids
    job_a = a.submit(validate_spec("pair", "item-a", command=LONG_JOB))
    job_b = b.submit(validate_spec("pair", "item-b", command=LONG_JOB))
    done_a = a.wait(job_a.id, JOB_S)
    done_b = b.wait(job_b.id, JOB_S)
    assert done_a.state is JobState.SUCCEEDED, done_a
    assert done_b.state is JobState.SUCCEEDED, done_b
    assert "long job done" in done_a.logs_tail
    # Each snapshot carries its own instance: neither adopts the other's on rebuild.
    for app, key in ((a, done_a.key), (b, done_b.key)):
        (snapshot,) = [s for s in app.snapshots() if s.key == key]
        image = docker_engine.inspect_image(snapshot.image_id)
        assert image.labels[LABEL_INSTANCE] == app.settings.supervisor.instance_id
        assert [s.key for s in app.snapshots()] == [key]
