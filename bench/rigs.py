"""What every scenario stands on: settings, a Snapyard on the real engine, sweeps, progress.

Everything the bench creates on Docker carries ``BENCH_LABELS`` (plus a run
label per rig) and is removed at the end of its scenario; snapshots go to a
bench-only repository, the job store to a temporary data directory. Nothing
is pruned globally: other sessions share this engine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.app import Snapyard
from actors.engine.base import EngineError, EngineEvent
from actors.engine.docker import DockerEngine, DockerEventStream
from actors.model import Job, JobSpec, JobState
from actors.settings import Settings, load_settings
from actors.worker_image import content_tag, ensure_base_image

__all__ = [
    "BENCH_BASE_TAG",
    "BENCH_LABELS",
    "BENCH_REPOSITORY",
    "JOB_WAIT_S",
    "RUN_LABEL",
    "BenchError",
    "BlindfoldEngine",
    "DockerRig",
    "Progress",
    "base_settings",
    "bench_settings",
    "docker_engine",
    "docker_rig",
    "engine_socket",
    "engine_url",
    "ensure_bench_base",
    "remove_bench_base",
    "run_job",
    "sweep_docker",
    "to_finished",
    "to_running",
    "wait_all",
]

# Not ``snapyard.test=1``: a pytest session on the same engine sweeps every
# test-labelled object at its end, which deleted bench snapshots mid-run.
BENCH_LABELS = {"snapyard.bench": "1"}
RUN_LABEL = "snapyard.bench.run"
BENCH_REPOSITORY = "snapyard-bench-snapshot"
# The bench's own tag for the base image, in the demo repository (the only one
# Snapyard builds into) and named by content: other sessions on this engine
# untag and rebuild snapyard-worker:latest in their tests, mid-benchmark.
BENCH_BASE_TAG = content_tag("bench")
JOB_WAIT_S = 300.0
_SWEEP_PASSES = 6


class BenchError(RuntimeError):
    """A scenario could not measure what it set out to (a job failed, a precondition broke)."""


class Progress:
    """``label 37/200`` on stderr at most every ``every_s``, and at the end: long runs show life."""

    def __init__(self, label: str, total: int, every_s: float = 2.0) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.every_s = every_s
        self._last = time.monotonic()

    def __call__(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if self.done >= self.total or now - self._last >= self.every_s:
            self._last = now
            print(f"     {self.label} {self.done}/{self.total}", file=sys.stderr, flush=True)


def base_settings() -> Settings:
    """The operator's settings (config file, env) for the engine URL and worker image."""
    return load_settings(env=os.environ)


def engine_url() -> str:
    return base_settings().engine.url or "unix:///var/run/docker.sock"


def engine_socket() -> str:
    """dockerd's unix socket path, from the configured engine URL."""
    url = engine_url()
    if not url.startswith("unix://"):
        raise BenchError(f"the bench needs a unix-socket engine URL, not {url}")
    return url[len("unix://") :]


def bench_settings(data_dir: Path, **sections: dict[str, Any]) -> Settings:
    """Production defaults, except where a benchmark must not disturb anyone else.

    The orphan grace is a day: other sessions on this engine run managed
    containers too, and this supervisor must never sweep them.
    """
    base = base_settings()
    settings = base.replace(
        worker={"image": BENCH_BASE_TAG},
        snapshots={"repository": BENCH_REPOSITORY},
        supervisor={"data_dir": str(data_dir), "orphan_grace_s": 86400.0},
    )
    return settings.replace(**sections)


def docker_engine(url: str | None = None) -> DockerEngine:
    settings = base_settings()
    engine = DockerEngine(url or settings.engine.url, settings.engine.timeout_s)
    engine.ping()
    return engine


def ensure_bench_base(engine: DockerEngine) -> str:
    """The bench's base tag, built if missing; its image ID."""
    ensure_base_image(engine, BENCH_BASE_TAG)
    return engine.inspect_image(BENCH_BASE_TAG).id


def remove_bench_base() -> None:
    """Drop the bench's base tag (the image stays while snapyard-worker:latest names it)."""
    with contextlib.suppress(EngineError):
        docker_engine().remove_image(BENCH_BASE_TAG)


