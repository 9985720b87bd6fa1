"""The incident of seed PR 1054, end to end on the real engine.

A real SnapshotManager and a pool of real Spawners run the demo worker image:
job 1 pays the setup and commits a snapshot; the snapshot image is deleted
behind the supervisor's back (``docker rmi -f``); job 2 hits the 404,
invalidates it, runs on the base image and commits afresh; job 3 starts from
job 2's snapshot and skips the setup. No Supervisor: a small driver sends
Spawn, waits on the container, then sends Finish. Everything created here is
labelled with the test session's ID and removed afterwards.
"""

from __future__ import annotations

import contextlib
import statistics
import uuid
from collections.abc import Iterator
from typing import Any

import pykka
import pytest
from actor_kit import SpawnRig, kit_settings
from session_labels import SNAPSHOT_REPOSITORY, TEST_LABELS

from actors.clock import SystemClock
from actors.engine.base import Engine, EngineError
from actors.labels import LABEL_JOB_ID, LABEL_PROJECT, LABEL_ROLE
from actors.messages import SpawnFailed
from actors.model import JobSpec
from actors.settings import Settings

pytestmark = pytest.mark.docker

TEST_REPOSITORY = SNAPSHOT_REPOSITORY
SECRET = "it-secret-" + uuid.uuid4().hex
WAIT_S = 120.0


def start_yard(engine: Engine, settings: Settings) -> SpawnRig[Engine]:
    """A SnapshotManager, two Spawners and a collector on the real engine."""
    rig = SpawnRig(engine, SystemClock(), settings, reply_s=WAIT_S)
    return rig.start(2, prefix="it-spawner", labels=TEST_LABELS)


@pytest.fixture
def project(docker_engine: Engine) -> Iterator[str]:
    """A project name of this test's own; its containers and images are removed after."""
    name = f"it-{uuid.uuid4().hex[:10]}"
    yield name
    pykka.ActorRegistry.stop_all()
    for container in docker_engine.list_containers({LABEL_PROJECT: name}):
        with contextlib.suppress(EngineError):
            docker_engine.remove_container(container.id, force=True)
    # Newest first: a child goes before its parent.
    images = docker_engine.list_images({LABEL_PROJECT: name})
    for image in sorted(images, key=lambda i: i.created_at, reverse=True):
        with contextlib.suppress(EngineError):
            docker_engine.remove_image(image.id, force=True)


def yard_settings(base_tag: str, setup_seconds: float = 1.0) -> Settings:
    return kit_settings(
        base_tag,
        setup_seconds=setup_seconds,
        snapshots={"repository": TEST_REPOSITORY},
        retry={"attempts": 3, "backoff_initial_s": 0.05, "backoff_max_s": 0.2},
    )


