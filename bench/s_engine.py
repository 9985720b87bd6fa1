"""Scenarios 1, 2 and 6 on the real engine: dispatch, throughput, exit detection.

Each compares Snapyard with plain docker-py (``bench.peers.raw``) at the same
concurrency, measured side by side in one run; throughput adds the naive
script. Snapyard's times come from its job store (``created_at``, the
"starting" history row, ``started_at``, ``finished_at``, stamped by the
Supervisor's clock); the peers' from ``time.perf_counter``/``time.time``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from actors.app import Snapyard
from actors.engine.docker import DockerEngine
from actors.model import JobState, validate_spec
from bench.model import Figure, ScenarioResult, median, percentile
from bench.peers.naive import run_naive
from bench.peers.raw import api_client, container_kwargs, run_raw
from bench.rigs import (
    BENCH_BASE_TAG,
    BENCH_LABELS,
    BENCH_REPOSITORY,
    RUN_LABEL,
    BenchError,
    Progress,
    docker_engine,
    docker_rig,
    engine_url,
    ensure_bench_base,
    run_job,
    sweep_docker,
    wait_all,
)

__all__ = ["Timeline", "dispatch", "dispatch_latencies", "exit_detection", "throughput"]

_NO_SNAPSHOTS: dict[str, dict[str, Any]] = {
    "worker": {"setup_seconds": 0.0},
    "snapshots": {"enabled": False},
}


@dataclass(frozen=True)
class Timeline:
    created: float
    starting: float
    running: float
    finished: float


def timeline(app: Snapyard, job_id: str) -> Timeline:
    job = app.store.get(job_id)
    if job is None or job.started_at is None or job.finished_at is None:
        raise BenchError(f"job {job_id} has no start or end in the store")
    starting = [at for state, at, _ in app.store.history(job_id) if state is JobState.STARTING]
    return Timeline(job.created_at, starting[-1], job.started_at, job.finished_at)


def dispatch_latencies(timelines: list[Timeline]) -> list[float]:
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


def _burst(app: Snapyard, project: str, label: str, jobs: int) -> list[Timeline]:
    """``jobs`` trivial jobs submitted at once; their timelines."""
    specs = [validate_spec(project, f"{label}-{i}") for i in range(jobs)]
    ids = [app.submit(spec).id for spec in specs]
    wait_all(app, ids, Progress(f"snapyard {label}", jobs))
    return [timeline(app, job_id) for job_id in ids]


def _warm(app: Snapyard, project: str, count: int) -> None:
    """Connections and each Spawner's first spawn, outside the measurement."""
    ids = [app.submit(validate_spec(project, f"warm-{i}")).id for i in range(count)]
    wait_all(app, ids)


def _span(timelines: list[Timeline]) -> float:
    return max(t.finished for t in timelines) - min(t.created for t in timelines)


# --- 1. dispatch overhead ---------------------------------------------------------


def dispatch(quick: bool) -> ScenarioResult:
    """Slot free -> running against raw create+start, both at concurrency 4.

    Rounds alternate raw and Snapyard (the app stays up), so drift on a shared
    engine falls on both sides alike.
    """
    concurrency = 4
    rounds, per_round = (1, 8) if quick else (3, 24)
    engine = docker_engine()
    ensure_bench_base(engine)
    api = api_client(engine_url())
    raw_labels = {**BENCH_LABELS, RUN_LABEL: "raw-dispatch"}
    since = time.time() - 1.0
    raw_start: list[float] = []
    snap: list[float] = []
    sections = {
        **_NO_SNAPSHOTS,
        "supervisor": {"spawners": concurrency, "max_workers": concurrency},
    }
    try:
        with docker_rig(engine, **sections) as rig:
            _warm(rig.app, rig.project, concurrency)
            run_raw(api, BENCH_BASE_TAG, raw_labels, concurrency, concurrency)  # warm-up
            for r in range(rounds):
                raw = run_raw(
                    api,
                    BENCH_BASE_TAG,
                    raw_labels,
                    per_round,
                    concurrency,
                    on_done=Progress(f"raw round {r}", per_round),
                )
                if raw.failed:
                    raise BenchError(f"{raw.failed} raw containers failed")
                raw_start += raw.create_start_s
                snap += dispatch_latencies(_burst(rig.app, rig.project, f"r{r}", per_round))
    finally:
        sweep_docker(engine, since, raw_labels)
    ratio = median(snap) / median(raw_start)
    return ScenarioResult(
        name="dispatch",
        title="1. Dispatch overhead: slot free -> running vs raw create+start (concurrency 4)",
        figures=[
            Figure(
                "snapyard_median_ms", median(snap) * 1e3, "ms", "lower", note="slot free->running"
            ),
            Figure("snapyard_p95_ms", percentile(snap, 95) * 1e3, "ms", "lower"),
            Figure("raw_median_ms", median(raw_start) * 1e3, "ms", "lower", note="create+start"),
            Figure("raw_p95_ms", percentile(raw_start, 95) * 1e3, "ms", "lower"),
            Figure("ratio", ratio, "ratio", "lower", True, "medians; target <= 1.05"),
        ],
        samples={"snapyard_s": snap, "raw_s": raw_start},
        params={"concurrency": concurrency, "rounds": rounds, "jobs_per_round": per_round},
        targets={"ratio": ("<=", 1.05)},
    )


