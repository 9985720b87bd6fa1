"""The scenarios: each is one function ``(quick) -> ScenarioResult``.

The Docker scenarios drive a real ``Snapyard`` (actors.app) on DockerEngine;
only the raw baselines call the engine directly, and only through DockerEngine.
Everything they create on Docker carries ``BENCH_LABELS`` and is removed at
the end of the scenario; snapshots go to a bench-only repository and the job
store to a temporary data directory.

Times come from the job store (``created_at``/``started_at``/``finished_at``,
stamped by the Supervisor's clock), not from polling, so they carry no poll
granularity; raw baselines use ``time.perf_counter``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.app import Snapyard
from actors.engine.base import ContainerSpec, EngineError, EngineEvent
from actors.engine.docker import DockerEngine, DockerEventStream
from actors.engine.memory import MemoryEngine
from actors.labels import ENV_JOB_ID, ENV_SETUP_SECONDS, ENV_SNAPSHOT_REUSE
from actors.model import Job, JobSpec, JobState, validate_spec
from actors.settings import Settings, load_settings
from actors.worker_image import content_tag, ensure_base_image
from bench.model import Figure, ScenarioResult, median, percentile, rss_bytes

__all__ = [
    "BENCH_BASE_TAG",
    "BENCH_LABELS",
    "BENCH_REPOSITORY",
    "SCENARIOS",
    "BenchError",
    "latency_100_queued",
    "memory_1000_jobs",
    "remove_bench_base",
    "snapshot_hit_vs_base",
    "stale_recovery",
    "sweep_docker",
]

# Not ``snapyard.test=1``: a pytest session on the same engine sweeps every
# test-labelled object at its end, which deleted bench snapshots mid-run.
BENCH_LABELS = {"snapyard.bench": "1"}
BENCH_REPOSITORY = "snapyard-bench-snapshot"
# The bench's own tag for the base image, in the demo repository (the only one
# Snapyard builds into) and named by content: other sessions on this engine
# untag and rebuild snapyard-worker:latest in their tests, mid-benchmark.
BENCH_BASE_TAG = content_tag("bench")
JOB_WAIT_S = 300.0
_MIB = 1024 * 1024
_SWEEP_PASSES = 6


class BenchError(RuntimeError):
    """A scenario could not measure what it set out to (a job failed, a precondition broke)."""


# --- rigs -------------------------------------------------------------------


def base_settings() -> Settings:
    """The operator's settings (config file, env) for the engine URL and worker image."""
    return load_settings(env=os.environ)


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


def docker_engine() -> DockerEngine:
    settings = base_settings()
    engine = DockerEngine(settings.engine.url, settings.engine.timeout_s)
    engine.ping()
    return engine


def remove_bench_base() -> None:
    """Drop the bench's base tag (the image stays while snapyard-worker:latest names it)."""
    with contextlib.suppress(EngineError):
        docker_engine().remove_image(BENCH_BASE_TAG)


def sweep_docker(engine: DockerEngine, since: float) -> tuple[int, int]:
    """Remove bench containers, then bench images (children first) created since ``since``."""
    containers = 0
    for container in engine.list_containers(BENCH_LABELS):
        if container.created_at >= since:
            with contextlib.suppress(EngineError):
                engine.remove_container(container.id, force=True)
                containers += 1
    images = 0
    for _ in range(_SWEEP_PASSES):
        found = [i for i in engine.list_images(BENCH_LABELS) if i.created_at >= since]
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


@contextlib.contextmanager
def docker_rig(engine: DockerEngine, **sections: dict[str, Any]) -> Iterator[DockerRig]:
    since = time.time() - 1.0
    data_dir = Path(tempfile.mkdtemp(prefix="snapyard-bench-"))
    app = Snapyard(
        bench_settings(data_dir, **sections), engine=engine, container_labels=BENCH_LABELS
    )
    try:
        app.start()
        yield DockerRig(app, engine, f"bench-{uuid.uuid4().hex[:10]}")
    finally:
        try:
            app.stop(drain=True, timeout_s=60.0)
        finally:
            sweep_docker(engine, since)
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


