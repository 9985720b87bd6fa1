"""The cluster half of the PostgreSQL store, on a real server: several hosts, one database.

Each test opens PostgresStores with different host IDs on the session's
throwaway server (emptied per test). Times are given explicitly (the
callers' clocks), so leases and locality waits need no sleeping.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator

import psycopg
import pytest

from actors.clock import FakeClock
from actors.model import Job, JobSpec, JobState, SnapshotKey
from actors.store import Caps, Fenced, new_job_id
from actors.store.cluster import ClusterStore, SnapshotRecord
from actors.store.pg_schema import RESCUE_LOCK
from actors.store.postgres import HeldElsewhere, PostgresStore

pytestmark = pytest.mark.postgres

NOW = 1_800_000_000.0
LEASE_S = 10.0
WAIT_S = 30.0
KEY = SnapshotKey("p", "w")
OLD, NEW = "sha256:" + "1" * 64, "sha256:" + "2" * 64

Open = Callable[[str], PostgresStore]


@pytest.fixture
def open_host(postgres_url: str) -> Iterator[Open]:
    """Opens a host's store on the shared database; all are closed after the test."""
    opened: list[PostgresStore] = []

    def open_one(host_id: str) -> PostgresStore:
        store = PostgresStore(postgres_url, host_id, FakeClock(NOW), locality_wait_s=WAIT_S)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        store.close()


_created = iter(range(1, 1_000_000))


def job(work_item: str = "w", *, project: str = "p", agent_type: str = "default") -> Job:
    spec = JobSpec(project, work_item, agent_type, env={"TOKEN": "secret"})
    return Job(new_job_id(), spec, JobState.QUEUED, NOW - 1000 + next(_created))


def queue(store: PostgresStore, *jobs: Job) -> list[Job]:
    for j in jobs:
        store.add(j, note="submitted")
    return list(jobs)


def stored(store: PostgresStore, job_id: str) -> Job:
    found = store.get(job_id)
    assert found is not None
    return found


def beat(store: PostgresStore, now: float = NOW) -> None:
    store.heartbeat(now, LEASE_S, api="127.0.0.1:8080", max_workers=4, running=0)


def run(store: PostgresStore, claimed: Job) -> Job:
    running = dataclasses.replace(claimed, state=JobState.RUNNING, started_at=NOW)
    store.update(running)
    return running


def test_the_store_is_a_cluster_store(open_host: Open) -> None:
    assert isinstance(open_host("a"), ClusterStore)


# --- hosts and leases ---------------------------------------------------------------


def test_heartbeats_list_every_host_with_its_lease(open_host: Open) -> None:
    a, b = open_host("a"), open_host("b")
    beat(a)
    b.heartbeat(NOW + 1, LEASE_S, api="10.0.0.2:8080", max_workers=8, running=3)
    beat(a, NOW + 5)
    first, second = a.hosts()
    assert (first.host_id, first.started_at, first.last_seen) == ("a", NOW, NOW + 5)
    assert first.lease_until == NOW + 5 + LEASE_S
    assert (second.api, second.max_workers, second.running) == ("10.0.0.2:8080", 8, 3)
    assert second.live(NOW + 10)
    assert not second.live(NOW + 11)
    restarted = open_host("a")  # a new process of host a: a new started_at
    beat(restarted, NOW + 20)
    assert restarted.hosts()[0].started_at == NOW + 20


def test_a_draining_host_claims_nothing_and_says_so(open_host: Open) -> None:
    a, b = open_host("a"), open_host("b")
    beat(a)
    (j,) = queue(a, job())
    a.drain(True)
    assert a.claim(4, NOW, Caps.none()) == []
    assert [h.draining for h in b.hosts()] == [True]
    beat(a, NOW + 1)  # a heartbeat keeps it draining
    assert b.hosts()[0].draining
    a.drain(False)
    assert [c.id for c in a.claim(4, NOW, Caps.none())] == [j.id]


# --- rescue and fencing ------------------------------------------------------------------


