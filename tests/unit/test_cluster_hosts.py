"""Two hosts of a cluster on one real PostgreSQL: death, partition, fencing, pulled snapshots.

Each host is the application's wiring on its own MemoryEngine; the engines
share a MemoryRegistry, the hosts one FakeClock (a cluster keeps its clocks in
step). A partition is a real cut TCP connection between a host and the
database (``cluster_kit.Cable``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from cluster_kit import BEAT_S, LEASE_S, REGISTRY, Host, finished, shared_base
from waiting import eventually

from actors.cli_jobs import _host_row
from actors.clock import FakeClock
from actors.engine.memory import MemoryRegistry
from actors.labels import LABEL_ATTEMPT, MANAGED_FILTER
from actors.messages import GetStatus
from actors.model import JobState, SnapshotKey
from actors.wire import host_json

MakeHost = Callable[..., Host]


@pytest.fixture
def make_host(postgres_url: str) -> Iterator[MakeHost]:
    clock = FakeClock()
    registry = MemoryRegistry(REGISTRY)
    base = shared_base(clock, registry)
    hosts: list[Host] = []

    def make(name: str, max_workers: int = 2) -> Host:
        host = Host(name, postgres_url, clock, registry, base, max_workers)
        hosts.append(host)
        return host.start()

    yield make
    for host in hosts:
        host.close()


def test_a_dead_hosts_job_is_rescued_and_finished_elsewhere_from_the_pulled_snapshot(
    make_host: MakeHost,
) -> None:
    a = make_host("host-a")
    key = SnapshotKey("p", "w")
    first = a.submit("w")
    a.engine.exit_container(a.wait_running(first.id).id, 0)
    assert finished(a.store, first.id).snapshot_committed
    pushed = eventually(
        lambda: a.store.newest_snapshot(key),
        lambda r: r is not None and r.digest is not None,
        "the snapshot pushed and its digest indexed",
    )
    assert pushed is not None
    second = a.submit("w")
    a.wait_running(second.id)
    a.die()  # SIGKILL: no cleanup, no more renewals

    b = make_host("host-b")
    assert b.running() == []  # A's lease still holds
    for _ in range(int(LEASE_S / BEAT_S) + 1):  # B beats on; A's lease runs out
        a.clock.advance(BEAT_S)
        b.beat()  # renews B's lease, then rescues A's job once A's has ended
    container = b.wait_running(second.id)
    assert container.image_id == pushed.image_id  # the pulled snapshot, same image ID
    running = b.job(second.id)
    assert (running.host, running.attempt, running.from_snapshot) == ("host-b", 1, True)
    b.engine.exit_container(container.id, 0)
    done = finished(b.store, second.id)
    assert (done.state, done.host, done.from_snapshot) == (JobState.SUCCEEDED, "host-b", True)
    notes = [note or "" for _s, _at, note in b.store.history(second.id)]
    assert any("rescued: host host-a missed its lease" in n for n in notes)
    # B's own commit is now the key's newest, on B.
    newest = eventually(
        lambda: b.store.newest_snapshot(key),
        lambda r: r is not None and r.host_id == "host-b" and r.image_id != pushed.image_id,
        "B's snapshot indexed",
    )
    assert newest is not None


def test_a_partitioned_host_kills_its_worker_before_its_lease_ends_and_the_job_runs_once(
    make_host: MakeHost,
) -> None:
    a = make_host("host-a")
    job = a.submit("x")
    a.wait_running(job.id)
    b = make_host("host-b")
    clock = a.clock
    renewed = a.lease().last_renewal
    a.cable.cut()
    while not a.beat().fenced:
        assert clock.now() < renewed + LEASE_S - BEAT_S, "not fenced in time"
        b.beat()
        clock.advance(BEAT_S)
    eventually(lambda: a.running(job.id), lambda cs: cs == [], "A's worker killed")
    assert clock.now() < renewed + LEASE_S  # before anyone may rescue it
    assert b.running(job.id) == []
    assert a.fenced()

    while clock.now() <= renewed + LEASE_S:
        clock.advance(BEAT_S)
        b.beat()
    container = b.wait_running(job.id)
    b.engine.exit_container(container.id, 0)
    done = finished(b.store, job.id)
    assert (done.state, done.host, done.attempt) == (JobState.SUCCEEDED, "host-b", 1)
    assert a.created_for(job.id) == 1
    assert b.created_for(job.id) == 1
    history = b.store.history(job.id)

    a.cable.mend()
    clock.advance(BEAT_S)
    assert not a.beat().fenced
    eventually(a.fenced, lambda f: not f, "A unfenced")
    a.tick()
    assert b.store.history(job.id) == history  # A wrote nothing over the rescue
    assert b.store.get(job.id) == done
    assert a.running() == []


def test_a_late_hosts_outcome_write_is_fenced_and_changes_nothing(make_host: MakeHost) -> None:
    """A host cut off whose lease actor fell behind (no Beat while cut off): its worker
    runs on past its lease; when it comes back, its write is refused and dropped."""
    a = make_host("host-a", max_workers=1)
    job = a.submit("y")
    stale = a.wait_running(job.id)
    b = make_host("host-b")
    a.cable.cut()
    for _ in range(int(LEASE_S / BEAT_S) + 1):  # A's lease actor is stalled: no Beat
        a.clock.advance(BEAT_S)
        b.beat()
    rescued = b.wait_running(job.id)
    a.cable.mend()
    a.engine.exit_container(stale.id, 1)  # A's outcome: failed, for attempt 0
    eventually(lambda: a.sup.ask(GetStatus(), timeout=10.0).in_flight, lambda n: n == 0, "dropped")
    row = b.store.get(job.id)
    assert row is not None
    assert (row.state, row.host, row.attempt) == (JobState.RUNNING, "host-b", 1)
    b.engine.exit_container(rescued.id, 0)
    assert finished(b.store, job.id).state is JobState.SUCCEEDED


def test_a_start_reported_while_the_database_is_away_is_recorded_when_it_returns(
    make_host: MakeHost, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression (found by the two-host state machine): the Started of a job claimed
    just before a partition failed to open its transaction and was dropped; the job
    stayed "starting" on a live host forever and its key with it."""
    a = make_host("host-a")
    a.engine.before("start_container", a.cable.cut)
    job = a.submit("s")
    container = a.wait_running(job.id)
    eventually(
        lambda: [r.getMessage() for r in caplog.records],
        lambda lines: any("supervisor: the job store is unavailable" in x for x in lines),
        "the Started to meet the cut cable",
    )
    a.cable.mend()
    a.tick()  # the kept Started is handled now
    running = eventually(
        lambda: a.job(job.id), lambda j: j.state is JobState.RUNNING, "the job running"
    )
    assert running.container_id == container.id
    a.engine.exit_container(container.id, 0)
    assert finished(a.store, job.id).state is JobState.SUCCEEDED


