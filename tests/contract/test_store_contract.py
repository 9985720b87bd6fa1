"""One suite, every store: what a job store must do to be Snapyard's queue.

Each test runs against every implementation: SQLite, and the cluster's
PostgreSQL store (a throwaway server, emptied per test) which must pass unchanged. The
admission rules pinned here are the ones the Supervisor relied on when the
queue lived in its memory: FIFO within the constraints, one active job per
(project, work item), per-project and per-agent-type caps, requeue backoff,
and a key that must wait never holding up other keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from actors.clock import FakeClock
from actors.model import Job, JobSpec, JobState, SnapshotKey
from actors.store import Caps, JobStore, KeyHeld, SqliteStore, new_job_id
from actors.store.cluster import Fenced

NOW = 1_800_000_000.0

Opener = Callable[[Path], JobStore]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def opener(request: pytest.FixtureRequest) -> Opener:
    """Opens the store under test; a second call is a reopen of the same data."""
    if request.param == "sqlite":
        return lambda path: SqliteStore(path / "jobs.db", FakeClock(NOW))
    from actors.store.postgres import PostgresStore

    url = request.getfixturevalue("postgres_url")
    return lambda _path: PostgresStore(url, "host-a", FakeClock(NOW))


@pytest.fixture
def store(opener: Opener, tmp_path: Path) -> Iterator[JobStore]:
    s = opener(tmp_path)
    try:
        yield s
    finally:
        s.close()


_created = iter(range(1, 1_000_000))


def job(
    work_item: str = "w",
    *,
    project: str = "p",
    agent_type: str = "default",
    state: JobState = JobState.QUEUED,
    retry_at: float | None = None,
) -> Job:
    """A job created one second after the previous one: FIFO order is creation order."""
    spec = JobSpec(project, work_item, agent_type, env={"TOKEN": "secret"})
    return Job(new_job_id(), spec, state, NOW - 1000 + next(_created), retry_at=retry_at)


def queue(store: JobStore, *jobs: Job) -> list[Job]:
    for j in jobs:
        store.add(j, note="submitted")
    return list(jobs)


def ids(jobs: list[Job]) -> list[str]:
    return [j.id for j in jobs]


def caps(projects: dict[str, int] | None = None, agents: dict[str, int] | None = None) -> Caps:
    p, a = projects or {}, agents or {}
    return Caps(p.get, a.get)


# --- rows and history -------------------------------------------------------------


def test_a_job_round_trips_every_field(store: JobStore) -> None:
    original = dataclasses.replace(
        job(retry_at=NOW + 5),
        attempts=2,
        container_id="c" * 64,
        image_id="sha256:" + "a" * 64,
        from_snapshot=True,
        exit_code=3,
        error="boom",
        logs_tail="line\n",
        started_at=NOW - 10,
        deadline=NOW + 100,
        attempt=3,
        host="host-a",
        queued_at=NOW - 20,
    )
    store.add(original)
    assert store.get(original.id) == original
    assert store.get(original.id).spec.env == {"TOKEN": "secret"}  # type: ignore[union-attr]
    assert store.get("j-missing") is None


@pytest.mark.parametrize("state", [s for s in JobState if s.terminal])
def test_a_terminal_jobs_env_is_deleted_and_stays_deleted(
    opener: Opener, tmp_path: Path, state: JobState
) -> None:
    """Regression (issue 11, item 4): the job env (secrets) was kept forever."""
    first = opener(tmp_path)
    try:
        running, ended_at_once = queue(
            first, job("a", state=JobState.RUNNING), dataclasses.replace(job("b"), state=state)
        )
        first.update(dataclasses.replace(running, state=state, finished_at=NOW))
        for j in (running, ended_at_once):
            stored = first.get(j.id)
            assert stored is not None
            assert stored.state is state
            assert stored.spec.env == {}
    finally:
        first.close()
    second = opener(tmp_path)
    try:
        assert all(j.spec.env == {} for j in second.list())
    finally:
        second.close()


def test_an_unfinished_jobs_env_is_kept_for_its_run(store: JobStore) -> None:
    """Queued jobs must run after a restart, running ones be re-adopted: their env stays."""
    queued, running = queue(store, job("a"), job("b", state=JobState.RUNNING))
    store.update(dataclasses.replace(queued, retry_at=NOW + 5))
    for j in (queued, running):
        stored = store.get(j.id)
        assert stored is not None
        assert stored.spec.env == {"TOKEN": "secret"}


def test_a_state_change_appends_history_and_a_field_change_does_not(store: JobStore) -> None:
    (j,) = queue(store, job())
    store.update(dataclasses.replace(j, error="still queued"))
    store.update(dataclasses.replace(j, state=JobState.CANCELLED, finished_at=NOW), note="bye")
    assert [(s, n) for s, _, n in store.history(j.id)] == [
        (JobState.QUEUED, "submitted"),
        (JobState.CANCELLED, "bye"),
    ]


# --- fencing: writes carry the attempt they were claimed with ----------------------


def test_a_write_for_an_older_attempt_is_fenced_and_changes_nothing(store: JobStore) -> None:
    """A host cut off while its job was rescued comes back: its outcome must not land."""
    (current,) = queue(store, dataclasses.replace(job("w", state=JobState.RUNNING), attempt=1))
    late = dataclasses.replace(
        current, attempt=0, state=JobState.SUCCEEDED, finished_at=NOW, exit_code=0
    )
    with pytest.raises(Fenced) as refused:
        store.update(late, note="late")
    assert (refused.value.job_id, refused.value.attempt) == (current.id, 0)
    assert store.get(current.id) == current
    assert [s for s, _, _ in store.history(current.id)] == [JobState.RUNNING]
    with pytest.raises(KeyHeld):  # the fenced write released nothing
        store.add(job("w", state=JobState.STARTING))
    store.update(dataclasses.replace(current, state=JobState.SUCCEEDED, finished_at=NOW))
    stored = store.get(current.id)
    assert stored is not None
    assert stored.state is JobState.SUCCEEDED


def test_a_fenced_write_in_a_batch_keeps_the_others(store: JobStore) -> None:
    (current,) = queue(store, dataclasses.replace(job("w"), attempt=2))
    with store.batch():
        with pytest.raises(Fenced):
            store.update(dataclasses.replace(current, attempt=1, error="late"))
        (other,) = queue(store, job("x"))
    assert store.get(current.id) == current
    assert store.get(other.id) == other


def test_a_new_attempt_is_written_only_while_the_row_has_the_old_one(store: JobStore) -> None:
    """A re-queue after a fence: attempt + 1, guarded by the attempt it replaces."""
    (current,) = queue(store, dataclasses.replace(job("w"), attempt=1))
    stale = dataclasses.replace(current, attempt=3, error="stale")
    with pytest.raises(Fenced):
        store.update(stale, was_attempt=2)
    assert store.get(current.id) == current
    store.update(dataclasses.replace(current, attempt=2), note="again", was_attempt=1)
    stored = store.get(current.id)
    assert stored is not None
    assert (stored.state, stored.attempt) == (JobState.QUEUED, 2)


def test_an_update_of_an_unknown_job_raises_key_error(store: JobStore) -> None:
    with pytest.raises(KeyError):
        store.update(job("never-added"))


def test_a_claimed_job_keeps_its_attempt(store: JobStore) -> None:
    (queued,) = queue(store, dataclasses.replace(job("w"), attempt=4, queued_at=NOW - 1))
    (claimed,) = store.claim(1, NOW, Caps.none())
    assert claimed.attempt == 4
    assert store.get(queued.id) == claimed
    store.update(dataclasses.replace(claimed, state=JobState.RUNNING, started_at=NOW))


# --- one active job per key, in the schema ------------------------------------------


def test_a_second_active_job_of_a_key_is_refused(store: JobStore) -> None:
    queue(store, job("w", state=JobState.RUNNING))
    with pytest.raises(KeyHeld):
        store.add(job("w", state=JobState.STARTING))
    (waiting,) = queue(store, job("w"))
    with pytest.raises(KeyHeld):
        store.update(dataclasses.replace(waiting, state=JobState.RUNNING))
    assert store.get(waiting.id) == waiting  # the refused write left nothing behind
    queue(store, job("other", state=JobState.RUNNING))  # another key is free


def test_a_cancelled_job_whose_container_still_runs_holds_its_key(store: JobStore) -> None:
    (running,) = queue(store, job("w", state=JobState.RUNNING))
    (waiting,) = queue(store, job("w"))
    cancelled = dataclasses.replace(running, state=JobState.CANCELLED)
    store.update(cancelled, holds_key=True)
    assert store.claim(4, NOW, Caps.none()) == []
    assert ids(store.unfinished()) == [running.id, waiting.id]  # a holder is resumed too
    store.update(dataclasses.replace(cancelled, finished_at=NOW))  # its container is gone
    assert ids(store.claim(4, NOW, Caps.none())) == [waiting.id]
    assert ids(store.unfinished()) == [waiting.id]


# --- claim ----------------------------------------------------------------------------


def test_claim_takes_the_oldest_jobs_and_writes_their_state(store: JobStore) -> None:
    a, b, c = queue(store, job("a"), job("b"), job("c"))
    claimed = store.claim(2, NOW, Caps.none(), note="claimed")
    assert ids(claimed) == [a.id, b.id]
    assert all(j.state is JobState.STARTING for j in claimed)
    for j in (a, b):
        stored = store.get(j.id)
        assert stored is not None
        assert stored.state is JobState.STARTING
        assert store.history(j.id)[-1][0::2] == (JobState.STARTING, "claimed")
    assert store.get(c.id) == c
    assert ids(store.claim(5, NOW, Caps.none())) == [c.id]
    assert store.claim(5, NOW, Caps.none()) == []


def test_claim_of_no_slots_claims_nothing(store: JobStore) -> None:
    queue(store, job())
    assert store.claim(0, NOW, Caps.none()) == []


def test_one_job_per_key_at_a_time_in_submission_order(store: JobStore) -> None:
    first, second, other = queue(store, job("w"), job("w"), job("x"))
    assert ids(store.claim(3, NOW, Caps.none())) == [first.id, other.id]
    assert store.claim(3, NOW, Caps.none()) == []
    store.update(dataclasses.replace(first, state=JobState.SUCCEEDED, finished_at=NOW))
    assert ids(store.claim(3, NOW, Caps.none())) == [second.id]


def test_a_busy_key_never_holds_up_other_keys(store: JobStore) -> None:
    queue(store, job("busy", state=JobState.RUNNING))
    waiting = queue(store, *(job("busy") for _ in range(5)))
    (free,) = queue(store, job("free"))
    assert ids(store.claim(1, NOW, Caps.none())) == [free.id]
    assert all(store.get(j.id) == j for j in waiting)


def test_blocked_keys_are_skipped(store: JobStore) -> None:
    """A container no job owns (a leftover of a previous run) holds its key too."""
    a, b = queue(store, job("a"), job("b"))
    blocked = {SnapshotKey("p", "a")}
    assert ids(store.claim(2, NOW, Caps.none(), blocked=blocked)) == [b.id]
    assert ids(store.claim(2, NOW, Caps.none())) == [a.id]


def test_a_backing_off_job_waits_and_its_key_with_it(store: JobStore) -> None:
    retrying, same_key, other = queue(store, job("w", retry_at=NOW + 10), job("w"), job("x"))
    assert ids(store.claim(3, NOW, Caps.none())) == [other.id]
    claimed = store.claim(3, NOW + 10, Caps.none())
    assert ids(claimed) == [retrying.id]
    assert claimed[0].retry_at is None
    stored = store.get(retrying.id)
    assert stored is not None
    assert stored.retry_at is None
    assert store.get(same_key.id) == same_key


def test_project_cap_counts_every_key_holder(store: JobStore) -> None:
    (running,) = queue(store, job("r", state=JobState.RUNNING))
    a, b, other = queue(store, job("a"), job("b"), job("o", project="q"))
    limit = caps(projects={"p": 2})
    assert ids(store.claim(5, NOW, limit)) == [a.id, other.id]
    assert store.claim(5, NOW, limit) == []
    store.update(dataclasses.replace(running, state=JobState.CANCELLED), holds_key=True)
    assert store.claim(5, NOW, limit) == []  # still holds its key, still counts
    store.update(dataclasses.replace(running, state=JobState.CANCELLED, finished_at=NOW))
    assert ids(store.claim(5, NOW, limit)) == [b.id]


def test_agent_type_cap_and_a_capped_key_keeps_its_order(store: JobStore) -> None:
    first, b_head, other_agent = queue(
        store, job("a", agent_type="big"), job("b", agent_type="big"), job("c")
    )
    (b_next,) = queue(store, job("b"))  # not capped itself, but behind a capped head
    limit = caps(agents={"big": 1})
    assert ids(store.claim(5, NOW, limit)) == [first.id, other_agent.id]
    store.update(dataclasses.replace(first, state=JobState.SUCCEEDED, finished_at=NOW))
    assert ids(store.claim(5, NOW, limit)) == [b_head.id]
    assert store.get(b_next.id) == b_next


def test_a_capped_job_never_holds_up_other_projects(store: JobStore) -> None:
    queue(store, job("r", state=JobState.RUNNING))
    capped = queue(store, *(job(f"c{i}") for i in range(3)))
    (free,) = queue(store, job("f", project="q"))
    assert ids(store.claim(5, NOW, caps(projects={"p": 1}))) == [free.id]
    assert all(store.get(j.id) == j for j in capped)


def test_a_claim_survives_a_reopen(opener: Opener, tmp_path: Path) -> None:
    first = opener(tmp_path)
    try:
        a, b = queue(first, job("a"), job("a"))
        first.claim(2, NOW, Caps.none())
    finally:
        first.close()
    second = opener(tmp_path)
    try:
        stored = second.get(a.id)
        assert stored is not None
        assert stored.state is JobState.STARTING
        assert second.claim(2, NOW, Caps.none()) == []  # its key is still held
        assert ids(second.unfinished()) == [a.id, b.id]
    finally:
        second.close()


# --- group commit --------------------------------------------------------------------


def test_writes_in_a_batch_commit_together(opener: Opener, tmp_path: Path) -> None:
    writer = opener(tmp_path)
    reader = opener(tmp_path)
    try:
        with writer.batch():
            (a,) = queue(writer, job("a"))
            with writer.batch():  # nested: still one transaction
                writer.claim(1, NOW, Caps.none())
            assert reader.get(a.id) is None  # nothing is visible before the batch ends
        stored = reader.get(a.id)
        assert stored is not None
        assert stored.state is JobState.STARTING
    finally:
        writer.close()
        reader.close()


def test_a_refused_write_in_a_batch_keeps_the_others(store: JobStore) -> None:
    with store.batch():
        (held,) = queue(store, job("w", state=JobState.RUNNING))
        with pytest.raises(KeyHeld):
            store.add(job("w", state=JobState.RUNNING))
        (other,) = queue(store, job("x"))
    assert store.get(held.id) == held
    assert store.get(other.id) == other
    assert store.count_by_state()[JobState.RUNNING] == 1


# --- retention ------------------------------------------------------------------------


def test_prune_deletes_only_finished_jobs_that_ended_before_the_cutoff(store: JobStore) -> None:
    """Retention (issue 11): finished jobs and their history go after retention_s;
    unfinished ones, recent ones and one still holding its key never do."""
    old_done = dataclasses.replace(job("a"), state=JobState.SUCCEEDED, finished_at=NOW - 100)
    old_failed = dataclasses.replace(job("b"), state=JobState.FAILED, finished_at=NOW - 50)
    recent = dataclasses.replace(job("c"), state=JobState.SUCCEEDED, finished_at=NOW)
    old_queued = job("d")
    holding = job("e", state=JobState.RUNNING)
    queue(store, old_done, old_failed, recent, old_queued, holding)
    store.update(
        dataclasses.replace(holding, state=JobState.CANCELLED, finished_at=NOW - 100),
        holds_key=True,
    )
    assert store.prune_finished(NOW - 10) == 2
    assert store.job_ids() == {recent.id, old_queued.id, holding.id}
    assert store.get(old_done.id) is None
    assert store.history(old_done.id) == []
    assert store.count_by_state()[JobState.SUCCEEDED] == 1
    assert store.prune_finished(NOW - 10) == 0


# --- snapshot use times --------------------------------------------------------------


def test_snapshot_use_times_keep_the_latest_and_survive_a_reopen(
    opener: Opener, tmp_path: Path
) -> None:
    """Regression (issue 11, item 8): LRU order must outlive the process."""
    a, b = ("p", "a", "sha256:" + "a" * 64), ("p", "b", "sha256:" + "b" * 64)
    first = opener(tmp_path)
    try:
        assert first.load_usage() == {}
        first.record_usage({a: NOW, b: NOW + 1}, None)
        first.record_usage({a: NOW - 5}, None)  # an older time never wins
    finally:
        first.close()
    second = opener(tmp_path)
    try:
        assert second.load_usage() == {a: NOW, b: NOW + 1}
        second.record_usage({}, [b])  # a's snapshot is gone from the registry
        assert second.load_usage() == {b: NOW + 1}
    finally:
        second.close()


# --- reading ---------------------------------------------------------------------------


def test_list_is_newest_first_and_filters(store: JobStore) -> None:
    a, b, c = queue(store, job("a"), job("b", project="q"), job("c"))
    store.update(dataclasses.replace(c, state=JobState.FAILED, finished_at=NOW))
    assert ids(store.list()) == [c.id, b.id, a.id]
    assert ids(store.list(limit=2)) == [c.id, b.id]
    assert ids(store.list(project="q")) == [b.id]
    assert ids(store.list(state=JobState.QUEUED, project="p")) == [a.id]
    with pytest.raises(ValueError, match="limit"):
        store.list(limit=-1)


def test_counts_cover_every_state_and_ids_every_job(store: JobStore) -> None:
    jobs = queue(store, job("a"), job("b", state=JobState.RUNNING))
    counts = store.count_by_state()
    assert set(counts) == set(JobState)
    assert counts[JobState.QUEUED] == 1
    assert counts[JobState.RUNNING] == 1
    assert sum(counts.values()) == 2
    assert store.job_ids() == {j.id for j in jobs}


def test_changes_are_every_state_change_in_order_after_a_cursor(store: JobStore) -> None:
    """What GET /events follows: a cursor that only grows, pages that resume from it."""
    assert store.last_change() == 0
    assert store.changes(0) == []
    first, second = job("a"), job("b")
    queue(store, first, second)
    store.update(dataclasses.replace(first, state=JobState.RUNNING, started_at=NOW + 1))
    store.update(dataclasses.replace(first, state=JobState.RUNNING, error="same state"))
    changes = store.changes(0)
    assert [(job_id, state) for _, job_id, state, _ in changes] == [
        (first.id, JobState.QUEUED),
        (second.id, JobState.QUEUED),
        (first.id, JobState.RUNNING),
    ]
    seqs = [seq for seq, *_ in changes]
    assert seqs == sorted(seqs)
    assert store.last_change() == seqs[-1]
    # Resuming from a cursor gives only what came after it, in pages.
    assert store.changes(seqs[0]) == changes[1:]
    assert store.changes(seqs[0], limit=1) == changes[1:2]
    assert store.changes(seqs[-1]) == []
