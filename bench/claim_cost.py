"""Claim cost on the cluster's PostgreSQL store with 1k and 100k queued jobs.

Issue 14's target: flat, the 100k claim within 1.5x of the 1k one. Two
shapes, each against its own fill of the queue:
- ``local``: the host holds the newest snapshot of every third key (step 1
  of the claim: its own queued work, in order, through ``jobs_home``);
- ``queue``: another live host holds every third key's, which waits for it
  (step 2: the walk of the queue that skips them).
Either way the snapshot index grows with the queue (a third of its keys).
Each sample is one ``claim(1)``; the job then ends and its key gets a new
job, so the queue keeps its length. Run alone: ``python -m bench.claim_cost [--quick]``; the scenario
function ``claim_cost`` returns a ``ScenarioResult`` for ``python -m bench``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from typing import Any

import psycopg

from actors.localcluster import LocalPostgres
from actors.model import Job, JobSpec, JobState
from actors.store import Caps, new_job_id
from actors.store.cluster import SnapshotRecord
from actors.store.postgres import PostgresStore
from actors.store.rows import COLUMNS, row_of
from bench.model import Figure, ScenarioResult, median

NOW = 1_800_000_000.0
JOBS_PER_KEY = 10
WAIT_S = 60.0
SIZES = (1_000, 100_000)
ROUND = 20  # claims on one queue before the next queue's turn


def _fill(url: str, queued: int) -> None:
    """``queued`` jobs over ``queued / JOBS_PER_KEY`` keys, interleaved in submission
    order, all queued just now: a key whose snapshot is on another live host waits."""
    keys = max(1, queued // JOBS_PER_KEY)
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.cursor().copy(f"COPY jobs ({', '.join(COLUMNS)}, holds_key) FROM STDIN") as copy:
            for i in range(queued):
                key = i % keys
                spec = JobSpec(f"project-{key % 7}", f"item-{key}")
                job = Job(new_job_id(), spec, JobState.QUEUED, NOW - queued + i, queued_at=NOW)
                copy.write_row((*row_of(job), False))
        conn.execute("ANALYZE jobs")


def _snapshots(store: PostgresStore, other: PostgresStore, keys: int, shape: str) -> None:
    """Every third key's newest snapshot is on this host (``local``) or on the
    other live host (``queue``): the snapshot index grows with the queue."""
    host = store if shape == "local" else other
    for key in range(0, keys, 3):
        spec = JobSpec(f"project-{key % 7}", f"item-{key}")
        host.record_snapshot(
            SnapshotRecord(spec.key, "default", host.host_id, f"sha256:{key:064x}", NOW, None)
        )


_resubmitted = itertools.count(1)


def _measure(store: PostgresStore, other: PostgresStore, claims: int) -> list[float]:
    """Time ``claims`` claims of ``store``; the other host claims its own work in
    between (untimed), as it would in a cluster. Each claimed job ends and its
    key gets a new job at the back of the queue: the queue keeps its length and mix."""
    samples: list[float] = []
    for _ in range(claims):
        started = time.perf_counter()
        got = store.claim(1, NOW + 1, Caps.none())
        samples.append(time.perf_counter() - started)
        for host, job in [(store, job) for job in got] + [
            (other, job) for job in other.claim(1, NOW + 1, Caps.none())
        ]:
            host.update(dataclasses.replace(job, state=JobState.SUCCEEDED, finished_at=NOW + 1))
            again = Job(new_job_id(), job.spec, JobState.QUEUED, NOW + next(_resubmitted))
            host.add(dataclasses.replace(again, queued_at=NOW))
    return samples


def _database(server: LocalPostgres, name: str) -> str:
    """A fresh database on the server, migrated: one per queue length."""
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    url = server.url.rsplit("/", 1)[0] + "/" + name
    PostgresStore(url, "migrate").close()
    return url


def _compare(server: LocalPostgres, shape: str, claims: int) -> dict[int, list[float]]:
    """Claims on every queue length in turn, a round at a time: the machine's
    load drifts alike for all of them (other work shares these cores)."""
    stores: dict[int, PostgresStore] = {}
    others: dict[int, PostgresStore] = {}
    try:
        for size in SIZES:
            url = _database(server, f"bench_{shape}_{size // 1000}k")
            _fill(url, size)
            store = PostgresStore(url, "bench", locality_wait_s=WAIT_S)
            other = PostgresStore(url, "other", locality_wait_s=WAIT_S)
            stores[size], others[size] = store, other
            for host in (store, other):
                host.heartbeat(NOW, 3600.0, api="127.0.0.1:0", max_workers=4, running=0)
            _snapshots(store, other, max(1, size // JOBS_PER_KEY), shape)
            _measure(store, other, 20)  # warm the caches and the prepared statements
        samples: dict[int, list[float]] = {size: [] for size in SIZES}
        for _ in range(claims // ROUND):
            for size, store in stores.items():
                samples[size] += _measure(store, others[size], ROUND)
        return samples
    finally:
        for opened in (*stores.values(), *others.values()):
            opened.close()


def claim_cost(quick: bool) -> ScenarioResult:
    """Median claim time per queue length and shape, and the 100k / 1k ratios."""
    claims = 100 if quick else 400
    started = time.perf_counter()
    samples: dict[str, list[float]] = {}
    figures: list[Figure] = []
    with LocalPostgres() as server:
        for shape in ("local", "queue"):
            by_size = _compare(server, shape, claims)
            for size, values in by_size.items():
                samples[f"{shape}_{size}"] = values
            small, large = (median(by_size[size]) for size in SIZES)
            figures += [
                Figure(f"{shape}_claim_1k", small * 1e3, "ms", "lower"),
                Figure(f"{shape}_claim_100k", large * 1e3, "ms", "lower"),
                Figure(
                    f"{shape}_100k_over_1k",
                    large / small,
                    "x",
                    "lower",
                    checked=True,
                    note="target <= 1.5",
                ),
            ]
    params: dict[str, Any] = {"claims": claims, "jobs_per_key": JOBS_PER_KEY, "sizes": SIZES}
    return ScenarioResult(
        name="claim_cost",
        title="Cluster claim cost on PostgreSQL: 1k vs 100k queued jobs",
        figures=figures,
        samples=samples,
        params=params,
        seconds=time.perf_counter() - started,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer claims per sample")
    result = claim_cost(parser.parse_args().quick)
    for figure in result.figures:
        print(f"{figure.name:24} {figure.value:8.3f} {figure.unit}  {figure.note}")
    print(f"({result.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
