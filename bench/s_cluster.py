"""Scenario 9, the cluster (issue 14): hosts scale out, a claim stays cheap, work stays local.

Each host is a whole host's wiring (``actors.wiring.start_actors`` with
``Wiring.cluster``, as ``tests/cluster_kit.py`` builds them) on its own
MemoryEngine and its own ``PostgresStore`` connection; every host shares one
throwaway PostgreSQL (``LocalPostgres``, a fresh database per run) and one
MemoryRegistry. Real time, real timers: leases, the Waker's LISTEN/NOTIFY, the
shipper's pushes all run as on a real host. The engine's ``start_container``
takes 300 ms (the MemoryEngine's ``delay`` hook), so a host's capacity is its
``max_workers`` over that latency and what the cluster adds shows as lost
scaling.

- **throughput**: the same load per host (trivial jobs, one work item each) on
  1, 2 and 3 hosts; target: 3 hosts >= 2.7x one host.
- **claim cost**: ``bench.claim_cost`` (1k against 100k queued jobs); target:
  100k within 1.5x of 1k.
- **affinity**: three hosts, work items that each run a chain of jobs (a new
  job of every item once its previous one ended, as an agent's next task
  arrives); of the jobs whose item had a snapshot, how many started from it
  on the host that held it (not pulled, not from base); target >= 95%. The
  figure is the delay scheduling's doing: with ``locality_wait_s`` 0 the same
  load measured 0.57 (39 pulls for 90 such jobs).
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pykka

from actors.clock import SystemClock
from actors.engine.memory import MemoryEngine, MemoryRegistry
from actors.localcluster import LocalPostgres
from actors.messages import GetStatus, Submit
from actors.model import Job, JobState, SnapshotKey, validate_spec
from actors.settings import Settings
from actors.store.postgres import PostgresStore
from actors.wiring import Actors, ClusterWiring, Wiring, start_actors
from bench.claim_cost import _database as fresh_database
from bench.claim_cost import claim_cost
from bench.model import Figure, ScenarioResult, median
from bench.rigs import BENCH_LABELS, BenchError, Progress, bench_settings

__all__ = ["affinity_hits", "cluster"]

START_LATENCY_S = 0.3
HOST_COUNTS = (1, 2, 3)
MAX_WORKERS = 4
LOCALITY_WAIT_S = 10.0  # the default of cluster.locality_wait_s
REGISTRY = "127.0.0.1:5000"  # the MemoryRegistry's name: no socket behind it
BASE_TAG = "snapyard-worker:bench-cluster"
ASK_S = 30.0
_POLL_S = 0.02


class _Host:
    """One cluster host: its MemoryEngine (start latency injected), its store, its actors."""

    def __init__(
        self, name: str, url: str, registry: MemoryRegistry, base: str, data_dir: Path
    ) -> None:
        self.name = name
        self.clock = SystemClock()
        self.engine = MemoryEngine(clock=self.clock, registry=registry, exit_policy=lambda _c: 0)
        self.engine.delay("start_container", START_LATENCY_S)
        # The base image as `docker save | load` brings it: one image ID on every host.
        base_id = self.engine.pull_image(base)
        self.engine.tag_image(base_id, *BASE_TAG.split(":"))
        self.settings = _settings(url, name, data_dir / name)
        self.store = PostgresStore(url, name, self.clock, LOCALITY_WAIT_S)
        self.fatal: list[str] = []
        self.actors: Actors | None = start_actors(
            Wiring(
                self.engine,
                self.store,
                self.settings,
                self.clock,
                container_labels=BENCH_LABELS,
                on_fatal=self.fatal.append,
                base_image_ids={BASE_TAG: base_id},
                cluster=ClusterWiring(
                    self.store,
                    mover=self.engine,
                    delete_manifest=registry.delete_manifest,
                    api=f"{name}:0",
                    wait_for_work=self.store.wait_for_work,
                ),
            )
        )
        self.supervisor.ask(GetStatus(), timeout=ASK_S)  # started means recovered

    @property
    def supervisor(self) -> pykka.ActorRef[Any]:
        assert self.actors is not None
        assert self.actors.supervisor is not None
        return self.actors.supervisor

    def submit(self, work_item: str) -> Job:
        job = self.supervisor.ask(Submit(validate_spec("bench", work_item)), timeout=ASK_S)
        assert isinstance(job, Job)
        return job

    def pulls(self) -> int:
        return len(self.engine.calls_of("pull_image")) - 1  # less the base image's

    def close(self) -> None:
        if self.actors is not None:
            self.actors.stop(ASK_S)
            self.actors = None
        self.store.close()


def _settings(url: str, name: str, data_dir: Path) -> Settings:
    return bench_settings(
        data_dir,
        worker={"image": BASE_TAG, "setup_seconds": 0.0},
        supervisor={"instance_id": "bench-cluster", "max_workers": MAX_WORKERS},
        cluster={
            "database_url": url,
            "host_id": name,
            "registry": REGISTRY,
            "locality_wait_s": LOCALITY_WAIT_S,
            "heartbeat_s": 1.0,
            "lease_s": 10.0,
        },
    )


@contextlib.contextmanager
def _cluster(url: str, hosts: int) -> Iterator[list[_Host]]:
    """``hosts`` hosts on the database at ``url``, sharing one fresh MemoryRegistry."""
    registry = MemoryRegistry(REGISTRY)
    seed = MemoryEngine(registry=registry)
    base = seed.push_image(seed.add_worker_image(BASE_TAG), f"{REGISTRY}/base")
    data_dir = Path(tempfile.mkdtemp(prefix="snapyard-bench-cluster-"))
    started: list[_Host] = []
    try:
        for i in range(hosts):
            started.append(_Host(f"host-{i + 1}", url, registry, base, data_dir))
        yield started
        fatal = [f"{h.name}: {message}" for h in started for message in h.fatal]
        if fatal:
            raise BenchError(f"a host's supervisor gave up: {'; '.join(fatal)}")
    finally:
        # In parallel: each host's stop waits out its Waker's LISTEN (up to a heartbeat).
        with ThreadPoolExecutor(max(1, len(started))) as pool:
            list(pool.map(_Host.close, started))
        shutil.rmtree(data_dir, ignore_errors=True)


def _wait_done(observer: PostgresStore, total: int, timeout_s: float) -> None:
    """Until ``total`` jobs are terminal in the cluster's store."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = observer.count_by_state()
        if sum(n for state, n in counts.items() if state.terminal) >= total:
            return
        time.sleep(_POLL_S)
    raise BenchError(f"the cluster did not finish {total} jobs within {timeout_s:g}s: {counts}")


