"""The job store: every field survives a restart, history is kept, env stays secret."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.clock import FakeClock
from actors.model import Job, JobSpec, JobState
from actors.store import (
    LOGS_TAIL_LINES,
    MIGRATIONS,
    SCHEMA_VERSION,
    Caps,
    JobStore,
    KeyHeld,
    SqliteStore,
    StoreError,
    new_job_id,
)

SECRET = "hunter2-very-secret-token"


def make_job(
    job_id: str | None = None,
    *,
    project: str = "proj",
    work_item: str = "item-1",
    created_at: float = 1_700_000_000.0,
    state: JobState = JobState.QUEUED,
) -> Job:
    spec = JobSpec(
        project=project,
        work_item=work_item,
        agent_type="review",
        command=("sh", "-c", "echo 'ünïcode' && exit 0"),
        env={"API_TOKEN": SECRET, "EMPTY": ""},
        timeout_s=90.5,
    )
    return Job(
        id=job_id or new_job_id(), spec=spec, state=state, created_at=created_at, deadline=2e9
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    with SqliteStore(
        tmp_path / "nested" / "dir" / "jobs.db", clock=FakeClock(1_800_000_000.0)
    ) as s:
        yield s


def test_creates_parent_directories_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "jobs.db"
    with SqliteStore(path):
        pass
    assert path.exists()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        indexes = {
            row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='index'")
        }
    finally:
        db.close()
    assert {"jobs_state", "jobs_project"} <= indexes


def test_add_then_get_returns_every_field(store: JobStore) -> None:
    job = dataclasses.replace(
        make_job(),
        state=JobState.RUNNING,
        attempts=3,
        container_id="c1",
        image_id="sha256:abc",
        from_snapshot=True,
        snapshot_committed=True,
        exit_code=7,
        error="boom",
        logs_tail="line1\nline2\n",
        started_at=1_700_000_001.0,
        finished_at=1_700_000_002.0,
    )
    store.add(job)
    got = store.get(job.id)
    assert got == job
    assert got is not None
    assert got.spec.env == {"API_TOKEN": SECRET, "EMPTY": ""}  # env is compare=False
    assert got.spec.command == job.spec.command
    assert store.get("j-missing") is None


def test_default_command_none_round_trips(store: JobStore) -> None:
    job = dataclasses.replace(make_job(), spec=JobSpec("p", "w"))
    store.add(job)
    got = store.get(job.id)
    assert got is not None
    assert got.spec.command is None
    assert got.spec.timeout_s is None
    assert dict(got.spec.env) == {}


def test_add_refuses_a_duplicate_id_and_keeps_the_first(store: JobStore) -> None:
    job = make_job("j-dup")
    store.add(job)
    with pytest.raises(sqlite3.IntegrityError):
        store.add(dataclasses.replace(job, attempts=9))
    got = store.get("j-dup")
    assert got is not None
    assert got.attempts == 0
    assert len(store.history("j-dup")) == 1


def test_update_writes_fields_and_records_state_changes_only(store: JobStore) -> None:
    job = make_job("j-1")
    store.add(job, note="submitted")
    store.update(dataclasses.replace(job, attempts=1))  # same state: no history row
    running = dataclasses.replace(
        job, state=JobState.RUNNING, attempts=1, started_at=1_700_000_010.0, container_id="c"
    )
    store.update(running, note="started")
    done = dataclasses.replace(
        running, state=JobState.SUCCEEDED, exit_code=0, finished_at=1_700_000_020.0
    )
    store.update(done)
    assert store.get("j-1") == done
    assert store.history("j-1") == [
        (JobState.QUEUED, 1_700_000_000.0, "submitted"),
        (JobState.RUNNING, 1_700_000_010.0, "started"),
        (JobState.SUCCEEDED, 1_700_000_020.0, None),
    ]


def test_history_uses_the_clock_when_the_job_has_no_timestamp(store: JobStore) -> None:
    job = make_job("j-1")
    store.add(job)
    store.update(dataclasses.replace(job, state=JobState.STARTING))
    assert store.history("j-1")[-1] == (JobState.STARTING, 1_800_000_000.0, None)


def test_update_of_an_unknown_job_raises(store: JobStore) -> None:
    with pytest.raises(KeyError):
        store.update(make_job("j-nope"))
    assert store.job_ids() == set()


def test_logs_tail_keeps_the_last_lines_only(store: JobStore) -> None:
    job = make_job("j-logs")
    store.add(job)
    logs = "".join(f"line {i}\n" for i in range(LOGS_TAIL_LINES + 50))
    store.update(dataclasses.replace(job, logs_tail=logs))
    got = store.get("j-logs")
    assert got is not None
    lines = got.logs_tail.splitlines()
    assert len(lines) == LOGS_TAIL_LINES
    assert lines[0] == "line 50"
    assert lines[-1] == f"line {LOGS_TAIL_LINES + 49}"


def test_list_is_newest_first_and_filters(store: JobStore) -> None:
    a = make_job("j-a", project="p1", created_at=10.0)
    b = make_job("j-b", project="p2", created_at=20.0, state=JobState.FAILED)
    c = make_job("j-c", project="p1", created_at=30.0, state=JobState.FAILED)
    d = make_job("j-d", project="p1", created_at=30.0)  # same time: insertion order breaks ties
    for job in (a, b, c, d):
        store.add(job)
    assert [j.id for j in store.list()] == ["j-d", "j-c", "j-b", "j-a"]
    assert [j.id for j in store.list(limit=2)] == ["j-d", "j-c"]
    assert [j.id for j in store.list(state=JobState.FAILED)] == ["j-c", "j-b"]
    assert [j.id for j in store.list(project="p1")] == ["j-d", "j-c", "j-a"]
    assert [j.id for j in store.list(state=JobState.FAILED, project="p1")] == ["j-c"]
    assert store.list(limit=0) == []
    with pytest.raises(ValueError, match="limit"):
        store.list(limit=-1)


def test_unfinished_is_fifo_and_excludes_terminal_jobs(store: JobStore) -> None:
    jobs = [
        # Distinct keys: one key has one active job at most (the schema says so).
        make_job("j-3", created_at=3.0, state=JobState.RUNNING, work_item="item-3"),
        make_job("j-1", created_at=1.0, state=JobState.QUEUED),
        make_job("j-2", created_at=2.0, state=JobState.STARTING, work_item="item-2"),
        make_job("j-0", created_at=0.5, state=JobState.SUCCEEDED),
        make_job("j-4", created_at=4.0, state=JobState.CANCELLED),
        make_job("j-5", created_at=5.0, state=JobState.TIMED_OUT),
        make_job("j-6", created_at=6.0, state=JobState.FAILED),
    ]
    for job in jobs:
        store.add(job)
    assert [j.id for j in store.unfinished()] == ["j-1", "j-2", "j-3"]
    assert store.job_ids() == {j.id for j in jobs}
    counts = store.count_by_state()
    assert set(counts) == set(JobState)
    assert counts == {
        JobState.QUEUED: 1,
        JobState.STARTING: 1,
        JobState.RUNNING: 1,
        JobState.SUCCEEDED: 1,
        JobState.FAILED: 1,
        JobState.TIMED_OUT: 1,
        JobState.CANCELLED: 1,
    }


def test_jobs_and_history_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    queued = make_job("j-q", created_at=1.0)
    running = dataclasses.replace(
        make_job("j-r", created_at=2.0), state=JobState.RUNNING, started_at=3.0
    )
    with SqliteStore(path) as store:
        store.add(queued)
        store.add(make_job("j-r", created_at=2.0))
        store.update(running, note="adopted")
    with SqliteStore(path) as reopened:
        assert reopened.get("j-q") == queued
        assert reopened.get("j-r") == running
        assert [j.id for j in reopened.unfinished()] == ["j-q", "j-r"]
        assert reopened.history("j-r") == [
            (JobState.QUEUED, 2.0, None),
            (JobState.RUNNING, 3.0, "adopted"),
        ]
        restored = reopened.get("j-q")
        assert restored is not None
        # The secret env is needed to run the job after a restart...
        assert restored.spec.env["API_TOKEN"] == SECRET
        # ...and never shows up when the job is printed or logged.
        assert SECRET not in repr(restored)
        assert SECRET not in str(restored)
        assert SECRET not in repr(restored.spec)


def test_a_committed_add_is_visible_to_another_connection(tmp_path: Path) -> None:
    """submit must not return before the job is on disk: another reader sees it at once."""
    path = tmp_path / "jobs.db"
    with SqliteStore(path) as store:
        store.add(make_job("j-1"))
        other = sqlite3.connect(path)
        try:
            assert other.execute("SELECT id FROM jobs").fetchall() == [("j-1",)]
            assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        finally:
            other.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    with SqliteStore(path):
        pass
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version"):
        SqliteStore(path)


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    path.write_bytes(b"this is not sqlite at all, just some text" * 100)
    with pytest.raises((StoreError, sqlite3.DatabaseError)):
        SqliteStore(path)


def test_reads_run_while_another_thread_writes(store: JobStore) -> None:
    writers_done = threading.Event()
    errors: list[BaseException] = []
    seen: list[int] = []

    def write() -> None:
        try:
            for i in range(200):
                job = make_job(f"j-{i:04d}", created_at=float(i), work_item=f"item-{i}")
                store.add(job)
                store.update(dataclasses.replace(job, state=JobState.RUNNING, started_at=i + 0.5))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            writers_done.set()

    def read() -> None:
        try:
            while True:
                finished = writers_done.is_set()
                jobs = store.list(limit=1000)
                seen.append(len(jobs))
                for job in jobs:
                    # A reader never sees a half-written job.
                    assert job.spec.env["API_TOKEN"] == SECRET
                    assert len(store.history(job.id)) in (1, 2)
                store.count_by_state()
                if finished:
                    break
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert len(seen) >= 3
    assert max(seen) == 200
    assert store.count_by_state()[JobState.RUNNING] == 200
    assert all(len(store.history(f"j-{i:04d}")) == 2 for i in range(200))


def test_job_ids_sort_by_creation_and_are_unique() -> None:
    ids = [new_job_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(i.startswith("j-") and len(i) == 34 for i in ids)


# --- the queue: indexed claims and the v1 -> v2 migration ---------------------------


def test_claim_walks_indexes_never_the_whole_table(store: SqliteStore) -> None:
    """Every table access of the claim is an index walk or lookup, with no sort.

    A claim that sorts the whole queue costs more with every queued job; an
    indexed walk stops at the last free slot (the cluster issue measured
    371 against 1,273 claims/s on 10k rows).
    """
    for i in range(50):  # a queue, so the planner has rows to weigh
        store.add(make_job(f"j-{i:03d}", created_at=float(i), work_item=f"item-{i % 7}"))
    with contextlib.closing(sqlite3.connect(store.path)) as db:
        db.execute("ANALYZE")  # statistics, as a long-lived store has them
    plan = store.explain_claim()
    accesses = [step for step in plan if step.startswith(("SCAN", "SEARCH"))]
    assert accesses, plan
    assert all("USING" in step and "INDEX" in step for step in accesses), plan
    assert not any("TEMP B-TREE" in step for step in plan), plan
    assert any("jobs_queue" in step for step in accesses), plan
    assert any("jobs_key_holder" in step for step in accesses), plan


def test_a_version_1_database_is_migrated_and_its_active_jobs_hold_their_keys(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jobs.db"
    db = sqlite3.connect(path, isolation_level=None)
    MIGRATIONS[0](db)
    db.execute("PRAGMA user_version = 1")
    columns = (
        "id, project, work_item, agent_type, command, env, timeout_s, state, created_at, "
        "attempts, from_snapshot, snapshot_committed, logs_tail"
    )
    rows = [
        ("j-1", "item-1", "running", 1.0),
        ("j-2", "item-1", "queued", 2.0),
        ("j-3", "item-2", "queued", 3.0),
        ("j-4", "item-3", "succeeded", 4.0),
    ]
    for job_id, item, state, created in rows:
        db.execute(
            f"INSERT INTO jobs ({columns}) VALUES (?, 'proj', ?, 'review', NULL, '{{}}', NULL,"
            " ?, ?, 0, 0, 0, '')",
            (job_id, item, state, created),
        )
    db.close()
    with SqliteStore(path) as store, contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert [j.id for j in store.unfinished()] == ["j-1", "j-2", "j-3"]
        # j-1 still holds item-1, so its queued successor waits; item-2 runs.
        assert [j.id for j in store.claim(5, 10.0, Caps.none())] == ["j-3"]
        with pytest.raises(KeyHeld):
            store.add(make_job("j-5", work_item="item-1", state=JobState.RUNNING))


def test_a_finished_jobs_secret_is_gone_from_the_database_file(tmp_path: Path) -> None:
    """Regression (issue 11, item 4): ``grep hunter2 snapyard.db`` found every
    job's secrets, forever. Blanked at the end, and zeroed (secure_delete)."""
    path = tmp_path / "jobs.db"
    with SqliteStore(path) as store:
        job = make_job(state=JobState.RUNNING)
        store.add(job)
        store.update(dataclasses.replace(job, state=JobState.SUCCEEDED, finished_at=2.0))
    # Closing checkpoints the WAL into the main file and removes it.
    files = [p for p in tmp_path.iterdir() if p.name.startswith("jobs.db")]
    assert files
    assert all(SECRET.encode() not in p.read_bytes() for p in files)


