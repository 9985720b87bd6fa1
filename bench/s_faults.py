"""Scenario 8 on the real engine: Snapyard and the naive script under faults.

One workload (jobs over fewer keys, so keys repeat and snapshots are used),
four workers, three conditions: fault-free; snapshot images deleted at random
at a set rate; the engine unreachable ``outage_s`` every ``period_s``. Both
sides reach Docker through the same ``OutageRelay`` in every condition. The
judge counts, per side: jobs done, failed or stuck, jobs run twice, two runs
of one key at once, and containers and images left behind.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from actors.engine.docker import DockerEngine
from actors.messages import SweepSnapshots
from actors.model import JobState, validate_spec
from bench.faults import ImageDeleter, OutageRelay, overlapping
from bench.model import Figure, ScenarioResult
from bench.peers.naive import run_naive
from bench.peers.raw import api_client
from bench.rigs import (
    BENCH_BASE_TAG,
    BENCH_LABELS,
    BENCH_REPOSITORY,
    RUN_LABEL,
    Progress,
    docker_engine,
    docker_rig,
    engine_socket,
    ensure_bench_base,
    sweep_docker,
)
from bench.s_memory import wait_idle

__all__ = ["Tally", "faults"]

WORKERS = 4


@dataclass
class Tally:
    """One side's run under one condition."""

    jobs: int
    succeeded: int = 0
    failed: int = 0
    stuck: int = 0
    run_twice: int = 0
    key_overlaps: int = 0
    leaked_containers: int = 0
    leaked_images: int = 0
    span_s: float = 0.0
    faults: int = 0

    @property
    def jobs_per_s(self) -> float:
        return self.succeeded / self.span_s if self.span_s > 0 else 0.0

    @property
    def wrong(self) -> int:
        return (
            self.failed
            + self.stuck
            + self.run_twice
            + self.key_overlaps
            + self.leaked_containers
            + self.leaked_images
        )


@dataclass(frozen=True)
class Condition:
    name: str
    delete_every_s: float = 0.0
    outage_s: float = 0.0
    period_s: float = 10.0


def _snapshot_images(direct: DockerEngine, run: str) -> list[str]:
    return [i.id for i in direct.list_images({RUN_LABEL: run})]


@contextlib.contextmanager
def _faulted(condition: Condition, direct: DockerEngine, run: str) -> Any:
    path = Path(tempfile.mkdtemp(prefix="snapyard-bench-relay-")) / "docker.sock"
    relay = OutageRelay(engine_socket(), path, condition.period_s, condition.outage_s)
    with relay:
        if condition.delete_every_s > 0:
            api = api_client(f"unix://{engine_socket()}")
            deleter = ImageDeleter(
                api, lambda: _snapshot_images(direct, run), condition.delete_every_s
            )
            with deleter:
                yield relay, lambda: deleter.deleted
        else:
            yield relay, lambda: relay.outages


def _snapyard(condition: Condition, workload: list[tuple[str, str]], setup_s: float) -> Tally:
    direct = docker_engine()
    tally = Tally(jobs=len(workload))
    sections: dict[str, dict[str, Any]] = {
        "worker": {"setup_seconds": setup_s},
        "supervisor": {"spawners": WORKERS, "max_workers": WORKERS},
        "snapshots": {"max_count": 1000},
    }
    run = f"snapyard-{condition.name}-{time.time_ns() % 10**8}"
    since = time.time() - 1.0
    with contextlib.ExitStack() as stack:
        # Last out: the rig's own sweep goes through the relay, which may be dark.
        stack.callback(sweep_docker, direct, since, {RUN_LABEL: run})
        relay, fault_count = stack.enter_context(_faulted(condition, direct, run))
        engine = DockerEngine(relay.url, 60.0)
        rig = stack.enter_context(docker_rig(engine, run=run, **sections))
        began = time.perf_counter()
        ids = [rig.app.submit(validate_spec(rig.project, item)).id for _, item in workload]
        progress = Progress(f"snapyard {condition.name}", len(ids))
        deadline = time.monotonic() + 600.0
        for job_id in ids:
            try:
                job = rig.app.wait(job_id, max(1.0, deadline - time.monotonic()))
            except TimeoutError:
                tally.stuck += 1
                continue
            if job.state is JobState.SUCCEEDED:
                tally.succeeded += 1
            else:
                tally.failed += 1
            progress()
        tally.span_s = time.perf_counter() - began
        tally.faults = fault_count()
        wait_idle(rig.app, 120.0)
        intervals: dict[Any, list[tuple[float, float]]] = {}
        for job_id in ids:
            job = rig.app.store.get(job_id)
            if job is None or job.started_at is None or job.finished_at is None:
                continue
            intervals.setdefault(job.key, []).append((job.started_at, job.finished_at))
            runs = [s for s, _, _ in rig.app.store.history(job_id) if s is JobState.RUNNING]
            tally.run_twice += int(len(runs) > 1)
        tally.key_overlaps = overlapping(intervals)
        # Deletions refused during an outage wait for the next sweep: run it now, lit.
        deadline = time.monotonic() + condition.period_s
        while relay.dark() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rig.app.snapshots_ref is not None
        rig.app.snapshots_ref.ask(SweepSnapshots())
        kept = {s.image_id for s in rig.app.snapshots()}
        tally.leaked_containers = len(direct.list_containers({RUN_LABEL: run}))
        tally.leaked_images = len(set(_snapshot_images(direct, run)) - kept)
    return tally


