"""Scenarios 3 and 7 on the MemoryEngine: the actors' own cost, and how it grows.

The MemoryEngine answers at once (every container exits 0 when started), so
what is left is Snapyard: its actors, messages and the durable job store
(SQLite, WAL, ``synchronous=FULL``: an fsync per commit) on a real disk.
"""

from __future__ import annotations

import cProfile
import gc
import io
import pstats
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from actors.app import Snapyard
from actors.engine.memory import MemoryEngine
from actors.labels import (
    LABEL_BASE_IMAGE_ID,
    LABEL_CREATED_AT,
    LABEL_INSTANCE,
    LABEL_PROJECT,
    LABEL_REPOSITORY,
    LABEL_ROLE,
    LABEL_WORK_ITEM,
    ROLE_SNAPSHOT,
)
from actors.messages import ListSnapshots, Lookup, SweepSnapshots
from actors.model import Job, JobState, SnapshotKey, validate_spec
from actors.store.base import new_job_id
from actors.store.sqlite import SqliteStore
from actors.worker_image import ensure_base_image
from bench.model import Figure, ScenarioResult, median, rss_bytes
from bench.rigs import (
    BENCH_BASE_TAG,
    BENCH_LABELS,
    BENCH_REPOSITORY,
    BenchError,
    Progress,
    bench_settings,
)

__all__ = ["actor_cost", "growth", "profile_threads"]

_MIB = 1024 * 1024
_INSTANCE = "bench-memory"


class _NoCallLog(list[tuple[str, tuple[object, ...]]]):
    """MemoryEngine's call log, switched off: it is the test double's memory, not ours."""

    def append(self, item: tuple[str, tuple[object, ...]]) -> None:
        return None


def _engine() -> MemoryEngine:
    engine = MemoryEngine(exit_policy=lambda _c: 0)
    engine.calls = _NoCallLog()
    return engine


@contextmanager
def memory_app(
    data_dir: Path, engine: MemoryEngine | None = None, **sections: dict[str, Any]
) -> Iterator[Snapyard]:
    sections.setdefault("snapshots", {"enabled": False})
    settings = bench_settings(
        data_dir,
        **{**sections, "worker": {"setup_seconds": 0.0}},
    ).replace(supervisor={"instance_id": _INSTANCE})
    app = Snapyard(settings, engine=engine or _engine(), container_labels=BENCH_LABELS)
    try:
        yield app.start()
    finally:
        app.stop(timeout_s=60.0)


def wait_idle(app: Snapyard, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = app.status()
        if status.queued == 0 and status.in_flight == 0 and status.pending_ops == 0:
            return
        time.sleep(0.005)
    raise BenchError(f"the supervisor did not go idle within {timeout_s:g}s")


@contextmanager
def profile_threads() -> Iterator[list[cProfile.Profile]]:
    """cProfile in every thread started inside (the actors'), not only this one.

    ``threading.setprofile`` runs a hook first thing in each new thread; the
    hook swaps itself for a fresh profiler. Python 3.11's cProfile is per
    thread (3.12 moved it to sys.monitoring, where this would not work).
    """
    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()

    def hook(_frame: Any, _event: str, _arg: Any) -> None:
        profile = cProfile.Profile()
        with lock:
            profiles.append(profile)
        profile.enable()

    threading.setprofile(hook)
    try:
        yield profiles
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]


# An actor idle on its inbox, or a thread parked on a lock: waiting, not work.
_IDLE = ("acquire' of '_thread.lock", "get' of '_queue.SimpleQueue", "wait' of", "time.sleep")


def profile_summary(profiles: list[cProfile.Profile], top: int = 15) -> list[str]:
    """The top functions by own wall time across every profiled thread, idle waits left out.

    Wall time, not CPU: an fsync is time a job waits although no CPU is spent,
    and it is where a durable store's time goes.
    """
    if not profiles:
        return []
    stats = pstats.Stats(profiles[0], stream=io.StringIO())
    for profile in profiles[1:]:
        stats.add(profile)
    entries = [
        (where, value)
        for where, value in stats.stats.items()  # type: ignore[attr-defined]
        if not any(idle in where[2] for idle in _IDLE)
    ]
    total = sum(value[2] for _, value in entries)
    rows = sorted(entries, key=lambda kv: kv[1][2], reverse=True)
    lines = [f"busy wall time, all threads: {total:.3f}s"]
    for (path, line, func), (_cc, calls, tottime, cumtime, _callers) in rows[:top]:
        where = f"{Path(path).name}:{line}({func})" if line else func
        lines.append(
            f"{tottime / total:6.1%} own {tottime:7.3f}s cum {cumtime:7.3f}s calls {calls:>8} {where}"
        )
    return lines