def test_rescue_requeues_only_expired_hosts_jobs_with_a_new_attempt(open_host: Open) -> None:
    a, b = open_host("a"), open_host("b")
    beat(a)
    beat(b)
    queue(a, job("x"), job("y"), job("x"))
    (on_a,) = a.claim(1, NOW, Caps.none())
    (on_b,) = b.claim(1, NOW, Caps.none())
    on_a = run(a, on_a)
    assert (on_a.host, on_b.host) == ("a", "b")
    assert b.rescue_expired(NOW + 5) == []  # nobody's lease has ended
    beat(b, NOW + 8)  # b renews, a does not
    later = NOW + LEASE_S + 1
    (rescued,) = b.rescue_expired(later)
    assert rescued.id == on_a.id
    assert (rescued.state, rescued.attempt, rescued.host) == (JobState.QUEUED, 1, None)
    assert (rescued.queued_at, rescued.container_id) == (later, None)
    assert b.get(on_a.id) == rescued
    assert b.get(on_b.id) == on_b  # the live host's job is untouched
    assert b.history(on_a.id)[-1] == (JobState.QUEUED, later, "rescued: host a missed its lease")
    # Its key is free again: b takes the rescued job before the younger one of its key.
    (taken,) = b.claim(4, later, Caps.none())
    assert (taken.id, taken.attempt, taken.host) == (on_a.id, 1, "b")
    assert b.rescue_expired(later) == []  # nothing left to rescue


def test_only_the_election_winner_rescues(open_host: Open, postgres_url: str) -> None:
    a, b = open_host("a"), open_host("b")
    beat(a)
    queue(a, job())
    (claimed,) = a.claim(1, NOW, Caps.none())
    later = NOW + LEASE_S + 1
    with psycopg.connect(postgres_url, autocommit=True) as winner:
        winner.execute("SELECT pg_advisory_lock(%s)", (RESCUE_LOCK,))
        assert b.rescue_expired(later) == []  # another host is rescuing: return at once
        stored = b.get(claimed.id)
        assert stored is not None
        assert stored.state is JobState.STARTING
        winner.execute("SELECT pg_advisory_unlock(%s)", (RESCUE_LOCK,))
    assert [j.id for j in b.rescue_expired(later)] == [claimed.id]


def test_hosts_rescuing_at_once_rescue_each_job_once(open_host: Open) -> None:
    a = open_host("a")
    beat(a)
    queue(a, *(job(f"w{i}") for i in range(20)))
    claimed = a.claim(20, NOW, Caps.none())
    rescuers = [open_host(f"r{i}") for i in range(3)]
    rescued: list[Job] = []
    lock = threading.Lock()

    def rescue(store: PostgresStore) -> None:
        for _ in range(5):
            got = store.rescue_expired(NOW + LEASE_S + 1)
            with lock:
                rescued.extend(got)

    assert claim_from_threads(rescuers, rescue) == []
    assert sorted(j.id for j in rescued) == sorted(j.id for j in claimed)
    assert {j.attempt for j in rescued} == {1}


def test_a_late_write_of_a_rescued_attempt_is_fenced_and_changes_nothing(
    open_host: Open,
) -> None:
    """Partition: host a comes back after b rescued its job; a's outcome must not land."""
    a, b = open_host("a"), open_host("b")
    beat(a)
    queue(a, job())
    (claimed,) = a.claim(1, NOW, Caps.none())
    running = run(a, claimed)
    (rescued,) = b.rescue_expired(NOW + LEASE_S + 1)
    late = dataclasses.replace(running, state=JobState.SUCCEEDED, finished_at=NOW + 20)
    with pytest.raises(Fenced):
        a.update(late, note="a's late outcome")
    with pytest.raises(Fenced):
        a.update(dataclasses.replace(running, state=JobState.FAILED), holds_key=True)
    assert b.get(running.id) == rescued
    assert [s for s, _, note in b.history(running.id) if note == "a's late outcome"] == []
    assert a.unfinished() == [rescued]  # a adopts nothing of its own any more


