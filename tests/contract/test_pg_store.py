"""What only the PostgreSQL store does: survive its server going away, and wake claimers.

These tests stop and restart the session's throwaway server under a live
store, as an operator's restart or a network cut would.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from waiting import eventually

from actors.clock import FakeClock
from actors.localcluster import LocalPostgres
from actors.model import Job, JobSpec, JobState
from actors.store import Caps, StoreError, StoreUnavailable, new_job_id
from actors.store.pg_schema import SCHEMA_VERSION
from actors.store.postgres import PostgresStore
from actors.store.rows import COLUMNS, row_of

pytestmark = pytest.mark.postgres

NOW = 1_800_000_000.0
PASSWORD = "s3cret-never-shown"  # trust authentication ignores it; messages must too


@pytest.fixture
def server(postgres_url: str, postgres_server: LocalPostgres) -> Iterator[LocalPostgres]:
    yield postgres_server
    postgres_server.start()  # whatever the test did, the next one gets a running server


@pytest.fixture
def store(server: LocalPostgres) -> Iterator[PostgresStore]:
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{server.port}/snapyard"
    with PostgresStore(url, "a", FakeClock(NOW)) as s:
        yield s


def job(work_item: str = "w") -> Job:
    return Job(new_job_id(), JobSpec("p", work_item), JobState.QUEUED, NOW)


def test_a_restarted_server_is_reported_once_then_the_store_reconnects(
    server: LocalPostgres, store: PostgresStore
) -> None:
    queued = job()
    store.add(queued)
    server.restart()
    with pytest.raises(StoreUnavailable) as lost:
        store.get(queued.id)
    message = str(lost.value)
    assert f"postgres@127.0.0.1:{server.port}/snapyard" in message
    assert "PostgreSQL runs" in message  # it says what to check
    assert PASSWORD not in message
    assert store.get(queued.id) == queued  # the next call reconnected


def test_a_stopped_server_raises_store_unavailable_until_it_is_back(
    server: LocalPostgres, store: PostgresStore
) -> None:
    (queued,) = [job()]
    store.add(queued)
    server.stop()
    for _ in range(2):  # the old connection is lost, then a new one is refused
        with pytest.raises(StoreUnavailable) as lost:
            store.claim(1, NOW, Caps.none())
        assert PASSWORD not in str(lost.value)
        assert lost.value.__cause__ is None  # no raw psycopg error chained
    server.start()
    assert [j.id for j in store.claim(1, NOW, Caps.none())] == [queued.id]


def test_a_batch_after_a_restart_starts_on_a_new_connection(
    server: LocalPostgres, store: PostgresStore
) -> None:
    """Nothing ran on the dead idle connection yet: the batch's BEGIN retries once,
    so the Supervisor's next message is not lost to a restart it did not see."""
    first, second = job("a"), job("b")
    store.add(first)
    server.restart()
    with store.batch():
        store.add(second)
    assert store.job_ids() == {first.id, second.id}


def test_a_connection_lost_inside_a_batch_rolls_it_back_and_says_so(
    server: LocalPostgres, store: PostgresStore
) -> None:
    first, second = job("a"), job("b")

    def write_through_a_restart() -> None:
        with store.batch():
            store.add(first)
            server.restart()
            with pytest.raises(StoreUnavailable):
                store.add(second)
            with pytest.raises(StoreUnavailable, match="inside a batch"):
                store.get(first.id)  # never a write outside the batch's transaction

    with pytest.raises(StoreUnavailable, match="inside a batch"):
        write_through_a_restart()
    assert store.job_ids() == set()
    store.add(second)
    assert store.job_ids() == {second.id}


def test_a_nul_in_a_workers_output_is_stored_as_a_replacement_character(
    store: PostgresStore,
) -> None:
    """PostgreSQL text cannot hold NUL; a worker's log may print one. The write
    must not fail (it would lose the job's outcome)."""
    running = dataclasses.replace(job(), state=JobState.RUNNING)
    store.add(running)
    ended = dataclasses.replace(
        running, state=JobState.FAILED, logs_tail="a\x00b\n", error="exit\x00", finished_at=NOW
    )
    store.update(ended)
    stored = store.get(running.id)
    assert stored is not None
    assert (stored.logs_tail, stored.error) == ("a\ufffdb\n", "exit\ufffd")


