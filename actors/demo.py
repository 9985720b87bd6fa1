"""``snapyard demo``: the whole snapshot story on the real engine, in a few lines.

It runs a supervisor in this process (temp data dir, its own snapshot
repository, a unique project) and checks every step rather than just
printing it: the demo is also a test (``tests/docker/test_demo.py``), so a
story that stops being true fails ``make test``. Everything it creates
carries the demo's labels and is removed at the end, whatever happened.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from actors.app import Snapyard
from actors.engine.base import Engine, EngineError
from actors.labels import LABEL_DEMO
from actors.model import Job, JobSpec, JobState, SnapshotKey
from actors.settings import Settings
from actors.worker_image import ensure_base_image

__all__ = ["DEMO_LABELS", "DEMO_PROJECT", "DEMO_REPOSITORY", "Story", "run_demo"]

DEMO_PROJECT = "snapyard-demo"
# Test-like: never the operator's repository, so cleanup cannot touch real snapshots.
DEMO_REPOSITORY = "snapyard-demo-snapshot"
# On every worker container, and so on every image committed from one.
DEMO_LABELS = {LABEL_DEMO: "1"}
SETUP_SECONDS = 2.0
JOB_TIMEOUT_S = 120.0

_SETUP_PAID = "setup starting"
_SETUP_SKIPPED = "setup skipped"


@dataclass
class Story:
    out: TextIO
    failures: list[str] = field(default_factory=list)

    def check(self, step: str, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(f"{step}: {what}")
            print(f"   !! {what}", file=self.out)
        return ok


def _short(image_id: str | None) -> str:
    return image_id.removeprefix("sha256:")[:12] if image_id else "-"


def demo_settings(base: Settings, data_dir: str) -> Settings:
    """The operator's engine and base image, but the demo's own data and snapshots."""
    return base.replace(
        supervisor={"data_dir": data_dir, "max_workers": 2, "spawners": 2},
        snapshots={"enabled": True, "repository": DEMO_REPOSITORY},
        worker={"setup_seconds": SETUP_SECONDS},
        projects={},
    )


def _run_job(app: Snapyard, spec: JobSpec) -> tuple[Job, float]:
    started = time.monotonic()
    job = app.submit(spec)
    job = app.wait(job.id, JOB_TIMEOUT_S)
    return job, time.monotonic() - started


def _snapshot_id(app: Snapyard, key: SnapshotKey) -> str | None:
    return next((s.image_id for s in app.snapshots() if s.key == key), None)


def _check_job(
    story: Story, step: str, job: Job, from_snapshot: bool, log_line: str, commit: bool = True
) -> None:
    story.check(
        step,
        job.state is JobState.SUCCEEDED,
        f"state {job.state}, expected succeeded ({job.error or 'no error'})",
    )
    story.check(
        step,
        job.from_snapshot is from_snapshot,
        f"from_snapshot is {job.from_snapshot}, expected {from_snapshot}",
    )
    story.check(step, log_line in job.logs_tail, f"the worker's output lacks {log_line!r}")
    if commit:
        story.check(step, job.snapshot_committed, "no snapshot was committed after a clean run")


def _cleanup(engine: Engine) -> int:
    """Remove what the demo made: its containers, then its snapshot images."""
    removed = 0
    for container in engine.list_containers(DEMO_LABELS):
        with contextlib.suppress(EngineError):
            engine.remove_container(container.id, force=True)
    for image in engine.list_images(DEMO_LABELS):
        with contextlib.suppress(EngineError):
            engine.remove_image(image.id, force=True)
            removed += 1
    return removed


def run_demo(
    settings: Settings,
    engine: Engine,
    out: TextIO,
    app_factory: Callable[[Settings, Engine], Snapyard] | None = None,
) -> int:
    """Tell the story; 0 only if every step behaved."""
    story = Story(out)
    data_dir = tempfile.mkdtemp(prefix="snapyard-demo-")
    settings = demo_settings(settings, data_dir)
    key = SnapshotKey(DEMO_PROJECT, f"item-{uuid.uuid4().hex[:8]}")
    spec = JobSpec(key.project, key.work_item, agent_type="demo")
    factory = app_factory or (lambda s, e: Snapyard(s, engine=e, container_labels=DEMO_LABELS))
    app: Snapyard | None = None
    removed = 0
    try:
        t0 = time.monotonic()
        base_id, _built = ensure_base_image(engine, settings.worker.image)
        print(
            f"Snapyard demo on {engine.describe()}: base image {settings.worker.image} "
            f"({_short(base_id)}, ready in {time.monotonic() - t0:.1f}s), "
            f"worker setup {SETUP_SECONDS:.0f}s",
            file=out,
        )
        app = factory(settings, engine)
        app.start()

        job1, t1 = _run_job(app, spec)
        print(
            f"1. first run of {key}: {job1.state} in {t1:.2f}s on the base image, "
            f"setup paid; snapshot {_short(_snapshot_id(app, key))} committed",
            file=out,
        )
        _check_job(story, "first run", job1, from_snapshot=False, log_line=_SETUP_PAID)

        job2, t2 = _run_job(app, spec)
        print(
            f"2. second run: {job2.state} in {t2:.2f}s from snapshot "
            f"{_short(job2.image_id)}, setup skipped ({t1 / max(t2, 0.001):.1f}x faster); "
            f"snapshot {_short(_snapshot_id(app, key))} committed",
            file=out,
        )
        _check_job(story, "second run", job2, from_snapshot=True, log_line=_SETUP_SKIPPED)
        story.check("second run", t2 < t1, f"not faster: {t2:.2f}s vs {t1:.2f}s")

        snaps = [s for s in app.snapshots() if s.key == key]
        if story.check("delete", len(snaps) == 1, f"{len(snaps)} snapshots for {key}, expected 1"):
            stale = snaps[0].image_id
            engine.remove_image(stale, force=True)
            print(
                f"3. snapshot image {_short(stale)} deleted behind the supervisor's back "
                "(docker rmi through the engine)",
                file=out,
            )
        fallbacks = app.metrics.value("snapyard_stale_snapshot_fallbacks_total")
        job3, t3 = _run_job(app, spec)
        hit_404 = app.metrics.value("snapyard_stale_snapshot_fallbacks_total") > fallbacks
        how = (
            "hit Docker's 404, invalidated the entry, retried on the base image"
            if hit_404
            else "the watcher saw the delete and invalidated the entry first"
        )
        print(
            f"4. next run: {job3.state} in {t3:.2f}s, recovered on the base image "
            f"with no user action ({how})",
            file=out,
        )
        _check_job(story, "recovery run", job3, from_snapshot=False, log_line=_SETUP_PAID)

        job4, t4 = _run_job(app, spec)
        print(
            f"5. run after it: {job4.state} in {t4:.2f}s from a fresh snapshot "
            f"{_short(job4.image_id)}, setup skipped",
            file=out,
        )
        _check_job(story, "fresh snapshot run", job4, from_snapshot=True, log_line=_SETUP_SKIPPED)
        story.check(
            "fresh snapshot run",
            job4.image_id != job2.image_id,
            "the run reused the deleted image's ID",
        )
    except Exception as exc:
        story.failures.append(f"{type(exc).__name__}: {exc}")
        print(f"   !! {type(exc).__name__}: {exc}", file=out)
    finally:
        if app is not None:
            app.stop(timeout_s=30.0)
        try:
            removed = _cleanup(engine)
        except EngineError as exc:
            story.failures.append(f"cleanup: {exc}")
        shutil.rmtree(data_dir, ignore_errors=True)
    if story.failures:
        print(f"demo FAILED: {'; '.join(story.failures)}", file=out)
        return 1
    print(
        f"demo ok: every step behaved (cleaned up {removed} snapshot image(s) and the temp data dir)",
        file=out,
    )
    return 0