def _all_jobs(observer: PostgresStore, total: int) -> list[Job]:
    jobs = observer.list(limit=total + 1)
    failed = [j for j in jobs if j.state is not JobState.SUCCEEDED]
    if len(jobs) != total or failed:
        raise BenchError(f"{len(jobs)} jobs of {total}; not succeeded: {failed[:3]}")
    return jobs


def _submit_all(cluster: list[_Host], work_items: list[str]) -> None:
    """Each host's share of ``work_items`` through its own supervisor, all hosts at
    once (as clients spread over hosts would): one submitter does not cap the cluster."""
    with ThreadPoolExecutor(len(cluster)) as pool:
        shares = [work_items[i :: len(cluster)] for i in range(len(cluster))]
        done = pool.map(
            lambda pair: [pair[0].submit(w) for w in pair[1]], zip(cluster, shares, strict=True)
        )
        list(done)


# --- throughput -------------------------------------------------------------------


def _throughput(server: LocalPostgres, hosts: int, per_host: int) -> float:
    """Jobs/s of ``hosts`` hosts, each given ``per_host`` jobs of distinct work items:
    from the first submission to the last job's end."""
    url = fresh_database(server, f"bench_cluster_t{hosts}")
    total = hosts * per_host
    with _cluster(url, hosts) as cluster, contextlib.closing(PostgresStore(url, "observer")) as db:
        began = time.time()
        _submit_all(cluster, [f"t{hosts}-{i}" for i in range(total)])
        _wait_done(db, total, 60.0 + total)
        jobs = _all_jobs(db, total)
    ended = max(j.finished_at or 0.0 for j in jobs)
    return total / (ended - began)


def _throughputs(server: LocalPostgres, per_host: int, rounds: int) -> dict[int, list[float]]:
    """Each host count once a round, in turn, the order reversed every other round:
    the machine's load (other work shares these cores) drifts alike for all three."""
    samples: dict[int, list[float]] = {hosts: [] for hosts in HOST_COUNTS}
    progress = Progress("throughput runs", rounds * len(HOST_COUNTS))
    for round_ in range(rounds):
        for hosts in HOST_COUNTS[:: -1 if round_ % 2 else 1]:
            samples[hosts].append(_throughput(server, hosts, per_host))
            progress()
    return samples


# --- affinity ---------------------------------------------------------------------