def _naive(condition: Condition, workload: list[tuple[str, str]], setup_s: float) -> Tally:
    direct = docker_engine()
    run = f"naive-{condition.name}-{time.time_ns() % 10**8}"
    labels = {**BENCH_LABELS, RUN_LABEL: run}
    since = time.time() - 1.0
    tally = Tally(jobs=len(workload))
    try:
        with _faulted(condition, direct, run) as (relay, fault_count):
            api = api_client(relay.url, timeout_s=60.0)
            out = run_naive(
                api,
                BENCH_BASE_TAG,
                BENCH_REPOSITORY,
                labels,
                [(key, setup_s) for key in workload],
                WORKERS,
                deadline_s=600.0,
                on_done=Progress(f"naive {condition.name}", len(workload)),
            )
            tally.faults = fault_count()
        tally.succeeded, tally.failed, tally.stuck = out.succeeded, out.failed, out.stuck
        tally.span_s = out.span_s
        tally.key_overlaps = overlapping(out.intervals)
        tally.leaked_containers = len(direct.list_containers({RUN_LABEL: run}))
        # Every image but the one each key's entry names: replaced, never deleted.
        tally.leaked_images = max(0, len(_snapshot_images(direct, run)) - len(set(out.kept)))
    finally:
        sweep_docker(direct, since, labels)
    return tally


def faults(quick: bool) -> ScenarioResult:
    """Throughput and correctness under faults, against the same side's fault-free run."""
    jobs, keys = (8, 4) if quick else (80, 16)
    setup_s = 0.2
    conditions = [
        Condition("clean"),
        Condition("deletions", delete_every_s=0.5 if quick else 1.0),
        Condition("outages", outage_s=0.5 if quick else 2.0, period_s=2.5 if quick else 10.0),
    ]
    ensure_bench_base(docker_engine())
    workload = [("bench-faults", f"item-{i % keys}") for i in range(jobs)]
    tallies: dict[str, dict[str, Tally]] = {"snapyard": {}, "naive": {}}
    for condition in conditions:
        tallies["snapyard"][condition.name] = _snapyard(condition, workload, setup_s)
        tallies["naive"][condition.name] = _naive(condition, workload, setup_s)
    figures = []
    for side, by_condition in tallies.items():
        clean = by_condition["clean"].jobs_per_s
        for name, tally in by_condition.items():
            done = tally.succeeded / tally.jobs
            figures.append(
                Figure(
                    f"{side}_{name}_completed",
                    done,
                    "fraction",
                    "higher",
                    side == "snapyard",
                    f"{tally.succeeded} of {tally.jobs}; target 1",
                )
            )
            figures.append(
                Figure(
                    f"{side}_{name}_wrong",
                    tally.wrong,
                    "count",
                    "lower",
                    note="failed+stuck+twice+overlaps+leaks",
                )
            )
            if name != "clean":
                figures.append(
                    Figure(
                        f"{side}_{name}_ratio",
                        tally.jobs_per_s / clean if clean else 0.0,
                        "ratio",
                        "higher",
                        side == "snapyard",
                        "jobs/s vs its clean run",
                    )
                )
    targets: dict[str, tuple[str, float]] = {}
    for c in conditions:
        targets[f"snapyard_{c.name}_completed"] = (">=", 1.0)
        targets[f"snapyard_{c.name}_wrong"] = ("<=", 0.0)
    notes = [
        f"{side} {name}: {t.succeeded}/{t.jobs} done, {t.failed} failed, {t.stuck} stuck, "
        f"{t.run_twice} run twice, {t.key_overlaps} key overlaps, {t.leaked_containers} "
        f"containers and {t.leaked_images} images leaked; {t.faults} faults; {t.jobs_per_s:.2f} jobs/s"
        for side, by in tallies.items()
        for name, t in by.items()
    ]
    return ScenarioResult(
        name="faults",
        notes=notes,
        title="8. Under faults: random snapshot deletions; engine unreachable on a schedule",
        figures=figures,
        samples={},
        params={
            "jobs": jobs,
            "keys": keys,
            "workers": WORKERS,
            "setup_seconds": setup_s,
            "conditions": [asdict(c) for c in conditions],
            "tallies": {
                side: {n: asdict(t) for n, t in by.items()} for side, by in tallies.items()
            },
        },
        targets=targets,
    )
