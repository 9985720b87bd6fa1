"""The script users write instead of Snapyard, and the bookkeeping that judges it.

``NaiveScript`` is the seed's algorithm without actors, as a user writes it
in about sixty lines: a thread pool, a dict of (project, work item) -> snapshot
tag, a retry on the base image when the create 404s on a vanished snapshot,
and a commit when the job exits 0. Nothing more: no per-key serialisation, no
retry on an unreachable engine, no deletion of the image a new commit
replaces. ``run_naive`` runs it on a workload and counts what it gets wrong
(failed or stuck jobs, two jobs of one key at once, leaked containers and
images) next to how fast it went.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import docker.errors

from bench.peers.raw import container_kwargs

__all__ = ["JudgedScript", "NaiveOutcome", "NaiveScript", "run_naive"]

Key = tuple[str, str]


# --- the script (what a user writes) ------------------------------------------


class NaiveScript:
    def __init__(
        self,
        api: Any,
        base: str,
        repository: str,
        labels: Mapping[str, str],
        workers: int,
        commit: bool = True,
    ) -> None:
        self.api = api
        self.base = base
        self.repository = repository
        self.labels = dict(labels)
        self.commit = commit
        self.snapshots: dict[Key, str] = {}  # (project, work item) -> image tag
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="naive")

    def submit(self, key: Key, job_id: str, setup_s: float) -> Future[int]:
        return self.pool.submit(self.run_job, key, job_id, setup_s)

    def create(self, image: str, job_id: str, setup_s: float) -> str:
        kwargs = container_kwargs(self.api, image, job_id, self.labels, setup_s)
        return str(self.api.create_container(**kwargs)["Id"])

    def run_job(self, key: Key, job_id: str, setup_s: float) -> int:
        image = self.snapshots.get(key, self.base)
        try:
            cid = self.create(image, job_id, setup_s)
        except docker.errors.ImageNotFound:  # the snapshot is gone: forget it, use the base
            self.snapshots.pop(key, None)
            cid = self.create(self.base, job_id, setup_s)
        self.api.start(cid)
        code = int(self.api.wait(cid)["StatusCode"])
        if code == 0 and self.commit:
            tag = f"{key[0]}-{key[1]}-{job_id}".lower()
            self.api.commit(cid, repository=self.repository, tag=tag)
            self.snapshots[key] = f"{self.repository}:{tag}"
        self.api.remove_container(cid)
        return code

    def close(self) -> None:
        self.pool.shutdown(wait=True)


# --- the judge (what the benchmark adds around it) ------------------------------


@dataclass
class NaiveOutcome:
    """What the script did with a workload: its speed and its mistakes."""

    jobs: int
    succeeded: int = 0
    failed: int = 0
    stuck: int = 0
    span_s: float = 0.0
    intervals: dict[Key, list[tuple[float, float]]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    snapshot_404s: int = 0
    kept: list[str] = field(default_factory=list)  # the dict's tags at the end

    @property
    def jobs_per_s(self) -> float:
        return self.succeeded / self.span_s if self.span_s > 0 else 0.0


class JudgedScript(NaiveScript):
    """The script, with each job's span recorded and its 404 fallbacks counted."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()
        self.intervals: dict[Key, list[tuple[float, float]]] = {}
        self.fallbacks = 0

    def create(self, image: str, job_id: str, setup_s: float) -> str:
        try:
            return super().create(image, job_id, setup_s)
        except docker.errors.ImageNotFound:
            with self.lock:
                self.fallbacks += 1
            raise

    def run_job(self, key: Key, job_id: str, setup_s: float) -> int:
        began = time.time()
        try:
            return super().run_job(key, job_id, setup_s)
        finally:
            with self.lock:
                self.intervals.setdefault(key, []).append((began, time.time()))


def run_naive(
    api: Any,
    base: str,
    repository: str,
    labels: Mapping[str, str],
    workload: Sequence[tuple[Key, float]],
    workers: int,
    *,
    commit: bool = True,
    deadline_s: float = 300.0,
    on_done: Callable[[], None] | None = None,
) -> NaiveOutcome:
    """Submit every (key, setup seconds) at once, wait up to ``deadline_s`` for them all."""
    script = JudgedScript(api, base, repository, labels, workers, commit)
    outcome = NaiveOutcome(jobs=len(workload))
    began = time.perf_counter()
    futures = [
        script.submit(key, f"naive-{i}", setup_s) for i, (key, setup_s) in enumerate(workload)
    ]
    end = time.monotonic() + deadline_s
    last = began
    for future in futures:
        try:
            code = future.result(timeout=max(0.0, end - time.monotonic()))
        except FutureTimeout:
            outcome.stuck += 1
            continue
        except Exception as exc:
            outcome.failed += 1
            name = type(exc).__name__
            outcome.errors[name] = outcome.errors.get(name, 0) + 1
        else:
            if code == 0:
                outcome.succeeded += 1
            else:
                outcome.failed += 1
        last = time.perf_counter()
        if on_done is not None:
            on_done()
    outcome.span_s = last - began
    if outcome.stuck == 0:
        script.close()
    else:  # a stuck thread would hang shutdown; it is counted and abandoned
        script.pool.shutdown(wait=False, cancel_futures=True)
    outcome.intervals = script.intervals
    outcome.snapshot_404s = script.fallbacks
    outcome.kept = list(script.snapshots.values())
    return outcome
