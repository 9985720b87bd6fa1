"""The Supervisor fenced and unfenced, and its writes refused by the cluster (``Fenced``).

Real actors on a MemoryEngine; the store is SQLite, wrapped where a test needs
the cluster's refusal of one job's writes (PostgreSQL's own fencing is in
test_cluster_hosts.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pykka
import pytest
from yard_kit import Yard, eventually, yard_settings

from actors.messages import Cancel, Fence, GetStatus, SupervisorStatus, Unfence, WorkAvailable
from actors.model import Job, JobState
from actors.store import SqliteStore
from actors.store.cluster import Fenced


@pytest.fixture(autouse=True)
def _stop_actors() -> Iterator[None]:
    yield
    pykka.ActorRegistry.stop_all()


class RefusingStore(SqliteStore):
    """SQLite, but the writes of the jobs in ``rescued`` raise ``Fenced`` (and change nothing)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rescued: set[str] = set()
        self.lock = threading.Lock()

    def update(
        self,
        job: Job,
        note: str | None = None,
        *,
        holds_key: bool | None = None,
        was_attempt: int | None = None,
    ) -> None:
        with self.lock:
            if job.id in self.rescued:
                raise Fenced(job.id, getattr(job, "attempt", 0))
        super().update(job, note, holds_key=holds_key, was_attempt=was_attempt)


def status(yard: Yard) -> SupervisorStatus:
    found = yard.sup.ask(GetStatus(), timeout=10.0)
    assert isinstance(found, SupervisorStatus)
    return found


def test_a_fence_kills_every_worker_and_stops_claiming(tmp_path: Path) -> None:
    yard = Yard(tmp_path, yard_settings(max_workers=2)).start()
    first = yard.running_job(yard.submit(work_item="a").id)
    second = yard.running_job(yard.submit(work_item="b").id)
    yard.sup.tell(Fence("test: lease not renewed"))
    eventually(yard.running, lambda cs: cs == [], "every worker killed")
    assert not yard.exists(first.container_id or "")
    assert not yard.exists(second.container_id or "")
    assert status(yard).fenced
    third = yard.submit(work_item="c")
    yard.tick(1.0)
    yard.sup.ask(WorkAvailable(), timeout=10.0)
    assert yard.store.get(third.id).state is JobState.QUEUED  # type: ignore[union-attr]
    assert yard.running() == []


def test_unfence_requeues_the_killed_jobs_and_runs_them_again(tmp_path: Path) -> None:
    yard = Yard(tmp_path, yard_settings(max_workers=2)).start()
    job = yard.running_job(yard.submit(work_item="a").id)
    yard.sup.tell(Fence("test"))
    eventually(yard.running, lambda cs: cs == [], "the worker killed")
    yard.sup.tell(Unfence())
    yard.tick()  # the recovery runs at the next Tick
    again = eventually(
        lambda: yard.job(job.id),
        lambda j: j.state is JobState.RUNNING and j.container_id != job.container_id,
        "the job running again in a new container",
    )
    assert (job.attempt, again.attempt) == (0, 1)  # it ran twice: two attempts
    history = [(state, note) for state, _at, note in yard.store.history(job.id)]
    assert (JobState.QUEUED, "re-queued: this host lost its lease and stopped it") in history
    assert [s for s, _n in history].count(JobState.RUNNING) == 2
    assert not status(yard).fenced
    yard.engine.exit_container(again.container_id or "", 0)
    assert yard.wait_state(job.id, JobState.SUCCEEDED).exit_code == 0


def test_a_fenced_outcome_write_drops_the_flight_and_kills_its_worker(tmp_path: Path) -> None:
    """The attempt was rescued elsewhere: this host writes nothing and never crashes."""
    store = RefusingStore(tmp_path / "jobs.db")
    yard = Yard(tmp_path, yard_settings(max_workers=2), store=store).start()
    job = yard.running_job(yard.submit(work_item="a").id)
    store.rescued.add(job.id)
    yard.sup.ask(Cancel(job.id), timeout=10.0)  # a write: refused
    eventually(lambda: yard.exists(job.container_id or ""), lambda e: not e, "its worker gone")
    assert status(yard).in_flight == 0
    assert yard.store.get(job.id).state is JobState.RUNNING  # type: ignore[union-attr]
    # Still alive and claiming.
    other = yard.running_job(yard.submit(work_item="b").id)
    assert other.state is JobState.RUNNING


def test_a_fenced_finish_is_dropped_not_recorded(tmp_path: Path) -> None:
    store = RefusingStore(tmp_path / "jobs.db")
    yard = Yard(tmp_path, yard_settings(max_workers=1), store=store).start()
    job = yard.running_job(yard.submit(work_item="a").id)
    store.rescued.add(job.id)
    yard.engine.exit_container(job.container_id or "", 0)
    eventually(lambda: status(yard).in_flight, lambda n: n == 0, "the flight dropped")
    assert yard.store.get(job.id).state is JobState.RUNNING  # type: ignore[union-attr]
    nxt = yard.running_job(yard.submit(work_item="b").id)
    assert nxt.state is JobState.RUNNING