def to_finished(job: Job) -> float:
    assert job.finished_at is not None
    return job.finished_at - job.created_at


def to_running(job: Job) -> float:
    assert job.started_at is not None
    return job.started_at - job.created_at


# --- 1. snapshot hit vs base --------------------------------------------------


def snapshot_hit_vs_base(quick: bool) -> ScenarioResult:
    """Submit->finished of a base start (setup paid) vs a snapshot hit (setup skipped).

    Pairs are interleaved (base on a fresh work item, then a hit on it) so
    drift on a shared engine hits both sides alike; one unmeasured warm-up pair.
    """
    reps = 3 if quick else 8
    setup_s = 2.0
    engine = docker_engine()
    base: list[float] = []
    hit: list[float] = []
    misses = 0
    with docker_rig(engine, worker={"setup_seconds": setup_s}) as rig:
        for i in range(-1, reps):
            spec = validate_spec(rig.project, f"item-{i + 1}")
            first = run_job(rig.app, spec)
            second = run_job(rig.app, spec)
            if first.from_snapshot or not first.snapshot_committed:
                raise BenchError(f"base run {first.id} did not start from base and commit")
            if not second.from_snapshot:
                misses += 1
            if i >= 0:
                base.append(to_finished(first))
                hit.append(to_finished(second))
    base_s, hit_s = median(base), median(hit)
    notes = [f"{misses} of {reps + 1} hit runs did not start from a snapshot"] if misses else []
    return ScenarioResult(
        name="snapshot_hit_vs_base",
        title="Snapshot hit vs base start (real engine, setup 2 s)",
        figures=[
            Figure("base_median_s", base_s, "s", "lower", note="submit->finished, base image"),
            Figure("hit_median_s", hit_s, "s", "lower", note="submit->finished, snapshot hit"),
            Figure("saved_s", base_s - hit_s, "s", "higher", note="median base - median hit"),
            Figure("hit_over_base", hit_s / base_s, "ratio", "lower", True, "hit / base (medians)"),
        ],
        samples={"base_s": base, "hit_s": hit},
        params={"repetitions": reps, "setup_seconds": setup_s, "warmup_pairs": 1},
        notes=notes,
    )


# --- 2. stale snapshot recovery -------------------------------------------------