# --- 2. throughput ---------------------------------------------------------------


def _level(
    engine: DockerEngine, api: Any, labels: dict[str, str], level: int, jobs: int, chunks: int
) -> tuple[dict[str, float], int]:
    """Jobs/s per side at one concurrency, and the naive script's failures.

    The jobs go in ``chunks`` rounds; in each the three sides run a chunk
    one after another, in an order that rotates, so a busy spell on a shared
    machine falls on all three alike. A side's rate is its jobs over its time.
    """
    per_chunk = jobs // chunks
    done = {"snapyard": 0.0, "raw": 0.0, "naive": 0.0}
    spent = {"snapyard": 0.0, "raw": 0.0, "naive": 0.0}
    naive_errors = 0
    progress = Progress(f"c{level} jobs, all sides", 3 * per_chunk * chunks, every_s=5.0)
    sections = {
        **_NO_SNAPSHOTS,
        "supervisor": {"spawners": level, "max_workers": level},
    }
    with docker_rig(engine, **sections) as rig:
        _warm(rig.app, rig.project, level)
        for chunk in range(chunks):

            def snapyard(chunk: int = chunk) -> tuple[int, float]:
                timelines = _burst(rig.app, rig.project, f"c{level}-{chunk}", per_chunk)
                return len(timelines), _span(timelines)

            def raw() -> tuple[int, float]:
                run = run_raw(api, BENCH_BASE_TAG, labels, per_chunk, level)
                if run.failed:
                    raise BenchError(f"{run.failed} raw containers failed at concurrency {level}")
                return len(run.cycle_s), run.span_s

            def naive(chunk: int = chunk) -> tuple[int, float]:
                nonlocal naive_errors
                workload = [
                    (("bench-naive", f"c{level}-{chunk}-{i}"), 0.0) for i in range(per_chunk)
                ]
                out = run_naive(
                    api, BENCH_BASE_TAG, BENCH_REPOSITORY, labels, workload, level, commit=False
                )
                naive_errors += out.failed + out.stuck
                return out.succeeded, out.span_s

            sides = [("snapyard", snapyard), ("raw", raw), ("naive", naive)]
            shift = (chunk + level) % len(sides)
            for name, run in sides[shift:] + sides[:shift]:
                count, seconds = run()
                done[name] += count
                spent[name] += seconds
                progress(per_chunk)
    return {k: done[k] / spent[k] if spent[k] else 0.0 for k in done}, naive_errors


def throughput(quick: bool) -> ScenarioResult:
    """N trivial jobs at each pool size: Snapyard, raw and naive, side by side per level.

    Snapshots are off on both sides that could commit (Snapyard and the naive
    script): raw does not commit, and a trivial job's commit would be the figure.
    """
    levels = (1, 4) if quick else (1, 2, 4, 8)
    jobs, chunks = (4, 1) if quick else (200, 4)
    engine = docker_engine()
    ensure_bench_base(engine)
    api = api_client(engine_url())
    labels = {**BENCH_LABELS, RUN_LABEL: "throughput-peers"}
    since = time.time() - 1.0
    rates: dict[str, list[float]] = {"snapyard": [], "raw": [], "naive": []}
    naive_errors = 0
    try:
        for level in levels:
            by_side, errors = _level(engine, api, labels, level, jobs, chunks)
            naive_errors += errors
            for name, rate in by_side.items():
                rates[name].append(rate)
    finally:
        sweep_docker(engine, since, labels)
    figures = []
    for level, s, r, n in zip(levels, rates["snapyard"], rates["raw"], rates["naive"], strict=True):
        figures += [
            Figure(f"c{level}_snapyard_jobs_per_s", s, "jobs/s", "higher"),
            Figure(f"c{level}_raw_jobs_per_s", r, "jobs/s", "higher"),
            Figure(f"c{level}_naive_jobs_per_s", n, "jobs/s", "higher"),
            Figure(
                f"c{level}_ratio", s / r, "ratio", "higher", True, "Snapyard / raw; target >= 0.95"
            ),
            Figure(f"c{level}_naive_ratio", n / r, "ratio", "higher", note="naive / raw"),
        ]
    return ScenarioResult(
        name="throughput",
        title=f"2. Throughput: {jobs} trivial jobs per pool size, Snapyard vs raw vs naive",
        figures=figures,
        samples={f"{k}_jobs_per_s": v for k, v in rates.items()},
        params={
            "levels": list(levels),
            "jobs": jobs,
            "chunks": chunks,
            "naive_failures": naive_errors,
        },
        targets={f"c{level}_ratio": (">=", 0.95) for level in levels},
    )