def test_a_host_cannot_overwrite_a_job_another_host_claimed(open_host: Open) -> None:
    """A cancel from a's copy of a queued job races b's claim of it: b's run
    must keep its key and its state, and a learns the write was dropped."""
    a, b = open_host("a"), open_host("b")
    (queued,) = queue(a, job())
    (claimed,) = b.claim(1, NOW, Caps.none())
    cancel = dataclasses.replace(queued, state=JobState.CANCELLED, finished_at=NOW)
    with pytest.raises(Fenced, match="claimed by host b") as refused:
        a.update(cancel)
    assert isinstance(refused.value, HeldElsewhere)
    assert refused.value.holder == "b"
    assert a.get(queued.id) == claimed
    b.update(dataclasses.replace(claimed, state=JobState.RUNNING, started_at=NOW))


def test_rescue_frees_the_key_of_a_dead_hosts_cancelled_holder(open_host: Open) -> None:
    a, b = open_host("a"), open_host("b")
    beat(a)
    _first, waiting = queue(a, job("w"), job("w"))
    (claimed,) = a.claim(1, NOW, Caps.none())
    cancelled = dataclasses.replace(claimed, state=JobState.CANCELLED, finished_at=NOW)
    a.update(cancelled, holds_key=True)  # its container is still being removed
    assert b.claim(4, NOW, Caps.none()) == []
    assert b.rescue_expired(NOW + LEASE_S + 1) == []  # nothing to re-run...
    assert [j.id for j in b.claim(4, NOW + LEASE_S + 1, Caps.none())] == [waiting.id]  # ...key free
    with pytest.raises(Fenced):  # a's own release comes too late
        a.update(cancelled)


def test_a_host_whose_lease_ended_claims_nothing_until_it_renews(open_host: Open) -> None:
    """Partition healed: host a reconnects before its lease actor renews. A job it
    claimed now would be rescued by b with the rest of a's, and run twice."""
    a = open_host("a")
    beat(a)
    (j,) = queue(a, job())
    assert a.claim(1, NOW + LEASE_S, Caps.none()) == []
    beat(a, NOW + LEASE_S)
    assert [c.id for c in a.claim(1, NOW + LEASE_S, Caps.none())] == [j.id]


def test_unfinished_is_every_queued_job_and_this_hosts_own(open_host: Open) -> None:
    a, b = open_host("a"), open_host("b")
    x, y, z = queue(a, job("x"), job("y"), job("z"))
    a.claim(1, NOW, Caps.none())
    b.claim(1, NOW, Caps.none())
    assert [j.id for j in a.unfinished()] == [x.id, z.id]
    assert [j.id for j in b.unfinished()] == [y.id, z.id]


# --- concurrent claims ------------------------------------------------------------------


def claim_from_threads(
    stores: list[PostgresStore], work: Callable[[PostgresStore], None]
) -> list[BaseException]:
    start = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def body(store: PostgresStore) -> None:
        try:
            start.wait()
            work(store)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    return errors


def test_caps_hold_across_hosts_claiming_at_once(open_host: Open) -> None:
    stores = [open_host(f"h{i}") for i in range(4)]
    queue(stores[0], *(job(f"p{i}") for i in range(40)))
    queue(stores[0], *(job(f"q{i}", project="q", agent_type="big") for i in range(40)))
    limit = Caps({"p": 3}.get, {"big": 2}.get)
    claimed: list[Job] = []
    lock = threading.Lock()

    def claim_until_capped(store: PostgresStore) -> None:
        for _ in range(20):
            got = store.claim(1, NOW, limit)
            with lock:
                claimed.extend(got)

    assert claim_from_threads(stores, claim_until_capped) == []
    projects = sorted(j.spec.project for j in claimed)
    assert projects == ["p", "p", "p", "q", "q"]
    assert len({j.id for j in claimed}) == len(claimed)
    assert stores[0].count_by_state()[JobState.STARTING] == 5


