"""Three real hosts, one PostgreSQL, one registry: what every cluster test stands on.

Jobs print the wall-clock nanoseconds at which their container started and
ended, so the tests check "one active job per key" on what the containers
really did, across hosts, not on what the store says.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from session_labels import SNAPSHOT_REPOSITORY

from actors.client import ApiClient, ApiError, ApiUnreachable
from actors.engine.docker import DockerEngine
from actors.localcluster.cluster import LocalCluster
from actors.localcluster.postgres import LocalPostgres

TERMINAL = {"succeeded", "failed", "timed_out", "cancelled"}
# busybox date has no %N: /proc/uptime is shared by every container of the
# machine (one kernel), so it orders runs across the stand-in hosts.
STAMPED = (
    'echo "began $(cut -d" " -f1 /proc/uptime)"; {body}; echo "ended $(cut -d" " -f1 /proc/uptime)"'
)
_STAMP = re.compile(r"^(began|ended) ([0-9.]+)$", re.MULTILINE)

CLUSTER_ENV = {
    "SNAPYARD_SNAPSHOTS__REPOSITORY": SNAPSHOT_REPOSITORY,
    "SNAPYARD_WORKER__SETUP_SECONDS": "0.2",
    "SNAPYARD_SUPERVISOR__MAX_WORKERS": "3",
    "SNAPYARD_SUPERVISOR__STOP_GRACE_S": "1",
    "SNAPYARD_LOG__LEVEL": "INFO",
}


@contextmanager
def local_cluster(
    engine: DockerEngine,
    base_image: str,
    *,
    hosts: int = 3,
    env: dict[str, str] | None = None,
    database_url: Callable[[LocalPostgres, str], str] | None = None,
) -> Iterator[LocalCluster]:
    cluster = LocalCluster(
        engine,
        base_image,
        hosts=hosts,
        env={**CLUSTER_ENV, **(env or {})},
        database_url=database_url,
    )
    with cluster:
        yield cluster


def command(body: str) -> list[str]:
    return ["sh", "-c", STAMPED.format(body=body)]


def submit(client: ApiClient, project: str, item: str, body: str = "true") -> str:
    spec = {"project": project, "work_item": item, "command": command(body)}
    return str(client.submit(spec)["id"])


def read(client: ApiClient, job_id: str) -> dict[str, Any]:
    try:
        return client.job(job_id)
    except (ApiError, ApiUnreachable) as exc:
        return {"id": job_id, "state": f"unreadable: {exc}"}


def wait_until(what: Callable[[], bool], deadline_s: float, describe: Callable[[], str]) -> None:
    deadline = time.monotonic() + deadline_s
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {deadline_s}s: {describe()}")
        time.sleep(0.2)


def wait_terminal(
    client: ApiClient, ids: Iterable[str], deadline_s: float, cluster: LocalCluster
) -> dict[str, dict[str, Any]]:
    ids = list(ids)
    jobs: dict[str, dict[str, Any]] = {}

    def done() -> bool:
        pending = [i for i in ids if jobs.get(i, {}).get("state") not in TERMINAL]
        for job_id in pending:
            jobs[job_id] = read(client, job_id)
        return all(jobs[i].get("state") in TERMINAL for i in ids)

    def describe() -> str:
        stuck = [j for j in jobs.values() if j.get("state") not in TERMINAL]
        return f"{len(stuck)} jobs not done, e.g. {stuck[:3]}\n{cluster.logs()}"

    wait_until(done, deadline_s, describe)
    return jobs


def run_interval(client: ApiClient, job_id: str) -> tuple[float, float]:
    """When the job's (last) container really ran, from its own output."""
    stamps = dict((kind, float(value)) for kind, value in _STAMP.findall(client.logs(job_id)))
    return stamps["began"], stamps["ended"]


def history(pg: LocalPostgres, job_id: str) -> list[tuple[str, str | None]]:
    """The job's state changes as the database has them, oldest first."""
    with psycopg.connect(pg.url) as conn:
        rows = conn.execute(
            "SELECT state, note FROM job_history WHERE job_id = %s ORDER BY seq", (job_id,)
        ).fetchall()
    return [(str(state), note) for state, note in rows]


def lease_until(pg: LocalPostgres, host_id: str) -> float:
    with psycopg.connect(pg.url) as conn:
        row = conn.execute(
            "SELECT lease_until FROM hosts WHERE host_id = %s", (host_id,)
        ).fetchone()
    assert row is not None, f"no hosts row for {host_id}"
    return float(row[0])


def assert_one_active_per_key(intervals: dict[str, list[tuple[float, float, str]]]) -> None:
    """Per key, the containers' [began, ended] intervals never overlap, on any host."""
    for key, runs in intervals.items():
        runs.sort()
        for (_b1, e1, j1), (b2, _e2, j2) in itertools.pairwise(runs):
            assert e1 <= b2, f"{key}: job {j2} began at {b2} before job {j1} ended at {e1}"