def test_a_job_submitted_on_a_full_host_is_claimed_by_another_without_waiting_for_a_tick(
    make_host: MakeHost,
) -> None:
    """LISTEN/NOTIFY: B's Waker hears of the job at once; no Tick is sent here at all."""
    a = make_host("host-a", max_workers=1)
    b = make_host("host-b")
    busy = a.submit("busy")
    a.wait_running(busy.id)
    job = a.submit("other")  # A has no free place
    b.wait_running(job.id)
    assert b.job(job.id).host == "host-b"


def test_a_job_whose_worker_a_fence_killed_runs_again_as_the_next_attempt(
    make_host: MakeHost,
) -> None:
    """Regression: after an outage shorter than the lease, the fenced host re-ran the
    job itself, but the record kept ``attempt: 0`` and no trace that it ran twice."""
    a = make_host("host-a")
    job = a.submit("f")
    first = a.wait_running(job.id)
    eventually(lambda: a.job(job.id).state, lambda s: s is JobState.RUNNING, "running, recorded")
    a.cable.cut()
    while not a.beat().fenced:
        a.clock.advance(BEAT_S)
    eventually(lambda: a.running(job.id), lambda cs: cs == [], "A's worker killed")
    a.cable.mend()
    a.clock.advance(BEAT_S)
    assert not a.beat().fenced  # renewed before the lease ended: nobody rescued it
    eventually(a.fenced, lambda f: not f, "A unfenced")
    a.tick()  # the recovery re-queues it, and A claims it again
    again = a.wait_running(job.id)
    assert again.id != first.id
    running = eventually(
        lambda: a.store.get(job.id),
        lambda j: j is not None and j.state is JobState.RUNNING,
        "the job running again",
    )
    assert running is not None
    assert (running.host, running.attempt) == ("host-a", 1)
    notes = [(state, note) for state, _at, note in a.store.history(job.id)]
    assert (JobState.QUEUED, "re-queued: this host lost its lease and stopped it") in notes
    a.engine.exit_container(again.id, 0)  # the new attempt's outcome is written
    done = finished(a.store, job.id)
    assert (done.state, done.attempt) == (JobState.SUCCEEDED, 1)


def test_a_restarted_host_removes_at_once_the_workers_of_jobs_rescued_meanwhile(
    make_host: MakeHost, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: after a kill -9 (the engine up), a restarted host left the workers of
    jobs rescued elsewhere meanwhile, running or exited, until ``orphan_grace_s``."""
    a = make_host("host-a")
    running, exited = a.submit("r"), a.submit("e")
    still = a.wait_running(running.id)
    done = a.wait_running(exited.id)
    for job in (running, exited):
        eventually(lambda j=job: a.job(j.id).state, lambda s: s is JobState.RUNNING, "recorded")
    assert still.labels[LABEL_ATTEMPT] == "0"
    a.die()
    a.engine.exit_container(done.id, 0)  # exited while its host was down
    b = make_host("host-b")
    for _ in range(int(LEASE_S / BEAT_S) + 1):
        a.clock.advance(BEAT_S)
        b.beat()
    b.wait_running(running.id)
    b.wait_running(exited.id)

    a.start()  # the same clock: orphan_grace_s (300 s) has not passed
    gone = {still.id, done.id}
    eventually(
        lambda: {c.id for c in a.engine.list_containers(MANAGED_FILTER)} & gone,
        lambda left: left == set(),
        "A's stale workers removed",
    )
    for job in (running, exited):
        row = b.store.get(job.id)
        assert row is not None
        assert (row.state, row.host, row.attempt) == (JobState.RUNNING, "host-b", 1)
    a.tick()  # another listing: no second warning for the same containers
    warned = [r.getMessage() for r in caplog.records if "it is now host-b's" in r.getMessage()]
    assert len(warned) == 2, warned


def test_hosts_shows_no_running_count_for_a_host_whose_lease_ended(make_host: MakeHost) -> None:
    """Regression: `snapyard hosts` showed a dead host's last count ("lease ended 1/2")."""
    a = make_host("host-a")
    a.wait_running(a.submit("w").id)
    a.beat()  # A reports its one running job
    a.die()
    b = make_host("host-b")
    for _ in range(int(LEASE_S / BEAT_S) + 1):
        a.clock.advance(BEAT_S)
        b.beat()
    now = b.clock.now()
    rows = {h.host_id: _host_row(host_json(h, now)) for h in b.store.hosts()}
    assert rows["host-a"][1:3] == ["lease ended", "-"]
    assert rows["host-b"][1] == "live"
    assert str(rows["host-b"][2]).endswith("/2")  # a live host keeps its count
