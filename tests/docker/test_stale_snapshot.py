"""The incident of seed PR 1054, end to end on the real engine.

A real SnapshotManager and a pool of real Spawners run the demo worker image:
job 1 pays the setup and commits a snapshot; the snapshot image is deleted
behind the supervisor's back (``docker rmi -f``); job 2 hits the 404,
invalidates it, runs on the base image and commits afresh; job 3 starts from
job 2's snapshot and skips the setup. No Supervisor: a small driver sends
Spawn, waits on the container, then sends Finish. Everything created here is
labelled ``snapyard.test=1`` and removed afterwards.
"""

from __future__ import annotations

import contextlib
import queue
import statistics
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pykka
import pytest

from actors.clock import SystemClock
from actors.engine.base import Engine, EngineError
from actors.flight import commit_decision
from actors.messages import Finish, Finished, ListSnapshots, Spawn, SpawnFailed, Started
from actors.model import JobSpec, Snapshot
from actors.settings import Settings
from actors.wiring import spawner_factory, start_root, start_snapshots

pytestmark = pytest.mark.docker

TEST_LABELS = {"snapyard.test": "1"}
TEST_REPOSITORY = "snapyard-test-snapshot"
SECRET = "it-secret-" + uuid.uuid4().hex
WAIT_S = 120.0


class Collector(pykka.ThreadingActor):
    """The Supervisor's stand-in: replies land on a queue the test blocks on."""

    def __init__(self, inbox: queue.Queue[Any]) -> None:
        super().__init__()
        self._inbox = inbox

    def on_receive(self, message: Any) -> None:
        self._inbox.put(message)


@dataclass
class Run:
    started: Started
    finished: Finished
    start_s: float  # Spawn sent -> Started received
    total_s: float  # Spawn sent -> Finished received


class Yard:
    """A SnapshotManager, two Spawners and a collector on the real engine."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.inbox: queue.Queue[Any] = queue.Queue()
        clock = SystemClock()
        # The application's wiring for these parts: the manager under a Root,
        # Spawners from the same factory, reporting to the collector.
        self.fatal: list[str] = []
        root = start_root(settings, clock, self.fatal.append)
        self.manager = start_snapshots(engine, settings, clock, root)
        self.collector = Collector.start(self.inbox)
        factory = spawner_factory(engine, self.manager, settings, clock, TEST_LABELS)
        self.spawners = [factory(f"it-spawner-{i}", self.collector) for i in (1, 2)]
        self._next = 0

    def reply(self) -> Any:
        return self.inbox.get(timeout=WAIT_S)

    def spawn(self, job_id: str, spec: JobSpec, snapshots: bool = True) -> Started | SpawnFailed:
        spawner = self.spawners[self._next % len(self.spawners)]
        self._next += 1
        spawner.tell(Spawn(job_id, spec, snapshots, self.collector))
        reply = self.reply()
        assert isinstance(reply, Started | SpawnFailed), reply
        return reply

    def drive(self, job_id: str, spec: JobSpec, snapshots: bool = True) -> Run:
        """Spawn, wait for the container to exit, Finish (commit on exit 0)."""
        began = time.monotonic()
        started = self.spawn(job_id, spec, snapshots)
        assert isinstance(started, Started), started
        start_s = time.monotonic() - began
        code = self.engine.wait_container(started.container_id, timeout_s=WAIT_S)
        spawner = next(r for r in self.spawners if r.proxy().name.get() == started.spawner)
        commit = commit_decision(code, None, snapshots)  # as the Supervisor decides it
        spawner.tell(Finish(job_id, spec, started.container_id, code, commit, self.collector))
        finished = self.reply()
        assert isinstance(finished, Finished), finished
        return Run(started, finished, start_s, time.monotonic() - began)

    def snapshots(self) -> list[Snapshot]:
        found = self.manager.ask(ListSnapshots(), timeout=WAIT_S)
        assert isinstance(found, list)
        return found


@pytest.fixture
def project(docker_engine: Engine) -> Iterator[str]:
    """A project name of this test's own; its containers and images are removed after."""
    name = f"it-{uuid.uuid4().hex[:10]}"
    yield name
    pykka.ActorRegistry.stop_all()
    for container in docker_engine.list_containers({"snapyard.project": name}):
        with contextlib.suppress(EngineError):
            docker_engine.remove_container(container.id, force=True)
    # Newest first: a child goes before its parent.
    images = docker_engine.list_images({"snapyard.project": name})
    for image in sorted(images, key=lambda i: i.created_at, reverse=True):
        with contextlib.suppress(EngineError):
            docker_engine.remove_image(image.id, force=True)


def yard_settings(base_tag: str, **worker: Any) -> Settings:
    return Settings().replace(
        worker={"image": base_tag, "setup_seconds": 1.0, **worker},
        snapshots={"repository": TEST_REPOSITORY},
        retry={"attempts": 3, "backoff_initial_s": 0.05, "backoff_max_s": 0.2},
    )


def test_deleted_snapshot_recovers_on_the_base_image_and_the_next_job_reuses_a_fresh_one(
    docker_engine: Engine, base_image: str, project: str
) -> None:
    yard = Yard(docker_engine, yard_settings(base_image))
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
    assert docker_engine.list_containers({"snapyard.project": project}) == []

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
    yard = Yard(counting, yard_settings(missing))  # type: ignore[arg-type]
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
    assert docker_engine.list_containers({"snapyard.project": project}) == []


def test_committed_snapshot_config_holds_no_job_env_value(
    docker_engine: Engine, base_image: str, project: str
) -> None:
    yard = Yard(docker_engine, yard_settings(base_image, setup_seconds=0.0))
    spec = JobSpec(project=project, work_item="wi-env", env={"API_TOKEN": SECRET})
    run = yard.drive("job-env", spec)
    image_id = run.finished.snapshot_image_id
    assert image_id is not None
    info = docker_engine.inspect_image(image_id)
    assert not [entry for entry in info.env if SECRET in entry]
    # Docker 20.10 also records the committed container's config (ContainerConfig):
    # the secret must not be there either, nor anywhere in `docker image inspect`.
    assert not [entry for entry in info.container_env if SECRET in entry]
    assert "API_TOKEN=" in info.env
    assert SECRET not in repr(dict(info.labels))
    assert info.labels["snapyard.role"] == "snapshot"
    assert info.labels["snapyard.project"] == project
    assert info.labels.get("snapyard.job.id", "") == ""
    assert info.labels["snapyard.test"] == "1"


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
