"""The cluster on real engines: three dockerds, one PostgreSQL, one registry.

Each test starts its own cluster (about 5 s) and breaks it in one way: a host
killed, a host cut off from the database, the database restarted, the
registry down. What must hold whatever happens: every job ends exactly once,
never two containers of one key run at once anywhere, nothing is lost.
"""

from __future__ import annotations

import collections
import itertools
import time
import uuid
from typing import Any

import pytest
from real_cluster_kit import (
    TERMINAL,
    assert_one_active_per_key,
    history,
    lease_until,
    local_cluster,
    read,
    run_interval,
    submit,
    wait_terminal,
    wait_until,
)
from tcp_proxy import TcpProxy

from actors.engine.docker import DockerEngine
from actors.localcluster.cluster import LocalCluster

pytestmark = [pytest.mark.docker, pytest.mark.postgres, pytest.mark.slow]

JOBS = 300
ITEMS = 30
DEADLINE_S = 300.0


def _project() -> str:
    return f"cl-{uuid.uuid4().hex[:8]}"


def _ran_once(cluster: LocalCluster, job: dict[str, Any]) -> None:
    assert cluster.postgres is not None
    states = [state for state, _note in history(cluster.postgres, job["id"])]
    terminal = [s for s in states if s in TERMINAL]
    assert terminal == [job["state"]], f"{job['id']} ended {terminal}: {states}"


def test_300_jobs_on_30_items_end_once_one_per_key_and_stay_local(
    docker_engine: DockerEngine, base_image: str
) -> None:
    project = _project()
    with local_cluster(docker_engine, base_image) as cluster:
        client = cluster.hosts[0].supervisor.client()
        ids = [submit(client, project, f"item-{n % ITEMS}") for n in range(JOBS)]
        jobs = wait_terminal(client, ids, DEADLINE_S, cluster)

        assert {j["state"] for j in jobs.values()} == {"succeeded"}, [
            j for j in jobs.values() if j["state"] != "succeeded"
        ][:3]
        for job in jobs.values():
            _ran_once(cluster, job)
        intervals: dict[str, list[tuple[float, float, str]]] = collections.defaultdict(list)
        for job in jobs.values():
            began, ended = run_interval(client, job["id"])
            intervals[job["work_item"]].append((began, ended, job["id"]))
        assert_one_active_per_key(intervals)

        assert len({j["host"] for j in jobs.values()}) == 3, "the work did not spread"
        # A job whose key already had a snapshot: did it start from it, on its host?
        by_item: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for job_id in ids:
            by_item[jobs[job_id]["work_item"]].append(jobs[job_id])
        later = [j for runs in by_item.values() for j in runs[1:]]
        local = [
            j
            for runs in by_item.values()
            for a, j in itertools.pairwise(runs)
            if j["from_snapshot"] and j["host"] == a["host"]
        ]
        assert len(local) >= 0.95 * len(later), (
            f"only {len(local)} of {len(later)} jobs started from a local snapshot"
        )


def test_a_killed_host_s_job_finishes_elsewhere_from_the_pulled_snapshot(
    docker_engine: DockerEngine, base_image: str
) -> None:
    project = _project()
    with local_cluster(docker_engine, base_image) as cluster:
        assert cluster.postgres is not None
        client = cluster.hosts[0].supervisor.client()
        first = wait_terminal(client, [submit(client, project, "item")], 120, cluster)
        (job,) = first.values()
        victim = cluster.host(job["host"])
        reader = next(h for h in cluster.hosts if h is not victim).supervisor.client()

        long_id = submit(reader, project, "item", "sleep 8")
        wait_until(
            lambda: read(reader, long_id).get("state") == "running",
            120,
            lambda: f"{read(reader, long_id)}\n{cluster.logs()}",
        )
        assert read(reader, long_id)["host"] == victim.name, "it did not stick to its snapshot"
        victim.kill()
        killed_lease = lease_until(cluster.postgres, victim.name)

        done = wait_terminal(reader, [long_id], 120, cluster)[long_id]
        assert done["state"] == "succeeded", done
        assert done["host"] != victim.name
        assert done["attempt"] == 1
        assert done["from_snapshot"] is True, "the rescue did not pull the snapshot"
        assert "setup skipped" in reader.logs(long_id)
        states = [s for s, _ in history(cluster.postgres, long_id)]
        assert states.count("queued") == 2, states  # submitted, then rescued
        _ran_once(cluster, done)
        assert time.time() > killed_lease  # rescued only after the dead host's lease

        victim.restart()
        wait_until(
            lambda: any(h["host_id"] == victim.name and h["live"] for h in reader.hosts()),
            60,
            lambda: f"{reader.hosts()}\n{cluster.logs()}",
        )
        again = wait_terminal(reader, [submit(reader, project, "other")], 120, cluster)
        assert {j["state"] for j in again.values()} == {"succeeded"}