def test_never_two_holders_of_a_key_under_concurrent_claims(open_host: Open) -> None:
    """Four hosts claim and finish 60 jobs of 3 keys as fast as they can."""
    stores = [open_host(f"h{i}") for i in range(4)]
    jobs = queue(stores[0], *(job(f"k{i % 3}") for i in range(60)))
    active: set[SnapshotKey] = set()
    ended: list[str] = []
    lock = threading.Lock()

    def churn(store: PostgresStore) -> None:
        for _ in range(400):
            got = store.claim(2, NOW, Caps.none())
            if not got and len(ended) >= len(jobs):
                return
            for claimed in got:
                with lock:
                    assert claimed.key not in active, f"two holders of {claimed.key}"
                    active.add(claimed.key)
                with lock:
                    active.discard(claimed.key)
                    ended.append(claimed.id)
                store.update(
                    dataclasses.replace(claimed, state=JobState.SUCCEEDED, finished_at=NOW)
                )

    assert claim_from_threads(stores, churn) == []
    assert sorted(ended) == sorted(j.id for j in jobs)  # every job ran exactly once
    # FIFO per key: each key's jobs ended in submission order.
    for key in ("k0", "k1", "k2"):
        mine = [j.id for j in jobs if j.spec.work_item == key]
        assert [i for i in ended if i in set(mine)] == mine


# --- locality: work follows its snapshot --------------------------------------------------


def snapshot_on(
    store: PostgresStore, work_item: str, image: str = "sha256:" + "a" * 64, at: float = NOW
) -> None:
    record = SnapshotRecord(SnapshotKey("p", work_item), "default", store.host_id, image, at, None)
    assert store.record_snapshot(record)


def test_a_key_waits_for_the_live_host_of_its_snapshot(open_host: Open) -> None:
    a, b = open_host("a"), open_host("b")
    beat(a, NOW + WAIT_S - LEASE_S)  # live until just past the wait
    snapshot_on(a, "w")
    (j,) = queue(b, dataclasses.replace(job("w"), queued_at=NOW))
    assert b.claim(4, NOW + 1, Caps.none()) == []
    assert b.claim(4, NOW + WAIT_S - 0.5, Caps.none()) == []
    assert [c.id for c in a.claim(4, NOW + 1, Caps.none())] == [j.id]


def test_after_the_wait_any_host_takes_it(open_host: Open) -> None:
    a, b = open_host("a"), open_host("b")
    beat(a, NOW + WAIT_S)
    snapshot_on(a, "w")
    (j,) = queue(b, dataclasses.replace(job("w"), queued_at=NOW))
    assert [c.id for c in b.claim(4, NOW + WAIT_S, Caps.none())] == [j.id]


def test_the_wait_counts_from_submission_when_never_requeued(open_host: Open) -> None:
    a, b = open_host("a"), open_host("b")
    beat(a, NOW + WAIT_S)
    snapshot_on(a, "w")
    (j,) = queue(b, job("w"))  # created 1000 s before NOW, queued_at None
    assert [c.id for c in b.claim(4, NOW, Caps.none())] == [j.id]


def test_a_key_whose_snapshot_host_is_dead_or_draining_does_not_wait(open_host: Open) -> None:
    a, b, c = open_host("a"), open_host("b"), open_host("c")
    beat(a)
    beat(c)
    snapshot_on(a, "dead")
    snapshot_on(c, "draining")
    c.drain(True)
    first, second = queue(
        b,
        dataclasses.replace(job("dead"), queued_at=NOW + LEASE_S),
        dataclasses.replace(job("draining"), queued_at=NOW),
    )
    assert [j.id for j in b.claim(4, NOW + 1, Caps.none())] == [second.id]
    assert [j.id for j in b.claim(4, NOW + LEASE_S + 1, Caps.none())] == [first.id]


def test_a_host_takes_its_local_work_before_older_work(open_host: Open) -> None:
    a = open_host("a")
    beat(a)
    snapshot_on(a, "mine")
    older, mine = queue(a, job("other"), job("mine"))
    assert [j.id for j in a.claim(1, NOW, Caps.none())] == [mine.id]
    assert [j.id for j in a.claim(1, NOW, Caps.none())] == [older.id]