def test_a_new_job_wakes_a_waiting_host(server: LocalPostgres, store: PostgresStore) -> None:
    waiter = PostgresStore(server.url, "b", FakeClock(NOW))
    try:
        # Now LISTENing; what was notified before is unknown, so it wakes once.
        assert waiter.wait_for_work(0) is True
        assert waiter.wait_for_work(0) is False
        woken: list[bool] = []
        thread = threading.Thread(target=lambda: woken.append(waiter.wait_for_work(30)))
        thread.start()
        store.add(job())
        thread.join(timeout=30)
        assert woken == [True]
        assert waiter.wait_for_work(0) is False  # one wake-up, not one per message
    finally:
        waiter.close()


def test_a_released_key_and_a_requeue_wake_a_waiting_host(
    server: LocalPostgres, store: PostgresStore
) -> None:
    waiter = PostgresStore(server.url, "b", FakeClock(NOW))
    try:
        store.add(job("a"))
        store.add(job("b"))
        done, again = store.claim(2, NOW, Caps.none())
        assert waiter.wait_for_work(0) is True  # the first LISTEN: it may have missed work
        assert waiter.wait_for_work(0) is False
        store.update(dataclasses.replace(again, state=JobState.RUNNING, started_at=NOW))
        assert waiter.wait_for_work(0) is False  # still holding: nothing new to claim
        store.update(dataclasses.replace(done, state=JobState.SUCCEEDED, finished_at=NOW))
        assert waiter.wait_for_work(5) is True
        store.update(dataclasses.replace(again, state=JobState.QUEUED))
        assert waiter.wait_for_work(5) is True
    finally:
        waiter.close()


def test_waiting_across_a_restart_reports_it_then_listens_again(
    server: LocalPostgres, store: PostgresStore
) -> None:
    waiter = PostgresStore(server.url, "b", FakeClock(NOW))
    try:
        assert waiter.wait_for_work(0) is True  # the first LISTEN
        server.restart()
        with pytest.raises(StoreUnavailable):
            waiter.wait_for_work(5)
        # Listening on a new connection: what was notified meanwhile is unknown.
        assert waiter.wait_for_work(0) is True
        assert waiter.wait_for_work(0) is False
        with pytest.raises(StoreUnavailable):
            store.add(job())  # the writer's connection was cut too: reported once
        store.add(job())
        assert waiter.wait_for_work(5) is True
    finally:
        waiter.close()


def test_a_follower_never_skips_a_change_that_commits_after_a_later_seq(
    server: LocalPostgres, store: PostgresStore
) -> None:
    """Two hosts write history at once: the first one's seq is taken but not yet
    committed when the second commits. A follower of ``changes`` reading then
    must not see the second (it would resume past the first, for good)."""
    other = PostgresStore(server.url, "b", FakeClock(NOW))
    reader = PostgresStore(server.url, "c", FakeClock(NOW))
    first, second = job("a"), job("b")
    try:
        thread = threading.Thread(target=other.add, args=(second,))
        with store.batch():
            store.add(first)
            thread.start()
            eventually(
                lambda: waiting_on_the_history_lock(server),
                bool,
                "the second writer to wait for the first's commit",
            )
            assert reader.changes(0) == []
        thread.join(timeout=30)
        assert [job_id for _, job_id, _, _ in reader.changes(0)] == [first.id, second.id]
    finally:
        other.close()
        reader.close()


def waiting_on_the_history_lock(server: LocalPostgres) -> int:
    with psycopg.connect(server.url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory'"
        ).fetchone()
    return 0 if row is None else int(row[0])