# --- 6. exit detection -------------------------------------------------------------


class _DieEvents:
    """Docker's ``die`` events for one run label: container ID -> the daemon's time."""

    def __init__(self, api: Any, run: str) -> None:
        self.times: dict[str, float] = {}
        self._stream = api.events(
            decode=True, filters={"event": "die", "label": f"{RUN_LABEL}={run}"}
        )
        self._thread = threading.Thread(target=self._read, name="die-events", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self._stream:
                self.times[event["id"]] = event["timeNano"] / 1e9
        except Exception:  # closed at the end
            return

    def close(self) -> None:
        self._stream.close()


def _wait_for(predicate: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.002)
    raise BenchError(f"gave up after {timeout_s:g}s")


def _waiter(api: Any, cid: str, returned: list[float]) -> None:
    api.wait(cid)
    returned.append(time.time())


def _one_exit(
    app: Snapyard, project: str, api: Any, events: _DieEvents, i: int
) -> tuple[float, float] | None:
    """(die -> job terminal, die -> wait() returned) for one job; None if a side missed it."""
    job_id = app.submit(validate_spec(project, f"exit-{i}")).id

    def container_id() -> str | None:
        job = app.get(job_id)
        return job.container_id if job is not None else None

    cid = _wait_for(container_id, 30.0)
    returned: list[float] = []
    waiter = threading.Thread(target=_waiter, args=(api, cid, returned), daemon=True)
    waiter.start()
    job = app.wait(job_id, 120.0)
    waiter.join(timeout=60.0)
    died = _wait_for(lambda: events.times.get(cid), 10.0)
    if job.finished_at is None or not returned:
        return None
    return job.finished_at - died, returned[0] - died


def _raw_finish(api: Any, reps: int, setup_s: float) -> list[float]:
    """What reading the logs and removing an exited container costs, by plain docker-py.

    Snapyard records a job terminal when its Finish is done: after the logs
    are read and the container removed. This is that work alone.
    """
    labels = {**BENCH_LABELS, RUN_LABEL: "raw-finish"}
    since = time.time() - 1.0
    out = []
    try:
        for i in range(reps):
            cid = api.create_container(
                **container_kwargs(api, BENCH_BASE_TAG, f"finish-{i}", labels, setup_s)
            )["Id"]
            api.start(cid)
            api.wait(cid)
            began = time.perf_counter()
            api.logs(cid, stdout=True, stderr=True, tail=200)
            api.remove_container(cid, force=True)
            out.append(time.perf_counter() - began)
    finally:
        sweep_docker(docker_engine(), since, labels)
    return out


def exit_detection(quick: bool) -> ScenarioResult:
    """Container exit (Docker's ``die`` event) -> job recorded terminal, vs a thread in ``wait()``.

    Each job's container lives ``setup`` seconds, long enough for the bench to
    attach its own ``wait()`` to the same container before it exits.
    """
    reps = 3 if quick else 20
    setup_s = 0.5
    engine = docker_engine()
    ensure_bench_base(engine)
    api = api_client(engine_url())
    snap: list[float] = []
    waited: list[float] = []
    lost = 0
    sections = {**_NO_SNAPSHOTS, "worker": {"setup_seconds": setup_s}}
    with docker_rig(engine, **sections) as rig:
        events = _DieEvents(api, rig.labels[RUN_LABEL])
        try:
            run_job(rig.app, validate_spec(rig.project, "warm"))
            progress = Progress("exit detection", reps)
            for i in range(reps):
                pair = _one_exit(rig.app, rig.project, api, events, i)
                if pair is None:
                    lost += 1
                    continue
                snap.append(pair[0])
                waited.append(pair[1])
                progress()
        finally:
            events.close()
    finish = _raw_finish(api, reps, setup_s)
    ratio = median(snap) / median(waited)
    return ScenarioResult(
        name="exit_detection",
        title="6. Exit detection: container exit -> job terminal vs a thread in wait()",
        figures=[
            Figure("snapyard_median_ms", median(snap) * 1e3, "ms", "lower", note="die -> recorded"),
            Figure("snapyard_p95_ms", percentile(snap, 95) * 1e3, "ms", "lower"),
            Figure(
                "wait_median_ms", median(waited) * 1e3, "ms", "lower", note="die -> wait() returns"
            ),
            Figure("wait_p95_ms", percentile(waited, 95) * 1e3, "ms", "lower"),
            Figure("ratio", ratio, "ratio", "lower", True, "medians; target <= 1.0 (no slower)"),
            Figure(
                "raw_logs_remove_median_ms",
                median(finish) * 1e3,
                "ms",
                "lower",
                note="docker-py logs + remove after wait(): what a Finish does before the record",
            ),
        ],
        samples={"snapyard_s": snap, "wait_s": waited, "raw_logs_remove_s": finish},
        params={"repetitions": reps, "setup_seconds": setup_s, "lost_samples": lost},
        targets={"ratio": ("<=", 1.0)},
    )