def test_a_host_cut_off_from_the_database_stops_its_worker_and_writes_nothing_after(
    docker_engine: DockerEngine, base_image: str
) -> None:
    project = _project()
    proxies: dict[str, TcpProxy] = {}

    def through_proxy(pg: Any, host: str) -> str:
        proxies[host] = TcpProxy(pg.port)
        return pg.url.replace(f":{pg.port}/", f":{proxies[host].port}/")

    try:
        with local_cluster(
            docker_engine, base_image, hosts=2, database_url=through_proxy
        ) as cluster:
            assert cluster.postgres is not None
            client = cluster.hosts[0].supervisor.client()
            first = wait_terminal(client, [submit(client, project, "item")], 120, cluster)
            victim = cluster.host(next(iter(first.values()))["host"])
            other = next(h for h in cluster.hosts if h is not victim)
            reader = other.supervisor.client()
            long_id = submit(reader, project, "item", "sleep 15")
            wait_until(
                lambda: read(reader, long_id).get("state") == "running",
                120,
                lambda: f"{read(reader, long_id)}\n{cluster.logs()}",
            )
            assert read(reader, long_id)["host"] == victim.name

            proxies[victim.name].cut()
            engine = victim.dockerd.engine()
            wait_until(
                lambda: not [c for c in engine.list_containers({}) if c.status == "running"],
                60,
                lambda: f"the cut-off host's worker still runs\n{cluster.logs()}",
            )
            stopped_at = time.time()
            assert stopped_at < lease_until(cluster.postgres, victim.name), (
                "the worker outlived its host's lease"
            )

            done = wait_terminal(reader, [long_id], 120, cluster)[long_id]
            assert done["state"] == "succeeded", done
            assert done["host"] == other.name
            assert done["attempt"] == 1
            _ran_once(cluster, done)

            proxies[victim.name].heal()
            wait_until(
                lambda: any(h["host_id"] == victim.name and h["live"] for h in reader.hosts()),
                60,
                lambda: f"{reader.hosts()}\n{cluster.logs()}",
            )
            # Back and claiming again: a job of its own runs, and the rescued
            # attempt's row is exactly as the rescuer left it.
            again = wait_terminal(reader, [submit(reader, project, "after")], 120, cluster)
            assert {j["state"] for j in again.values()} == {"succeeded"}
            assert read(reader, long_id) == done
            _ran_once(cluster, done)
    finally:
        for proxy in proxies.values():
            proxy.close()


def test_postgres_restarted_mid_run_loses_nothing(
    docker_engine: DockerEngine, base_image: str
) -> None:
    project = _project()
    with local_cluster(docker_engine, base_image) as cluster:
        assert cluster.postgres is not None
        client = cluster.hosts[0].supervisor.client()
        ids = [submit(client, project, f"item-{n % 10}", "sleep 0.5") for n in range(40)]
        wait_until(
            lambda: any(read(client, i).get("state") == "succeeded" for i in ids),
            120,
            cluster.logs,
        )
        cluster.postgres.restart()
        jobs = wait_terminal(client, ids, DEADLINE_S, cluster)
        assert {j["state"] for j in jobs.values()} == {"succeeded"}, [
            j for j in jobs.values() if j["state"] != "succeeded"
        ][:3]
        for job in jobs.values():
            _ran_once(cluster, job)
        live = {h["host_id"] for h in client.hosts() if h["live"]}
        assert live == {h.name for h in cluster.hosts}


def test_registry_down_jobs_start_from_base_and_pushes_resume(
    docker_engine: DockerEngine, base_image: str
) -> None:
    project = _project()
    with local_cluster(
        docker_engine, base_image, env={"SNAPYARD_CLUSTER__LOCALITY_WAIT_S": "0"}
    ) as cluster:
        assert cluster.registry is not None
        assert cluster.postgres is not None
        cluster.registry.stop()
        client = cluster.hosts[0].supervisor.client()
        ids = [submit(client, project, f"item-{n % 4}") for n in range(24)]
        jobs = wait_terminal(client, ids, DEADLINE_S, cluster)
        assert {j["state"] for j in jobs.values()} == {"succeeded"}
        # With no registry and no locality wait, a job on another host than
        # its key's snapshot started from base: never a failure.
        moved = [j for j in jobs.values() if not j["from_snapshot"]]
        assert moved, "no job started from base"

        cluster.registry.start()
        import psycopg

        def all_pushed() -> bool:
            with psycopg.connect(cluster.postgres.url) as conn:  # type: ignore[union-attr]
                rows = conn.execute(
                    "SELECT digest FROM snapshots WHERE project = %s", (project,)
                ).fetchall()
            return len(rows) == 4 and all(digest for (digest,) in rows)

        wait_until(all_pushed, 120, lambda: f"pushes not retried\n{cluster.logs()}")