def generic_plan(conn: psycopg.Connection[Any], sql: str, params: dict[str, Any]) -> str:
    """The plan the store runs: psycopg prepares a query on its 5th use, and the
    store's sessions use generic plans (``plan_cache_mode``), whatever the values."""
    names: list[str] = []

    def placeholder(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    prepared = re.sub(r"%\((\w+)\)s", placeholder, sql)
    conn.execute("SET plan_cache_mode = force_generic_plan")
    conn.execute(f"PREPARE claim_step AS {prepared}")  # type: ignore[call-overload]
    marks = ", ".join("%s" for _ in names)
    try:
        with psycopg.ClientCursor(conn) as literal:  # values as literals: typed by the PREPARE
            literal.execute(
                f"EXPLAIN EXECUTE claim_step({marks})",  # type: ignore[arg-type]
                [params[name] for name in names],
            )
            return "\n".join(str(row[0]) for row in literal.fetchall())
    finally:
        conn.execute("DEALLOCATE claim_step")


def test_the_claim_walks_indexes_never_the_whole_queue(
    server: LocalPostgres, store: PostgresStore
) -> None:
    """The claim's two queries stay index walks (``actors.store.pg_claim``)."""
    from actors.store import pg_claim

    with psycopg.connect(server.url, autocommit=True) as conn:
        with conn.cursor().copy(f"COPY jobs ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            for i in range(5000):
                copy.write_row(row_of(job(f"w{i % 500}")))
        with conn.cursor().copy(
            "COPY snapshots (project, work_item, agent_type, host_id, image_id, created_at) "
            "FROM STDIN"
        ) as copy:
            for i in range(500):
                copy.write_row(("p", f"w{i}", "default", "abc"[i % 3], f"sha256:{i:064x}", NOW))
        conn.execute(
            "UPDATE jobs j SET home = s.host_id FROM snapshots s "
            "WHERE s.project = j.project AND s.work_item = j.work_item"
        )
        conn.execute("ANALYZE")
        params = {
            "now": NOW,
            "me": "a",
            "page": 16,
            "wait": 10.0,
            "after_at": float("-inf"),
            "after_id": "",
            "taken_p": [],
            "taken_w": [],
        }
        plans = {
            name: generic_plan(conn, sql, params)
            for name, sql in (("local", pg_claim._LOCAL), ("rest", pg_claim._REST))
        }
    # Local: this host's queued jobs in order, never a probe per snapshot it holds.
    assert "Seq Scan" not in plans["local"], plans["local"]
    assert "Sort" not in plans["local"], plans["local"]
    assert "Index Scan using jobs_home on jobs j" in plans["local"], plans["local"]
    # The rest: a walk of the queue in order that stops at the page, with a
    # lookup per row, never a sort of the queue or a scan of the snapshot index.
    assert "Seq Scan on jobs" not in plans["rest"], plans["rest"]
    assert "Seq Scan on snapshots" not in plans["rest"], plans["rest"]
    assert "Sort" not in plans["rest"], plans["rest"]
    assert "Index Scan using jobs_queue on jobs j" in plans["rest"], plans["rest"]


def test_hosts_starting_together_on_a_new_database_migrate_it_once(
    server: LocalPostgres,
) -> None:
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS fresh")
        conn.execute("CREATE DATABASE fresh")
    url = server.url.rsplit("/", 1)[0] + "/fresh"
    opened: list[PostgresStore] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_one(host_id: str) -> None:
        try:
            start.wait()
            opened.append(PostgresStore(url, host_id, FakeClock(NOW)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one, args=(f"h{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert errors == []
        assert len(opened) == 4
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT version FROM schema_version").fetchall() == [
                (SCHEMA_VERSION,)
            ]
    finally:
        for store in opened:
            store.close()


def test_a_database_of_a_newer_snapyard_is_refused(server: LocalPostgres) -> None:
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS newer")
        conn.execute("CREATE DATABASE newer")
    url = server.url.rsplit("/", 1)[0] + "/newer"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="Upgrade Snapyard") as refused:
        PostgresStore(url, "a", FakeClock(NOW))
    assert f"127.0.0.1:{server.port}/newer" in str(refused.value)


def test_a_host_frozen_inside_a_transaction_does_not_hold_up_the_others(
    server: LocalPostgres,
) -> None:
    """A host stopped (SIGSTOP, a cut cable) mid-batch holds the history lock:
    the server ends its session after idle_in_transaction_s, the others go on,
    and the frozen host learns its batch was lost."""
    frozen = PostgresStore(server.url, "a", FakeClock(NOW), idle_in_transaction_s=0.5)
    other = PostgresStore(server.url, "b", FakeClock(NOW))
    first, second = job("a"), job("b")
    try:

        def freeze_inside_a_batch() -> None:
            with frozen.batch():
                frozen.add(first)  # holds the history lock until its commit
                writer = threading.Thread(target=other.add, args=(second,))
                writer.start()
                writer.join(timeout=30)  # the server ends a's session; b's write goes through
                assert not writer.is_alive()

        with pytest.raises(StoreUnavailable, match="idle-in-transaction"):
            freeze_inside_a_batch()
        assert other.job_ids() == {second.id}
    finally:
        frozen.close()
        other.close()
