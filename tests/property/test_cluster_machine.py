"""Issue 14: two hosts of a cluster, any interleaving of host deaths, partitions and
image deletions: every job ends exactly once, never two active jobs of one key, no
job lost.

A hypothesis state machine drives two real hosts (``cluster_kit.Host``: the
application's wiring on a MemoryEngine each, one real PostgreSQL, a shared
MemoryRegistry, one FakeClock). Time moves only in ``heartbeat`` steps, which
beat every host's lease and tick every supervisor, in the order a real cluster
guarantees: a host cut off fences (and its workers are gone) before any other
host may rescue its jobs. At the end the machine heals everything, drains the
work and checks that every job ended, once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import ClassVar

import psycopg
import pytest
from budget import budget
from cluster_kit import BEAT_S, LEASE_S, REGISTRY, Host, shared_base
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from waiting import eventually

from actors.clock import FakeClock
from actors.engine.base import EngineError
from actors.engine.memory import MemoryRegistry
from actors.labels import LABEL_JOB_ID, LABEL_PROJECT, LABEL_ROLE, LABEL_WORK_ITEM, ROLE_SNAPSHOT
from actors.store.postgres import PostgresStore

NAMES = ("host-a", "host-b")
KEYS = (("p", "w1"), ("p", "w1"), ("p", "w2"))
# Heartbeats the drain may take before calling a job lost: locality waits,
# leases and backoffs all end well within it.
DRAIN_BEATS = 200


class ClusterMachine(RuleBasedStateMachine):
    url: ClassVar[str] = ""
    runs = 0

    def __init__(self) -> None:
        super().__init__()
        ClusterMachine.runs += 1
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(
                "TRUNCATE jobs, job_history, hosts, snapshots, snapshot_usage RESTART IDENTITY"
            )
        self.clock = FakeClock()
        self.registry = MemoryRegistry(REGISTRY)
        base = shared_base(self.clock, self.registry)
        self.hosts = {
            name: Host(name, self.url, self.clock, self.registry, base, max_workers=2)
            for name in NAMES
        }
        for host in self.hosts.values():
            host.start()
        self.dead: set[str] = set()
        self.cut: set[str] = set()
        self.jobs: list[str] = []
        # The test's own view of the shared truth, never behind a Cable.
        self.truth = PostgresStore(self.url, "observer", self.clock)

    # --- rules ----------------------------------------------------------------

    @rule(name=st.sampled_from(NAMES), key=st.sampled_from(KEYS))
    def submit(self, name: str, key: tuple[str, str]) -> None:
        usable = [n for n in (name, *NAMES) if n not in self.dead | self.cut]
        if not usable:
            return
        self.jobs.append(self.hosts[usable[0]].submit(key[1], key[0]).id)

    @rule(code=st.sampled_from((0, 0, 1)), pick=st.integers(0, 7))
    def a_worker_exits(self, code: int, pick: int) -> None:
        running = [
            (host, c) for host in self._live() for c in host.running() if c.labels.get(LABEL_JOB_ID)
        ]
        if running:
            host, container = running[pick % len(running)]
            host.engine.exit_container(container.id, code)

    @precondition(lambda self: not self.dead)
    @rule(name=st.sampled_from(NAMES))
    def a_host_dies(self, name: str) -> None:
        """SIGKILL and its dockerd gone: no cleanup, its workers stop with it."""
        host = self.hosts[name]
        host.die()
        for container in host.running():
            host.engine.exit_container(container.id, 137)
        self.dead.add(name)

    @precondition(lambda self: bool(self.dead - self.cut))
    @rule()
    def the_dead_host_restarts(self) -> None:
        """Not while it is cut off: a host that cannot renew its lease does not start."""
        name = min(self.dead - self.cut)
        self.hosts[name].start()
        self.dead.discard(name)

    @precondition(lambda self: not self.cut and not self.dead)
    @rule(name=st.sampled_from(NAMES))
    def a_partition(self, name: str) -> None:
        """Of a host with running workers, when there is one: the case fencing is for."""
        busy = [n for n in (name, *NAMES) if self.hosts[n].running()]
        name = busy[0] if busy else name
        self.hosts[name].cable.cut()
        self.cut.add(name)

    @precondition(lambda self: bool(self.cut))
    @rule()
    def the_partition_heals(self) -> None:
        name = self.cut.pop()
        self.hosts[name].cable.mend()

    @rule(name=st.sampled_from(NAMES), pick=st.integers(0, 7))
    def a_snapshot_image_is_deleted(self, name: str, pick: int) -> None:
        engine = self.hosts[name].engine
        images = engine.list_images({LABEL_ROLE: ROLE_SNAPSHOT})
        if images:  # `docker rmi -f`; refused (409) under a running container
            with contextlib.suppress(EngineError):
                engine.delete_image_behind_back(images[pick % len(images)].id)

    @rule(beats=st.integers(1, 2 * int(LEASE_S / BEAT_S)))
    def time_passes(self, beats: int) -> None:
        """Up to two leases, a heartbeat at a time: long enough for a lease to end."""
        for _ in range(beats):
            self._beat()
            self.never_two_active_jobs_of_a_key_nor_two_runs_of_a_job()

    # --- invariants -------------------------------------------------------------

    @invariant()
    def never_two_active_jobs_of_a_key_nor_two_runs_of_a_job(self) -> None:
        keys: list[tuple[str, str]] = []
        job_ids: list[str] = []
        for host in self.hosts.values():
            for c in host.running():
                keys.append((c.labels.get(LABEL_PROJECT, ""), c.labels.get(LABEL_WORK_ITEM, "")))
                job_ids.append(c.labels.get(LABEL_JOB_ID, ""))
        assert len(keys) == len(set(keys)), f"two running containers of one key: {keys}"
        assert len(job_ids) == len(set(job_ids)), f"one job running twice: {job_ids}"

    @invariant()
    def a_job_ends_once(self) -> None:
        for job_id in self.jobs:
            ends = [s for s, _at, _note in self.truth.history(job_id) if s.terminal]
            assert len(ends) <= 1, f"{job_id} ended {len(ends)} times: {ends}"

    # --- helpers ------------------------------------------------------------------

    def _live(self) -> list[Host]:
        return [h for n, h in self.hosts.items() if n not in self.dead]

    def _beat(self) -> None:
        self.clock.advance(BEAT_S)
        # Leases first, the cut-off ones first: a host that must fence does so
        # (and its workers are gone) before another host's beat may rescue.
        for host in sorted(self._live(), key=lambda h: h.name not in self.cut):
            status = host.beat()
            if status.fenced:
                eventually(host.running, lambda cs: cs == [], f"{host.name}'s workers killed")
        for host in self._live():
            if host.name not in self.cut:
                host.tick()

    def teardown(self) -> None:
        try:
            for name in sorted(self.cut):
                self.hosts[name].cable.mend()
            self.cut.clear()
            for name in sorted(self.dead):
                self.hosts[name].start()
            self.dead.clear()
            self._drain()
        finally:
            for host in self.hosts.values():
                host.close()
            self.truth.close()

    def _ended(self, job_id: str) -> bool:
        job = self.truth.get(job_id)
        return job is not None and job.state.terminal

    def _drain(self) -> None:
        """Let every job end: workers exit cleanly, time moves a beat at a time."""
        for _ in range(DRAIN_BEATS):
            left = [j for j in self.jobs if not self._ended(j)]
            if not left:
                break
            for host in self._live():
                for container in host.running():
                    host.engine.exit_container(container.id, 0)
            self._beat()
            self.never_two_active_jobs_of_a_key_nor_two_runs_of_a_job()
        left = [(j, self.truth.get(j)) for j in self.jobs if not self._ended(j)]
        assert not left, f"jobs lost after {DRAIN_BEATS} heartbeats: {left}"
        self.a_job_ends_once()


@pytest.fixture
def cluster_url(postgres_url: str) -> Iterator[str]:
    ClusterMachine.url = postgres_url
    yield postgres_url
    ClusterMachine.url = ""


@pytest.mark.slow
def test_two_hosts_survive_any_interleaving(cluster_url: str) -> None:
    before = ClusterMachine.runs
    run_state_machine_as_test(
        ClusterMachine,
        settings=settings(
            max_examples=budget().cluster_examples,
            stateful_step_count=budget().cluster_steps,
        ),
    )
    print(f"cluster machine: {ClusterMachine.runs - before} examples run")
    assert LEASE_S > BEAT_S


def test_a_busy_host_cut_off_for_two_leases(cluster_url: str) -> None:
    """The machine's rules by hand, for the case fencing exists for: a host cut off
    while its worker runs, for longer than a lease; then everything heals."""
    state = ClusterMachine()
    try:
        state.submit(name="host-a", key=("p", "w1"))
        state.hosts["host-a"].wait_running(state.jobs[0])
        state.a_partition(name="host-a")
        state.time_passes(beats=2 * int(LEASE_S / BEAT_S))
        state.never_two_active_jobs_of_a_key_nor_two_runs_of_a_job()
        state.a_job_ends_once()
        state.the_partition_heals()
        state.time_passes(beats=2)
    finally:
        state.teardown()