def test_local_work_follows_its_snapshot_as_it_is_recorded_moved_and_forgotten(
    open_host: Open,
) -> None:
    a, b = open_host("a"), open_host("b")
    for host in (a, b):
        beat(host)
    older, first, second = queue(a, job("other"), job("w"), job("w"))
    snapshot_on(a, "w", OLD)  # recorded after the jobs were queued
    assert [j.id for j in a.claim(1, NOW, Caps.none())] == [first.id]
    a.update(dataclasses.replace(stored(a, first.id), state=JobState.SUCCEEDED, finished_at=NOW))
    snapshot_on(b, "w", NEW, NOW + 1)  # the key's newest snapshot moves to b
    assert [j.id for j in b.claim(1, NOW, Caps.none())] == [second.id]
    b.update(dataclasses.replace(stored(b, second.id), state=JobState.QUEUED, host=None))
    b.forget_snapshot(KEY, NEW)  # evicted: nobody's local work any more, FIFO again
    assert [j.id for j in a.claim(1, NOW, Caps.none())] == [older.id]
    assert [j.id for j in a.claim(1, NOW, Caps.none())] == [second.id]


def test_local_work_keeps_its_keys_order_and_backoff(open_host: Open) -> None:
    a = open_host("a")
    snapshot_on(a, "mine")
    head, second = queue(a, dataclasses.replace(job("mine"), retry_at=NOW + 5), job("mine"))
    assert a.claim(2, NOW, Caps.none()) == []
    assert [j.id for j in a.claim(2, NOW + 5, Caps.none())] == [head.id]
    assert a.claim(2, NOW + 5, Caps.none()) == []
    assert a.get(second.id) == second


# --- the snapshot index ---------------------------------------------------------------------


def test_the_newest_snapshot_wins_and_older_copies_are_superseded(open_host: Open) -> None:
    a, b = open_host("a"), open_host("b")
    assert a.newest_snapshot(KEY) is None
    assert a.record_snapshot(SnapshotRecord(KEY, "default", "a", OLD, NOW, None))
    assert b.record_snapshot(SnapshotRecord(KEY, "default", "b", NEW, NOW + 1, None))
    # a's commit of an older snapshot arrives late: refused, a deletes its own.
    assert not a.record_snapshot(SnapshotRecord(KEY, "default", "a", OLD, NOW, None))
    newest = a.newest_snapshot(KEY)
    assert newest is not None
    assert (newest.host_id, newest.image_id, newest.digest) == ("b", NEW, None)
    other = SnapshotKey("p", "other")
    assert a.superseded([(KEY, OLD), (other, OLD)]) == [KEY]
    assert b.superseded([(KEY, NEW)]) == []
    assert a.superseded([]) == []


def test_a_digest_lands_only_on_its_image(open_host: Open) -> None:
    a = open_host("a")
    a.record_snapshot(SnapshotRecord(KEY, "default", "a", NEW, NOW, None))
    a.record_digest(KEY, OLD, "127.0.0.1:5000/snapyard@sha256:" + "9" * 64)  # moved on: no-op
    a.record_digest(KEY, NEW, "127.0.0.1:5000/snapyard@sha256:" + "8" * 64)
    (record,) = a.snapshots()
    assert record.digest == "127.0.0.1:5000/snapyard@sha256:" + "8" * 64
    assert record == a.newest_snapshot(KEY)


def test_forget_drops_only_the_current_image(open_host: Open) -> None:
    a = open_host("a")
    a.record_snapshot(SnapshotRecord(KEY, "default", "a", NEW, NOW, None))
    a.forget_snapshot(KEY, OLD)
    assert a.newest_snapshot(KEY) is not None
    a.forget_snapshot(KEY, NEW)
    assert a.newest_snapshot(KEY) is None
    assert a.snapshots() == []


def test_usage_times_are_each_hosts_own(open_host: Open) -> None:
    a, b = open_host("a"), open_host("b")
    use = ("p", "w", NEW)
    a.record_usage({use: NOW}, None)
    b.record_usage({use: NOW + 5}, None)
    b.record_usage({}, [])  # b's copy is gone: a's time stays
    assert a.load_usage() == {use: NOW}
    assert b.load_usage() == {}
