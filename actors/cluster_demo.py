"""``snapyard cluster-demo``: three hosts, one queue, snapshots that follow their work.

On this one machine it starts a throwaway PostgreSQL, a registry on
127.0.0.1 and three extra Docker daemons, each with a ``snapyard run`` on it
(``actors.localcluster``), then tells the story and checks every step, as
``snapyard demo`` does for one host: jobs spread out, a work item sticks to
the host that holds its snapshot, and when that host dies its job is rescued
and finishes on another host from the snapshot pulled out of the registry.
Everything it starts is stopped and deleted at the end, whatever happened.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, TextIO

from actors.client import ApiClient, ApiError, ApiUnreachable
from actors.demo import DEMO_REPOSITORY, Story
from actors.engine.docker import DockerEngine
from actors.localcluster.cluster import LocalCluster
from actors.settings import Settings
from actors.worker_image import ensure_base_image

__all__ = ["run_cluster_demo"]

HOSTS = 3
WORK_ITEMS = 6
SETUP_SECONDS = 2.0
# Long enough to kill its host mid-run; the rescued run pays it again.
LONG_JOB_S = 6
JOB_DEADLINE_S = 120.0
_TERMINAL = {"succeeded", "failed", "timed_out", "cancelled"}
# What the worker's entrypoint prints (actors/worker/entrypoint.sh).
_SETUP_PAID = "setup starting"
_SETUP_SKIPPED = "setup skipped"


def _wait_all(client: ApiClient, ids: list[str], deadline_s: float) -> list[dict[str, Any]]:
    """Poll until every job is terminal (or the deadline passes); the jobs as they are."""
    deadline = time.monotonic() + deadline_s
    while True:
        jobs = [_read(client, job_id) for job_id in ids]
        if all(j.get("state") in _TERMINAL for j in jobs) or time.monotonic() > deadline:
            return jobs
        time.sleep(0.2)


def _read(client: ApiClient, job_id: str) -> dict[str, Any]:
    try:
        return client.job(job_id)
    except (ApiError, ApiUnreachable) as exc:
        return {"id": job_id, "state": f"unreadable ({exc})"}


def _wait_for(what: Callable[[], bool], deadline_s: float) -> bool:
    deadline = time.monotonic() + deadline_s
    while not what():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _submit(client: ApiClient, project: str, item: str, command: str) -> str:
    spec = {"project": project, "work_item": item, "command": ["sh", "-c", command]}
    return str(client.submit(spec)["id"])


def _tell(story: Story, cluster: LocalCluster, project: str) -> None:
    out = story.out
    client = cluster.hosts[0].supervisor.client()
    items = [f"item-{n}" for n in range(1, WORK_ITEMS + 1)]

    ids = [_submit(client, project, item, "echo first run") for item in items]
    first = _wait_all(client, ids, JOB_DEADLINE_S)
    where = {job["work_item"]: job.get("host") for job in first}
    used = sorted({h for h in where.values() if h})
    print(
        f"2. {len(items)} work items submitted to host-1's API; they ran on {', '.join(used)}:",
        file=out,
    )
    for job in first:
        print(f"   {job['work_item']}: {job['state']} on {job.get('host')}, setup paid", file=out)
    story.check(
        "spread", all(j["state"] == "succeeded" for j in first), f"not all succeeded: {first}"
    )
    story.check("spread", len(used) >= 2, f"every job ran on {used}: the work did not spread")

    ids = [_submit(client, project, item, "echo second run") for item in items]
    second = _wait_all(client, ids, JOB_DEADLINE_S)
    stuck = [
        j for j in second if j.get("host") != where[j["work_item"]] or not j.get("from_snapshot")
    ]
    print(
        f"3. a second job per work item: {len(second) - len(stuck)} of {len(second)} ran on the "
        "host holding their snapshot, from it (setup skipped)",
        file=out,
    )
    story.check("affinity", not stuck, f"these left their snapshot's host: {stuck}")
    paid = [j["id"] for j in second if _SETUP_SKIPPED not in client.logs(j["id"])]
    story.check("affinity", not paid, f"these paid the setup again: {paid}")

    item = items[0]
    victim = cluster.host(str(where[item]))
    # Ask a host that survives: the CLI of any host shows the whole cluster.
    reader = next(h for h in cluster.hosts if h is not victim).supervisor.client()
    long_id = _submit(reader, project, item, f"sleep {LONG_JOB_S}; echo long run done")
    story.check(
        "kill",
        _wait_for(lambda: _read(reader, long_id).get("state") == "running", JOB_DEADLINE_S),
        f"the long job never ran: {_read(reader, long_id)}",
    )
    print(
        f"4. a {LONG_JOB_S}s job of {item} runs on {_read(reader, long_id).get('host')}; "
        f"{victim.name} is killed (SIGKILL to its supervisor and its dockerd)",
        file=out,
    )
    killed_at = time.monotonic()
    victim.kill()
    rescued = _wait_all(reader, [long_id], JOB_DEADLINE_S)[0]
    print(
        f"5. {victim.name}'s lease ran out; its job was re-queued (attempt {rescued.get('attempt')}) "
        f"and finished on {rescued.get('host')}: {rescued['state']} "
        f"{time.monotonic() - killed_at:.1f}s after the kill, "
        f"{'from the snapshot pulled from the registry' if rescued.get('from_snapshot') else 'from the base image'}",
        file=out,
    )
    story.check("rescue", rescued["state"] == "succeeded", f"rescued job: {rescued}")
    story.check(
        "rescue", rescued.get("host") not in (None, victim.name), f"ran on {rescued.get('host')}"
    )
    story.check("rescue", bool(rescued.get("attempt")), "the rescue did not start a new attempt")
    story.check(
        "rescue", bool(rescued.get("from_snapshot")), "it did not start from the pulled snapshot"
    )

    victim.restart()
    back = _wait_for(
        lambda: any(h["host_id"] == victim.name and h["live"] for h in reader.hosts()), 30.0
    )
    print(
        f"6. {victim.name} restarted: {'live again' if back else 'NOT back'} in `snapyard hosts`",
        file=out,
    )
    story.check("rejoin", back, f"{victim.name} did not rejoin")


def run_cluster_demo(settings: Settings, engine: DockerEngine, out: TextIO) -> int:
    """Tell the story; 0 only if every step behaved. Needs root (dockerd, PostgreSQL)."""
    story = Story(out)
    project = f"cluster-demo-{uuid.uuid4().hex[:6]}"
    image = settings.worker.image
    base_id, _ = ensure_base_image(engine, image)
    print(f"Snapyard cluster demo: {HOSTS} hosts, base image {image} ({base_id[7:19]})", file=out)
    env = {
        "SNAPYARD_SNAPSHOTS__REPOSITORY": DEMO_REPOSITORY,
        "SNAPYARD_WORKER__SETUP_SECONDS": str(SETUP_SECONDS),
        "SNAPYARD_SUPERVISOR__MAX_WORKERS": "2",
    }
    say = lambda line: print(f"   {line}", file=out)  # noqa: E731
    print("1. starting the cluster on this machine:", file=out)
    cluster = LocalCluster(engine, image, hosts=HOSTS, env=env, say=say)
    try:
        cluster.start()
        _tell(story, cluster, project)
    except Exception as exc:
        story.failures.append(f"{type(exc).__name__}: {exc}")
        print(f"   !! {type(exc).__name__}: {exc}", file=out)
    finally:
        if story.failures:
            print(cluster.logs(), file=out)
        cluster.close()
    if story.failures:
        print(f"cluster demo FAILED: {'; '.join(story.failures)}", file=out)
        return 1
    print(
        "cluster demo ok: every step behaved; everything it started is stopped and deleted",
        file=out,
    )
    return 0