def test_the_migration_scrubs_the_env_of_jobs_finished_before_it(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    db = sqlite3.connect(path, isolation_level=None)
    MIGRATIONS[0](db)
    MIGRATIONS[1](db)
    db.execute("PRAGMA user_version = 2")
    columns = (
        "id, project, work_item, agent_type, command, env, timeout_s, state, created_at, "
        "attempts, from_snapshot, snapshot_committed, logs_tail"
    )
    for job_id, item, state in (("j-1", "a", "failed"), ("j-2", "b", "queued")):
        db.execute(
            f"INSERT INTO jobs ({columns}) VALUES (?, 'proj', ?, 'review', NULL, ?, NULL,"
            " ?, 1.0, 0, 0, 0, '')",
            (job_id, item, f'{{"TOKEN": "{SECRET}"}}', state),
        )
    db.close()
    with SqliteStore(path) as store:
        finished, queued = store.get("j-1"), store.get("j-2")
        assert finished is not None
        assert queued is not None
        assert finished.spec.env == {}
        assert queued.spec.env == {"TOKEN": SECRET}


def test_a_version_4_database_gets_the_cluster_fields_with_their_defaults(
    tmp_path: Path,
) -> None:
    """v5 (issue 14): attempt (the fencing token), host and queued_at; a job
    written before them is attempt 0 on no host, queued since its creation."""
    path = tmp_path / "jobs.db"
    db = sqlite3.connect(path, isolation_level=None)
    for migrate in MIGRATIONS[:4]:
        migrate(db)
    db.execute("PRAGMA user_version = 4")
    db.execute(
        "INSERT INTO jobs (id, project, work_item, agent_type, command, env, timeout_s, state,"
        " created_at, attempts, from_snapshot, snapshot_committed, logs_tail, holds_key)"
        " VALUES ('j-1', 'proj', 'a', 'review', NULL, '{}', NULL, 'running', 1.0, 1, 0, 0, '', 1)"
    )
    db.close()
    with SqliteStore(path) as store:
        old = store.get("j-1")
        assert old is not None
        assert (old.attempt, old.host, old.queued_at) == (0, None, None)
        store.update(dataclasses.replace(old, state=JobState.SUCCEEDED, finished_at=2.0))
        assert store.claim(1, 3.0, Caps.none()) == []
        done = store.get("j-1")
        assert done is not None
        assert done.state is JobState.SUCCEEDED