# --- 3. actor cost ------------------------------------------------------------------


def _drive(app: Snapyard, label: str, jobs: int) -> tuple[float, float]:
    """Submit ``jobs`` at once and wait for idle: (wall seconds, process CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(jobs):
        app.submit(validate_spec("bench-cost", f"{label}-{i}"))
    wait_idle(app, 600.0)
    return time.perf_counter() - wall, time.process_time() - cpu


def actor_cost(quick: bool) -> ScenarioResult:
    """CPU per job end to end and sustained jobs/s through one supervisor; then a profile.

    Batches of jobs are submitted as fast as one thread can and drained; CPU is
    the whole process's (every actor thread, the store's fsyncs' system time).
    Snapshots are off: the figure is the job path (submit, claim, spawn, start,
    exit, finish), not the MemoryEngine's commits. The profiled batch runs
    after the timed ones, since cProfile slows every call.
    """
    batches, per_batch = (3, 200) if quick else (6, 1000)
    profiled = 200 if quick else 1000
    data_dir = Path(tempfile.mkdtemp(prefix="snapyard-bench-cost-"))
    cpu_per_job: list[float] = []
    rates: list[float] = []
    try:
        with memory_app(data_dir / "timed") as app:
            _drive(app, "warm", per_batch // 4)
            progress = Progress("batches", batches)
            for b in range(batches):
                wall, cpu = _drive(app, f"b{b}", per_batch)
                cpu_per_job.append(cpu / per_batch)
                rates.append(per_batch / wall)
                progress()
        with profile_threads() as profiles, memory_app(data_dir / "profiled") as app:
            _drive(app, "profiled", profiled)
        summary = profile_summary(profiles)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    cpu_ms = median(cpu_per_job) * 1e3
    rate = median(rates)
    return ScenarioResult(
        name="actor_cost",
        title="3. Actor cost: MemoryEngine, zero latency, durable store on",
        figures=[
            Figure(
                "cpu_ms_per_job", cpu_ms, "ms", "lower", True, "median of batches; target <= 0.5"
            ),
            Figure(
                "jobs_per_s", rate, "jobs/s", "higher", True, "median of batches; target >= 2000"
            ),
            Figure("cpu_over_target", cpu_ms / 0.5, "ratio", "lower", note="1.0 = on target"),
            Figure("rate_over_target", rate / 2000, "ratio", "higher", note="1.0 = on target"),
        ],
        samples={"cpu_s_per_job": cpu_per_job, "jobs_per_s": rates},
        params={
            "batches": batches,
            "jobs_per_batch": per_batch,
            "profiled_jobs": profiled,
            "profile_top": summary,
            "snapshots": False,
        },
        notes=[
            f"profile of {profiled} jobs (own wall time, every thread, idle waits left out):",
            *summary,
        ],
        targets={"cpu_ms_per_job": ("<=", 0.5), "jobs_per_s": (">=", 2000.0)},
    )


# --- 7. growth -------------------------------------------------------------------


def _prefill(path: Path, count: int, state: JobState = JobState.QUEUED) -> None:
    """``count`` jobs written straight to the store before Snapyard starts: dispatch held."""
    store = SqliteStore(path)
    try:
        now = time.time()
        with store.batch():
            for i in range(count):
                job = Job(new_job_id(), validate_spec("bench-growth", f"item-{i}"), state, now)
                if state.terminal:
                    job = Job(
                        job.id, job.spec, state, now, started_at=now, finished_at=now, exit_code=0
                    )
                store.add(job, note="bench prefill")
    finally:
        store.close()


def _dispatch_rate(data_dir: Path, measured: int) -> float:
    """Start Snapyard on a prefilled store; jobs finished per second over ``measured`` of them."""
    with memory_app(data_dir) as app:
        started: tuple[float, int] | None = None
        deadline = time.monotonic() + 600.0
        while time.monotonic() < deadline:
            # The ledger's gauge, not a store count: a COUNT over 100k rows
            # would hold the store's lock and slow the dispatch it measures.
            done = int(app.metrics.value("snapyard_jobs", state=JobState.SUCCEEDED.value))
            now = time.perf_counter()
            if started is None and done > 0:
                started = (now, done)
            elif started is not None and done - started[1] >= measured:
                return (done - started[1]) / (now - started[0])
            time.sleep(0.02)
    raise BenchError(f"{measured} queued jobs did not finish in time in {data_dir}")


def _dispatch_rates(root: Path, queues: tuple[int, ...], measured: int, rounds: int) -> list[float]:
    """The median rate per queue length, the lengths measured in turn each round.

    Interleaved, so a busy spell on a shared machine falls on every length
    alike; each store holds its length plus what the rounds will drain.
    """
    dirs = []
    for queued in queues:
        data_dir = root / f"q{queued}"
        data_dir.mkdir()
        _prefill(bench_settings(data_dir).store_path, queued + rounds * measured)
        dirs.append(data_dir)
    rates: list[list[float]] = [[] for _ in queues]
    progress = Progress("dispatch rounds", rounds * len(queues))
    for _ in range(rounds):
        for index, data_dir in enumerate(dirs):
            rates[index].append(_dispatch_rate(data_dir, measured))
            progress()
    return [median(r) for r in rates]


def _base(engine: MemoryEngine) -> str:
    """The worker image Snapyard will use: snapshots of any other base are evicted as old."""
    ensure_base_image(engine, BENCH_BASE_TAG)
    return engine.inspect_image(BENCH_BASE_TAG).id


def _seed_snapshots(engine: MemoryEngine, base_id: str, count: int) -> list[SnapshotKey]:
    keys = []
    now = time.time()
    for i in range(count):
        key = SnapshotKey("bench-growth", f"snap-{i}")
        labels = {
            **BENCH_LABELS,
            LABEL_ROLE: ROLE_SNAPSHOT,
            LABEL_PROJECT: key.project,
            LABEL_WORK_ITEM: key.work_item,
            LABEL_BASE_IMAGE_ID: base_id,
            LABEL_CREATED_AT: repr(now),
            LABEL_REPOSITORY: BENCH_REPOSITORY,
            LABEL_INSTANCE: _INSTANCE,
        }
        engine.add_image(f"{BENCH_REPOSITORY}:snap-{i}", labels=labels, layers=4)
        keys.append(key)
    return keys


def _listed(app: Snapyard) -> list[Any]:
    """The registry, waited for as long as adopting it takes (the facade's ask gives up at 30 s)."""
    assert app.snapshots_ref is not None
    listed: list[Any] = app.snapshots_ref.ask(ListSnapshots(), timeout=900.0)
    return listed


def _registry(root: Path, count: int, lookups: int) -> tuple[float, float, float]:
    """(start with ``count`` snapshots to adopt, median lookup, one sweep), in seconds."""
    engine = _engine()
    base_id = _base(engine)
    keys = _seed_snapshots(engine, base_id, count)
    data_dir = root / f"s{count}"
    began = time.perf_counter()
    sections = {"snapshots": {"enabled": True, "max_count": max(count, 1) * 2}}
    with memory_app(data_dir, engine, **sections) as app:
        _listed(app)  # the rebuild may still be in the manager's inbox
        adopted = time.perf_counter() - began
        ref = app.snapshots_ref
        assert ref is not None
        times = []
        for i in range(lookups):
            key = keys[(i * 7919) % len(keys)]
            t = time.perf_counter()
            if ref.ask(Lookup(key)) is None:
                raise BenchError(f"snapshot {key} was not adopted")
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref.ask(SweepSnapshots())
        sweep = time.perf_counter() - t
    return adopted, median(times), sweep


def _rss(root: Path, jobs: int, snapshots: int) -> tuple[float, float]:
    """(RSS with the app started on an empty store, RSS with ``jobs`` stored and ``snapshots``)."""
    gc.collect()
    before = rss_bytes()
    engine = _engine()
    base_id = _base(engine)
    _seed_snapshots(engine, base_id, snapshots)
    data_dir = root / "rss"
    data_dir.mkdir()
    _prefill(bench_settings(data_dir).store_path, jobs, JobState.SUCCEEDED)
    sections = {"snapshots": {"enabled": True, "max_count": snapshots * 2}}
    with memory_app(data_dir, engine, **sections) as app:
        _drive(app, "rss", 200)
        if (adopted := len(_listed(app))) < snapshots:
            raise BenchError(f"only {adopted} of {snapshots} snapshots adopted")
        gc.collect()
        return before, rss_bytes()


def growth(quick: bool) -> ScenarioResult:
    """Dispatch rate against the queue's length; registry cost against its size; RSS.

    Runs in its own process (the RSS is this process's), and the RSS first,
    before the large stores and registries have grown the heap.
    """
    queues = (200, 2000) if quick else (1_000, 10_000, 100_000)
    sizes = (10, 200) if quick else (10, 1_000, 10_000)
    rss_jobs, rss_snaps = (1_000, 100) if quick else (10_000, 1_000)
    measured, rounds = (100, 1) if quick else (300, 3)
    root = Path(tempfile.mkdtemp(prefix="snapyard-bench-growth-"))
    samples: dict[str, list[float]] = {}
    try:
        rss_before, rss_after = _rss(root, rss_jobs, rss_snaps)
        rates = _dispatch_rates(root, queues, measured, rounds)
        progress = Progress("registry sizes", len(sizes))
        registry = []
        for size in sizes:
            registry.append(_registry(root, size, 200))
            progress()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    samples["queued"] = [float(q) for q in queues]
    samples["dispatch_jobs_per_s"] = rates
    samples["snapshots"] = [float(s) for s in sizes]
    samples["adopt_s"] = [r[0] for r in registry]
    samples["lookup_s"] = [r[1] for r in registry]
    samples["sweep_s"] = [r[2] for r in registry]
    lo, hi = queues[0], queues[-1]
    figures = [
        Figure(f"dispatch_q{q}_jobs_per_s", r, "jobs/s", "higher")
        for q, r in zip(queues, rates, strict=True)
    ]
    figures.append(
        Figure(
            "dispatch_slowdown",
            rates[0] / rates[-1],
            "ratio",
            "lower",
            True,
            f"rate at {lo} / at {hi}; target <= 2",
        )
    )
    for size, (adopt, lookup, sweep) in zip(sizes, registry, strict=True):
        figures += [
            Figure(f"lookup_s{size}_us", lookup * 1e6, "us", "lower", note="median ask(Lookup)"),
            Figure(f"sweep_s{size}_ms", sweep * 1e3, "ms", "lower", note="ask(SweepSnapshots)"),
            Figure(f"start_s{size}_ms", adopt * 1e3, "ms", "lower", note="start: registry rebuild"),
        ]
    figures.append(
        Figure(
            "lookup_growth",
            registry[-1][1] / registry[0][1],
            "ratio",
            "lower",
            True,
            f"lookup at {sizes[-1]} / at {sizes[0]}; target flat",
        )
    )
    figures.append(
        Figure(
            "rss_mib",
            rss_after / _MIB,
            "MiB",
            "lower",
            True,
            f"{rss_jobs} jobs stored, {rss_snaps} snapshots; target <= 120",
        )
    )
    figures.append(
        Figure(
            "rss_empty_mib",
            rss_before / _MIB,
            "MiB",
            "lower",
            note="interpreter + imports, before the app",
        )
    )
    return ScenarioResult(
        name="growth",
        title="7. Growth: dispatch vs queue length, registry vs size, RSS (MemoryEngine)",
        figures=figures,
        samples=samples,
        params={
            "queues": list(queues),
            "snapshot_counts": list(sizes),
            "measured_jobs": measured,
            "rounds": rounds,
            "rss_jobs": rss_jobs,
            "rss_snapshots": rss_snaps,
            "python": sys.version.split()[0],
        },
        targets={
            "dispatch_slowdown": ("<=", 2.0),
            "lookup_growth": ("<=", 2.0),
            "rss_mib": ("<=", 120.0),
        },
        notes=[]
        if quick or sizes[-1] >= 100_000
        else [
            f"registry measured up to {sizes[-1]} snapshots, not 100k: adopting them at start "
            "(SnapshotManager._rebuild) is quadratic, see start_s*_ms"
        ],
    )