def stale_recovery(quick: bool) -> ScenarioResult:
    """A job whose registered snapshot was deleted behind the supervisor's back.

    Per repetition: an unmeasured run commits a snapshot for a work item, then
    ``docker rmi -f`` of that snapshot with the event hidden from the Watcher,
    then a job on that item (404, Invalidate, retry on the base image). The
    baseline, a plain base run on a fresh item, runs before the deletion or
    after the stale run, in turn.
    setup_seconds is 0 so the recovery is not drowned in the setup time.
    """
    reps = 3 if quick else 10
    settings = base_settings()
    engine = BlindfoldEngine(settings.engine.url, settings.engine.timeout_s)
    engine.ping()
    base: list[float] = []
    stale: list[float] = []
    base_run: list[float] = []
    stale_run: list[float] = []
    recovered = 0
    with docker_rig(engine, worker={"setup_seconds": 0.0}) as rig:
        for i in range(-1, reps):
            spec = validate_spec(rig.project, f"stale-{i + 1}")
            prime = run_job(rig.app, spec)
            entry = next((s for s in rig.app.snapshots() if s.key == spec.key), None)
            if entry is None:
                raise BenchError(f"base run {prime.id} registered no snapshot")
            fresh = validate_spec(rig.project, f"fresh-{i + 1}")
            # The baseline runs before the deletion or after the stale run, in
            # turn: never in between, since every Register sweeps the registry
            # (one list call) and would drop the vanished snapshot first.
            plain = run_job(rig.app, fresh) if i % 2 else None
            engine.hidden.add(entry.image_id)
            engine.remove_image(entry.image_id, force=True)
            if not any(s.image_id == entry.image_id for s in rig.app.snapshots()):
                raise BenchError("the registry dropped the deleted snapshot: nothing stale to hit")
            fallbacks = rig.app.metrics.value("snapyard_stale_snapshot_fallbacks_total")
            second = run_job(rig.app, spec)
            hit_404 = rig.app.metrics.value("snapyard_stale_snapshot_fallbacks_total") > fallbacks
            if plain is None:
                plain = run_job(rig.app, fresh)
            if second.from_snapshot or plain.from_snapshot:
                raise BenchError(f"job {second.id} or {plain.id} ran from a snapshot")
            if i < 0:
                continue
            recovered += int(hit_404)
            base.append(to_finished(plain))
            stale.append(to_finished(second))
            base_run.append(to_running(plain))
            stale_run.append(to_running(second))
    extra = [s - b for s, b in zip(stale, base, strict=True)]
    extra_run = [s - b for s, b in zip(stale_run, base_run, strict=True)]
    base_s, stale_s = median(base), median(stale)
    notes = []
    if recovered < reps:
        notes.append(f"only {recovered} of {reps} stale runs went through the 404 fallback")
    return ScenarioResult(
        name="stale_recovery",
        title="Stale-snapshot recovery vs plain base run (real engine, setup 0 s)",
        figures=[
            Figure("base_median_ms", base_s * 1e3, "ms", "lower", note="submit->finished"),
            Figure("stale_median_ms", stale_s * 1e3, "ms", "lower", note="submit->finished"),
            Figure(
                "extra_median_ms",
                median(extra) * 1e3,
                "ms",
                "lower",
                note="median of paired (stale - base), submit->finished",
            ),
            Figure(
                "extra_to_running_median_ms",
                median(extra_run) * 1e3,
                "ms",
                "lower",
                note="median of paired (stale - base), submit->running: the start path",
            ),
            Figure("stale_over_base", stale_s / base_s, "ratio", "lower", True, "medians"),
            Figure("recovered", recovered, "runs", "higher", note=f"of {reps} via the 404 path"),
        ],
        samples={
            "base_s": base,
            "stale_s": stale,
            "base_to_running_s": base_run,
            "stale_to_running_s": stale_run,
        },
        params={"repetitions": reps, "setup_seconds": 0.0, "warmup_pairs": 1},
        notes=notes,
    )


# --- 3. latency with 100 jobs queued ---------------------------------------------


def _raw_spec(settings: Settings, index: int) -> ContainerSpec:
    """The container a Spawner would create for a base run, built by hand."""
    worker = settings.worker
    return ContainerSpec(
        image=worker.image,
        command=worker.command,
        env={
            ENV_JOB_ID: f"raw-{index}",
            ENV_SNAPSHOT_REUSE: "0",
            ENV_SETUP_SECONDS: f"{worker.setup_seconds:g}",
        },
        labels={**BENCH_LABELS, "snapyard.bench.raw": "1"},
        memory_bytes=worker.memory_mb * _MIB,
        pids_limit=worker.pids_limit,
        network=worker.network,
        init=True,
        cap_drop_all=worker.drop_all_capabilities,
        no_new_privileges=True,
    )


def _raw_cycles(engine: DockerEngine, settings: Settings, reps: int) -> tuple[list[float], ...]:
    """Serial create+start+wait+remove; returns (create+start, whole cycle) per run."""
    starts: list[float] = []
    cycles: list[float] = []
    for index in range(-1, reps):  # one warm-up
        began = time.perf_counter()
        cid = engine.create_container(_raw_spec(settings, index))
        try:
            engine.start_container(cid)
            started = time.perf_counter()
            code = engine.wait_container(cid, timeout_s=JOB_WAIT_S)
        finally:
            engine.remove_container(cid, force=True)
        ended = time.perf_counter()
        if code != 0:
            raise BenchError(f"raw baseline container exited {code}")
        if index >= 0:
            starts.append(started - began)
            cycles.append(ended - began)
    return starts, cycles


@dataclass(frozen=True)
class _Timeline:
    created: float
    starting: float
    running: float
    finished: float


def _timeline(app: Snapyard, job_id: str) -> _Timeline:
    job = app.store.get(job_id)
    if job is None or job.started_at is None or job.finished_at is None:
        raise BenchError(f"job {job_id} has no start or end in the store")
    history = app.store.history(job_id)
    starting = [at for state, at, _ in history if state is JobState.STARTING]
    return _Timeline(job.created_at, starting[-1], job.started_at, job.finished_at)