def sweep_docker(
    engine: DockerEngine, since: float, labels: dict[str, str] | None = None
) -> tuple[int, int]:
    """Remove bench containers, then bench images (children first) created since ``since``."""
    labels = labels or BENCH_LABELS
    containers = 0
    for container in engine.list_containers(labels):
        if container.created_at >= since:
            with contextlib.suppress(EngineError):
                engine.remove_container(container.id, force=True)
                containers += 1
    images = 0
    for _ in range(_SWEEP_PASSES):
        found = [i for i in engine.list_images(labels) if i.created_at >= since]
        if not found:
            break
        for image in sorted(found, key=lambda i: i.created_at, reverse=True):
            with contextlib.suppress(EngineError):
                engine.remove_image(image.id, force=True)
                images += 1
    return containers, images


class _FilteredEvents:
    """A DockerEventStream minus the deletions of images the bench hides."""

    def __init__(self, stream: DockerEventStream, hidden: set[str]) -> None:
        self._stream = stream
        self._hidden = hidden

    def __iter__(self) -> Iterator[EngineEvent]:
        for event in self._stream:
            if event.kind in ("image_deleted", "image_untagged") and event.id in self._hidden:
                continue
            yield event

    def close(self) -> None:
        self._stream.close()


class BlindfoldEngine(DockerEngine):
    """DockerEngine whose event stream skips the deletion of chosen images.

    The supervisor misses that ``docker rmi`` as it would while its Watcher
    was reconnecting, so its registry still names the image: the next job
    hits the 404 of the incident this project exists for.
    """

    def __init__(self, url: str, timeout_s: float = 60.0) -> None:
        super().__init__(url, timeout_s)
        self.hidden: set[str] = set()

    def events(self, since: float | None = None) -> _FilteredEvents:  # type: ignore[override]
        return _FilteredEvents(super().events(since), self.hidden)


@dataclass
class DockerRig:
    """A started Snapyard on the real engine, a temp data dir, and a sweep at the end."""

    app: Snapyard
    engine: DockerEngine
    project: str
    labels: dict[str, str]


@contextlib.contextmanager
def docker_rig(
    engine: DockerEngine, run: str | None = None, **sections: dict[str, Any]
) -> Iterator[DockerRig]:
    """A Snapyard whose containers and snapshots carry the bench labels and a run label."""
    since = time.time() - 1.0
    data_dir = Path(tempfile.mkdtemp(prefix="snapyard-bench-"))
    run = run or uuid.uuid4().hex[:10]
    labels = {**BENCH_LABELS, RUN_LABEL: run}
    app = Snapyard(bench_settings(data_dir, **sections), engine=engine, container_labels=labels)
    try:
        app.start()
        yield DockerRig(app, engine, f"bench-{run}", labels)
    finally:
        try:
            app.stop(drain=True, timeout_s=60.0)
        finally:
            sweep_docker(engine, since, labels)
            shutil.rmtree(data_dir, ignore_errors=True)


def run_job(app: Snapyard, spec: JobSpec) -> Job:
    """Submit, wait for the end; a job that did not succeed stops the scenario.

    First it waits for the SnapshotManager to drain its inbox: every Register
    runs a sweep (a list plus one inspect per snapshot image) that a Lookup
    queues behind, and a paired comparison must not charge that to one side.
    """
    app.snapshots()
    job = app.wait(app.submit(spec).id, JOB_WAIT_S)
    if job.state is not JobState.SUCCEEDED:
        raise BenchError(f"job {job.id} ({spec.key}) ended {job.state}: {job.error}")
    return job


def wait_all(app: Snapyard, ids: list[str], progress: Progress | None = None) -> list[Job]:
    """Every job's end, in order; any that did not succeed stops the scenario."""
    jobs = []
    for job_id in ids:
        job = app.wait(job_id, JOB_WAIT_S)
        if job.state is not JobState.SUCCEEDED:
            raise BenchError(f"job {job.id} ended {job.state}: {job.error}")
        jobs.append(job)
        if progress is not None:
            progress()
    return jobs


def to_finished(job: Job) -> float:
    assert job.finished_at is not None
    return job.finished_at - job.created_at


def to_running(job: Job) -> float:
    assert job.started_at is not None
    return job.started_at - job.created_at
