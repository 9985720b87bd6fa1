"""What only the PostgreSQL store does: survive its server going away, and wake claimers.

These tests stop and restart the session's throwaway server under a live
store, as an operator's restart or a network cut would.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator

import pytest

from actors.clock import FakeClock
from actors.localcluster import LocalPostgres
from actors.model import Job, JobSpec, JobState
from actors.store import Caps, StoreUnavailable, new_job_id
from actors.store.postgres import PostgresStore

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


def test_a_new_job_wakes_a_waiting_host(server: LocalPostgres, store: PostgresStore) -> None:
    waiter = PostgresStore(server.url, "b", FakeClock(NOW))
    try:
        assert waiter.wait_for_work(0) is False  # now LISTENing
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
        assert waiter.wait_for_work(0) is False
        server.restart()
        with pytest.raises(StoreUnavailable):
            waiter.wait_for_work(5)
        assert waiter.wait_for_work(0) is False  # listening on a new connection
        with pytest.raises(StoreUnavailable):
            store.add(job())  # the writer's connection was cut too: reported once
        store.add(job())
        assert waiter.wait_for_work(5) is True
    finally:
        waiter.close()