def dispatch_latencies(timelines: list[_Timeline]) -> list[float]:
    """Slot free -> running, for the jobs that were queued when a slot freed.

    A job ending frees its slot and the Supervisor dispatches the next queued
    job in the same message, so the slot that a job got is the last job end
    at or before its "starting" row.
    """
    ends = sorted(t.finished for t in timelines)
    out: list[float] = []
    for t in timelines:
        freed = [end for end in ends if end <= t.starting]
        if freed and t.created < freed[-1]:
            out.append(t.running - freed[-1])
    return out


def latency_100_queued(quick: bool) -> ScenarioResult:
    """100 independent short jobs at once on 4 Spawners / 4 workers, vs raw serial Docker."""
    jobs = 100 if not quick else 40
    raw_reps = 5 if quick else 20
    engine = docker_engine()
    sections: dict[str, dict[str, Any]] = {
        "worker": {"setup_seconds": 0.0},
        "snapshots": {"enabled": False},
        "supervisor": {"spawners": 4, "max_workers": 4},
    }
    settings = bench_settings(Path(tempfile.gettempdir()), **sections)
    ensure_base_image(engine, settings.worker.image)
    since = time.time() - 1.0
    try:
        raw_start, raw_cycle = _raw_cycles(engine, settings, raw_reps)
    finally:
        sweep_docker(engine, since)
    with docker_rig(engine, **sections) as rig:
        for i in range(4):  # warm-up: connections, the first spawn of each Spawner
            run_job(rig.app, validate_spec(rig.project, f"warm-{i}"))
        specs = [validate_spec(rig.project, f"item-{i}") for i in range(jobs)]
        began = time.perf_counter()
        ids = [rig.app.submit(spec).id for spec in specs]
        submitted = time.perf_counter() - began
        for job_id in ids:
            job = rig.app.wait(job_id, JOB_WAIT_S)
            if job.state is not JobState.SUCCEEDED:
                raise BenchError(f"job {job.id} ended {job.state}: {job.error}")
        timelines = [_timeline(rig.app, job_id) for job_id in ids]
    to_run = [t.running - t.created for t in timelines]
    dispatch = dispatch_latencies(timelines)
    span = max(t.finished for t in timelines) - min(t.created for t in timelines)
    jobs_per_s = jobs / span
    raw_start_s, raw_cycle_s = median(raw_start), median(raw_cycle)
    p50, p95 = median(to_run), percentile(to_run, 95)
    return ScenarioResult(
        name="latency_100_queued",
        title=f"{jobs} jobs queued at once, 4 Spawners / 4 workers (real engine)",
        figures=[
            Figure("raw_cycle_median_ms", raw_cycle_s * 1e3, "ms", "lower", note="baseline"),
            Figure("raw_create_start_median_ms", raw_start_s * 1e3, "ms", "lower"),
            Figure("to_running_p50_ms", p50 * 1e3, "ms", "lower", note="queueing included"),
            Figure("to_running_p95_ms", p95 * 1e3, "ms", "lower", note="queueing included"),
            Figure("dispatch_median_ms", median(dispatch) * 1e3, "ms", "lower"),
            Figure("dispatch_p95_ms", percentile(dispatch, 95) * 1e3, "ms", "lower"),
            Figure("p50_over_raw_cycle", p50 / raw_cycle_s, "ratio", "lower", True),
            Figure("p95_over_raw_cycle", p95 / raw_cycle_s, "ratio", "lower", True),
            Figure(
                "dispatch_over_raw_start",
                median(dispatch) / raw_start_s,
                "ratio",
                "lower",
                True,
                "slot free->running vs raw create+start (medians)",
            ),
            Figure("jobs_per_s", jobs_per_s, "jobs/s", "higher", note="first submit->last end"),
            Figure(
                "throughput_over_raw_serial",
                jobs_per_s * raw_cycle_s,
                "ratio",
                "higher",
                True,
                "jobs/s vs 1 / raw serial cycle",
            ),
            Figure("submit_ms_per_job", submitted / jobs * 1e3, "ms", "lower"),
        ],
        samples={
            "to_running_s": to_run,
            "dispatch_s": dispatch,
            "raw_cycle_s": raw_cycle,
            "raw_create_start_s": raw_start,
        },
        params={
            "jobs": jobs,
            "raw_repetitions": raw_reps,
            "spawners": 4,
            "max_workers": 4,
            "dispatch_samples": len(dispatch),
        },
    )


