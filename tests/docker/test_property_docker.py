"""Issue 6 on the real engine: a snapshot deleted at any moment of a job's run.

A real Snapyard (Supervisor, Spawners, SnapshotManager, Watcher; SystemClock)
runs the demo worker image. A background thread force-removes the work item's
snapshot image after a delay hypothesis draws from zero to the length of a
whole spawn sequence (measured once first), while two jobs for that work item
run back to back. Every job must succeed, a sweep must leave no registry entry
pointing at a missing image, and no container or unowned snapshot image may be
left. Everything carries the test session's label and lives in a test snapshot
repository that is removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from session_labels import TEST_LABELS

from actors.app import Snapyard
from actors.engine.base import Conflict, EngineError, ImageMissing
from actors.engine.docker import DockerEngine
from actors.labels import LABEL_MANAGED, LABEL_REPOSITORY
from actors.model import JobState, SnapshotKey, validate_spec
from actors.naming import snapshot_image_name
from actors.settings import load_settings

pytestmark = pytest.mark.docker

REPOSITORY = f"snapyard-test-prop-{uuid.uuid4().hex[:8]}"
KEY = SnapshotKey("prop", "item-1")
SECRET = "s3cret-prop-" + uuid.uuid4().hex
JOB_S = 60.0
EXAMPLES = 24


class AppRig:
    def __init__(self, app: Snapyard, engine: DockerEngine) -> None:
        self.app = app
        self.engine = engine
        self.spawn_sequence_s = 0.0

    def run_job(self) -> str:
        spec = validate_spec(
            KEY.project,
            KEY.work_item,
            command=["sh", "-c", "echo job done"],
            env={"API_TOKEN": SECRET},
        )
        return self.app.submit(spec).id

    def current_snapshot(self) -> str | None:
        for snapshot in self.app.snapshots():
            if snapshot.key == KEY:
                return snapshot.image_id
        return None

    def delete_behind_back(self, image_id: str) -> None:
        """``docker rmi -f``: by ID, or by tag when a running container holds the ID."""
        try:
            self.engine.remove_image(image_id, force=True)
        except ImageMissing:
            pass
        except Conflict:
            repository, tag = snapshot_image_name(REPOSITORY, KEY.project, KEY.work_item)
            with contextlib.suppress(EngineError):
                self.engine.remove_image(f"{repository}:{tag}", force=True)

    def managed_containers(self) -> list[str]:
        return [c.id for c in self.engine.list_containers({**TEST_LABELS, LABEL_MANAGED: "true"})]


def _remove_repository_images(engine: DockerEngine) -> None:
    for _ in range(5):  # children before parents: one generation per pass
        images = engine.list_images({LABEL_REPOSITORY: REPOSITORY})
        if not images:
            return
        for image in images:
            with contextlib.suppress(EngineError):
                engine.remove_image(image.id, force=True)


@pytest.fixture
def rig(
    docker_engine: DockerEngine, base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AppRig]:
    data_dir: Path = tmp_path_factory.mktemp("property-docker")
    configured = load_settings(env=os.environ)
    app_settings = configured.replace(
        worker={"image": base_image, "setup_seconds": 0.0},
        snapshots={"repository": REPOSITORY, "max_layers": 16},
        retry={"attempts": 4, "backoff_initial_s": 0.05, "backoff_max_s": 0.5},
        supervisor={
            "data_dir": str(data_dir),
            "tick_interval_s": 0.05,
            "orphan_grace_s": 5.0,
            "max_workers": 2,
            "spawners": 2,
        },
        sentry={"dsn": ""},
    )
    app = Snapyard(app_settings, engine=docker_engine, container_labels=TEST_LABELS).start()
    rig = AppRig(app, docker_engine)
    try:
        # The length of one whole spawn sequence (lookup, create, start, run,
        # commit, register, remove) from a snapshot: the window the deletion is drawn in.
        first = rig.app.wait(rig.run_job(), JOB_S)
        assert first.state is JobState.SUCCEEDED, first
        began = time.monotonic()
        second = rig.app.wait(rig.run_job(), JOB_S)
        rig.spawn_sequence_s = time.monotonic() - began
        assert second.state is JobState.SUCCEEDED, second
        assert second.from_snapshot, second
        yield rig
    finally:
        app.stop(timeout_s=30.0)
        _remove_repository_images(docker_engine)


def test_a_snapshot_deleted_at_any_moment_never_fails_a_job(rig: AppRig) -> None:
    # The property runs inside one test: the shared actor clean-up stops
    # every actor after each test, and the app must outlive all examples.
    deleted_at_any_moment(rig)
    # Nothing left behind: every container removed, every snapshot image registered.
    assert rig.managed_containers() == []
    rig.app.prune_snapshots()
    registered = {s.image_id for s in rig.app.snapshots()}
    listed = rig.engine.list_images({LABEL_REPOSITORY: REPOSITORY})
    extra = [(i.id, dict(i.labels), i.created_at) for i in listed if i.id not in registered]
    if extra:  # pytest.fail keeps the whole list: an assert's repr would cut it
        pytest.fail(f"snapshot images outside the registry: {extra!r}; registered: {registered}")
    assert len(registered) <= 1
    for image in listed:
        assert not any(SECRET in entry for entry in image.env), image.id
        assert not any(SECRET in entry for entry in image.container_env), image.id


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,  # a drawn delay does not replay the same race on a real engine
)
@given(fraction=st.floats(min_value=0.0, max_value=1.0))
def deleted_at_any_moment(rig: AppRig, fraction: float) -> None:
    image_id = rig.current_snapshot()
    delay = fraction * rig.spawn_sequence_s
    errors: list[BaseException] = []

    def delete_later() -> None:
        try:
            time.sleep(delay)  # the moment of the deletion is what is being drawn
            if image_id is not None:
                rig.delete_behind_back(image_id)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    deleter = threading.Thread(target=delete_later, name="deleter", daemon=True)
    deleter.start()
    jobs = [rig.run_job(), rig.run_job()]
    finished = [rig.app.wait(job_id, JOB_S) for job_id in jobs]
    deleter.join(JOB_S)
    assert not deleter.is_alive()
    assert errors == []
    for job in finished:
        assert job.state is JobState.SUCCEEDED, (delay, job)
    # A sweep leaves no entry pointing at a missing image.
    rig.app.prune_snapshots()
    for snapshot in rig.app.snapshots():
        try:
            rig.engine.inspect_image(snapshot.image_id)
        except ImageMissing:
            pytest.fail(f"after a sweep the registry still points at a gone image: {snapshot}")
    assert rig.managed_containers() == []