def _affinity(server: LocalPostgres, items: int, chain: int) -> dict[str, float]:
    """Three hosts; ``items`` work items each run ``chain`` jobs, one after another.

    Each round submits one job of every item (through the hosts in turn) and
    waits for the round to end: the next job of an item arrives once its
    previous one is done, within the locality wait. A job counts when its
    item's previous job committed a snapshot; it is a hit when it started from
    a snapshot on the host that ran that previous job.
    """
    url = fresh_database(server, "bench_cluster_affinity")
    total = items * chain
    progress = Progress("affinity rounds", chain)
    with _cluster(url, 3) as cluster, contextlib.closing(PostgresStore(url, "observer")) as db:
        began = time.time()
        for round_ in range(chain):
            # Each round through the hosts in a new order: no item sticks to a host by its API.
            turned = cluster[round_ % 3 :] + cluster[: round_ % 3]
            _submit_all(turned, [f"item-{i}" for i in range(items)])
            _wait_done(db, (round_ + 1) * items, 60.0 + items)
            progress()
        jobs = _all_jobs(db, total)
        pulls = sum(h.pulls() for h in cluster)
    ended = max(j.finished_at or 0.0 for j in jobs)
    eligible, hits = affinity_hits(jobs)
    hosts_used = {job.host for job in jobs}
    return {
        "hit_rate": hits / eligible if eligible else 0.0,
        "eligible": eligible,
        "pulls": pulls,
        "hosts_used": len(hosts_used),
        "jobs_per_s": total / (ended - began),
    }


def affinity_hits(jobs: list[Job]) -> tuple[int, int]:
    """(jobs whose key had a snapshot, of those the ones that started from it locally).

    A key's jobs run one at a time, so the newest snapshot when one starts is
    the one its key's previous job committed, on that job's host: a hit starts
    from a snapshot on that same host (a pull or a start from base is a miss).
    """
    by_key: dict[SnapshotKey, list[Job]] = {}
    for job in sorted(jobs, key=lambda j: j.started_at or 0.0):
        by_key.setdefault(job.key, []).append(job)
    eligible = hits = 0
    for chain in by_key.values():
        for before, job in itertools.pairwise(chain):
            if before.snapshot_committed:
                eligible += 1
                hits += job.from_snapshot and job.host == before.host
    return eligible, hits


# --- the scenario -----------------------------------------------------------------


def cluster(quick: bool) -> ScenarioResult:
    """Throughput on 1, 2 and 3 hosts, the claim cost, the affinity hit rate: one run."""
    per_host, rounds, items, chain = (12, 1, 9, 3) if quick else (60, 4, 30, 10)
    started = time.perf_counter()
    with LocalPostgres() as server:
        samples = _throughputs(server, per_host, rounds)
        affinity = _affinity(server, items, chain)
    rates = {hosts: median(values) for hosts, values in samples.items()}
    # Its queue fills take ~30 s even in its own --quick: a full run only.
    claims = None if quick else claim_cost(quick)
    notes = [] if claims else ["claim cost: full runs only (python -m bench.claim_cost --quick)"]
    figures = [
        *(Figure(f"h{n}_jobs_per_s", rate, "jobs/s", "higher") for n, rate in rates.items()),
        Figure("h2_over_h1", rates[2] / rates[1], "x", "higher", True, "medians; linear: 2.0"),
        Figure("h3_over_h1", rates[3] / rates[1], "x", "higher", True, "medians; target >= 2.7"),
        *(
            Figure(f"claim_{f.name}", f.value, f.unit, f.better, f.checked, f.note)
            for f in (claims.figures if claims else [])
        ),
        Figure(
            "affinity_hit_rate", affinity["hit_rate"], "share", "higher", True, "target >= 0.95"
        ),
        Figure("affinity_eligible_jobs", affinity["eligible"], "jobs", "higher"),
        Figure("affinity_pulls", affinity["pulls"], "pulls", "lower"),
        Figure("affinity_jobs_per_s", affinity["jobs_per_s"], "jobs/s", "higher"),
    ]
    targets = {
        "h3_over_h1": (">=", 2.7),
        "affinity_hit_rate": (">=", 0.95),
        **{
            f"claim_{shape}_100k_over_1k": ("<=", 1.5)
            for shape in ("local", "queue")
            if claims is not None
        },
    }
    return ScenarioResult(
        name="cluster",
        title="9. Cluster: 1-3 hosts on one PostgreSQL, claim cost, affinity",
        figures=figures,
        samples={
            **{f"h{n}_jobs_per_s": values for n, values in samples.items()},
            **(claims.samples if claims else {}),
        },
        params={
            "start_latency_s": START_LATENCY_S,
            "max_workers": MAX_WORKERS,
            "jobs_per_host": per_host,
            "throughput_rounds": rounds,
            "locality_wait_s": LOCALITY_WAIT_S,
            "affinity_items": items,
            "affinity_chain": chain,
            "affinity_hosts_used": affinity["hosts_used"],
            "claim_cost": claims.params if claims else None,
        },
        notes=notes,
        targets=targets,
        seconds=time.perf_counter() - started,
    )