# --- 4. memory after 1,000 jobs ---------------------------------------------------


class _NoCallLog(list[tuple[str, tuple[object, ...]]]):
    """MemoryEngine's call log, switched off: it is the test double's memory, not ours."""

    def append(self, item: tuple[str, tuple[object, ...]]) -> None:
        return None


def _wait_idle(app: Snapyard, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = app.status()
        if status.queued == 0 and status.in_flight == 0 and status.pending_ops == 0:
            return
        time.sleep(0.02)
    raise BenchError(f"the supervisor did not go idle within {timeout_s:g}s")


def memory_1000_jobs(quick: bool) -> ScenarioResult:
    """RSS after N finished jobs vs the same process with the app started and 0 jobs.

    MemoryEngine exits every container at once with code 0; snapshots are off,
    so the figure is the supervisor's own per-job footprint (store, actors,
    metrics), not a thousand in-memory images. The runner runs this in a fresh
    process so earlier scenarios do not colour the baseline.
    """
    jobs = 1000  # a few seconds even in --quick: the figure stays comparable
    data_dir = Path(tempfile.mkdtemp(prefix="snapyard-bench-mem-"))
    engine = MemoryEngine(exit_policy=lambda _c: 0)
    engine.calls = _NoCallLog()
    settings = bench_settings(data_dir, snapshots={"enabled": False}, worker={"setup_seconds": 0.0})
    app = Snapyard(settings, engine=engine, container_labels=BENCH_LABELS)
    try:
        app.start()
        gc.collect()
        baseline = rss_bytes()
        blocks_before = sys.getallocatedblocks()
        began = time.perf_counter()
        for i in range(jobs):
            app.submit(validate_spec("bench-mem", f"item-{i}"))
        _wait_idle(app, 600.0)
        elapsed = time.perf_counter() - began
        counts = app.store.count_by_state()
        if counts.get(JobState.SUCCEEDED, 0) != jobs:
            raise BenchError(f"expected {jobs} succeeded jobs, the store has {counts}")
        gc.collect()
        after = rss_bytes()
        blocks_after = sys.getallocatedblocks()
        threads = threading.active_count()
    finally:
        app.stop(timeout_s=30.0)
        shutil.rmtree(data_dir, ignore_errors=True)
    return ScenarioResult(
        name="memory_1000_jobs",
        title=f"Supervisor RSS after {jobs} finished jobs (MemoryEngine, instant exit)",
        figures=[
            Figure("rss_baseline_mib", baseline / _MIB, "MiB", "lower", note="app started, 0 jobs"),
            Figure("rss_after_mib", after / _MIB, "MiB", "lower", note=f"{jobs} jobs finished"),
            Figure("rss_growth_mib", (after - baseline) / _MIB, "MiB", "lower"),
            Figure("rss_per_job_kib", (after - baseline) / jobs / 1024, "KiB", "lower"),
            Figure("rss_after_over_baseline", after / baseline, "ratio", "lower", True),
            Figure(
                "py_blocks_per_job",
                (blocks_after - blocks_before) / jobs,
                "blocks",
                "lower",
                note="live Python allocations retained per job",
            ),
            Figure("jobs_per_s", jobs / elapsed, "jobs/s", "higher", note="submit->all finished"),
        ],
        samples={},
        params={"jobs": jobs, "snapshots": False, "threads_alive": threads},
    )


Scenario = Callable[[bool], ScenarioResult]

# Name -> (function, runs in its own process).
SCENARIOS: dict[str, tuple[Scenario, bool]] = {
    "snapshot_hit_vs_base": (snapshot_hit_vs_base, False),
    "stale_recovery": (stale_recovery, False),
    "latency_100_queued": (latency_100_queued, False),
    "memory_1000_jobs": (memory_1000_jobs, True),
}