def test_deleted_snapshot_recovers_on_the_base_image_and_the_next_job_reuses_a_fresh_one(
    docker_engine: Engine, base_image: str, project: str
) -> None:
    yard = start_yard(docker_engine, yard_settings(base_image))
    spec = JobSpec(project=project, work_item="wi-1", env={"API_TOKEN": SECRET})

    first = yard.drive("job-1", spec)
    assert first.started.from_snapshot is False
    assert first.finished.exit_code == 0, first.finished.logs_tail
    assert "setup starting" in first.finished.logs_tail
    stale = first.finished.snapshot_image_id
    assert stale is not None
    assert [s.image_id for s in yard.snapshots()] == [stale]

    # The operator's `docker rmi -f`; no Watcher runs, so the registry still
    # points at the deleted image: exactly the state of the incident.
    docker_engine.remove_image(stale, force=True)
    assert [s.image_id for s in yard.snapshots()] == [stale]

    second = yard.drive("job-2", spec)
    assert second.started.from_snapshot is False
    assert second.started.attempts == 2
    assert second.started.image_id == docker_engine.inspect_image(base_image).id
    assert second.finished.exit_code == 0, second.finished.logs_tail
    assert "setup starting" in second.finished.logs_tail
    fresh = second.finished.snapshot_image_id
    assert fresh is not None
    assert fresh != stale
    assert [s.image_id for s in yard.snapshots()] == [fresh]

    third = yard.drive("job-3", spec)
    assert third.started.from_snapshot is True
    assert third.started.image_id == fresh
    assert third.finished.exit_code == 0, third.finished.logs_tail
    assert "setup skipped" in third.finished.logs_tail
    assert third.finished.error is None

    # Every container was removed after its run.
    assert docker_engine.list_containers({LABEL_PROJECT: project}) == []

    # The cost of one recovery, warm: a stale start against a plain base start.
    base_starts, stale_starts = [], []
    for n in range(3):
        base_starts.append(yard.drive(f"job-base-{n}", spec, snapshots=False).start_s)
        current = yard.snapshots()[0].image_id
        docker_engine.remove_image(current, force=True)
        recovered = yard.drive(f"job-stale-{n}", spec)
        assert recovered.started.attempts == 2
        stale_starts.append(recovered.start_s)
    extra = statistics.median(stale_starts) - statistics.median(base_starts)

    print(
        f"\n[stale-snapshot] base start+run (setup {yard.settings.worker.setup_seconds:g}s): "
        f"{first.total_s:.2f}s (start {first.start_s:.3f}s)"
        f"\n[stale-snapshot] snapshot-hit start+run: {third.total_s:.2f}s "
        f"(start {third.start_s:.3f}s)"
        f"\n[stale-snapshot] stale recovery start+run: {second.total_s:.2f}s"
        f" (start {second.start_s:.3f}s); warm medians of 3: base start "
        f"{statistics.median(base_starts):.3f}s, stale-recovery start "
        f"{statistics.median(stale_starts):.3f}s, extra {extra * 1000:+.0f} ms"
    )


def test_missing_base_image_fails_clearly_without_a_retry(
    docker_engine: Engine, project: str
) -> None:
    missing = f"snapyard-test-missing-{uuid.uuid4().hex[:8]}:latest"
    counting = CountingEngine(docker_engine)
    yard = start_yard(counting, yard_settings(missing))  # type: ignore[arg-type]
    spec = JobSpec(project=project, work_item="wi-1")
    for snapshots in (False, True):
        counting.calls.clear()
        failed = yard.spawn(f"job-{snapshots}", spec, snapshots=snapshots)
        assert isinstance(failed, SpawnFailed)
        assert failed.retryable is False
        assert missing in failed.error
        assert "make image" in failed.error
        assert counting.calls.count("create_container") == 0
        assert counting.calls.count("inspect_image") == 1
    assert docker_engine.list_containers({LABEL_PROJECT: project}) == []


def test_committed_snapshot_config_holds_no_job_env_value(
    docker_engine: Engine, base_image: str, project: str
) -> None:
    yard = start_yard(docker_engine, yard_settings(base_image, setup_seconds=0.0))
    spec = JobSpec(project=project, work_item="wi-env", env={"API_TOKEN": SECRET})
    run = yard.drive("job-env", spec)
    image_id = run.finished.snapshot_image_id
    assert image_id is not None
    info = docker_engine.inspect_image(image_id)
    assert not [entry for entry in info.env if SECRET in entry]
    # Docker 20.10 also records the committed container's config (ContainerConfig):
    # the secret must not be there either, nor anywhere in `docker image inspect`.
    assert not [entry for entry in info.container_env if SECRET in entry]
    # Not even its name: the snapshot's env is the base image's and Snapyard's blanks.
    assert not [entry for entry in info.env if entry.startswith("API_TOKEN")]
    assert SECRET not in repr(dict(info.labels))
    assert info.labels[LABEL_ROLE] == "snapshot"
    assert info.labels[LABEL_PROJECT] == project
    assert info.labels.get(LABEL_JOB_ID, "") == ""
    assert info.labels["snapyard.test.session"] == TEST_LABELS["snapyard.test.session"]


class CountingEngine:
    """Delegates to a real engine and records which methods were called."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._engine, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return attr(*args, **kwargs)

        return call
