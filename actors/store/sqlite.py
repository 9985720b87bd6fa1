"""The single-host job store: SQLite in WAL mode, so nothing is lost on restart.

It implements ``actors.store.base.JobStore``; the contract suite pins what
that means. Only the Supervisor actor writes; the API may read from other
threads. One connection guarded by a lock keeps that simple and correct: the
store is never the bottleneck next to starting a container.

A job's ``env`` is stored (a queued job must be runnable after a restart)
but it is secret: this module never logs it, and ``Job``/``JobSpec`` reprs
hide it.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import dataclasses
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from actors.clock import Clock, SystemClock
from actors.model import Job, JobSpec, JobState, SnapshotKey
from actors.store.base import Caps, KeyHeld, StoreError, tail

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SqliteStore", "new_job_id"]

UNFINISHED_STATES = (JobState.QUEUED, JobState.STARTING, JobState.RUNNING)
_HOLDING_STATES = (JobState.STARTING, JobState.RUNNING)


# --- job IDs ---------------------------------------------------------------

_RANDOM_BITS = 80


class _JobIds:
    """Like UUIDv7, but monotonic within this process: two IDs made in the same
    millisecond (or after the wall clock stepped back) still sort in the order
    they were made, so listing by ID is listing by submission.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = (0, 0)

    def next(self) -> str:
        with self._lock:
            millis = time.time_ns() // 1_000_000
            last_millis, last_rand = self._last
            if millis <= last_millis:
                millis, rand = last_millis, last_rand + 1
                if rand >= 1 << _RANDOM_BITS:  # pragma: no cover - 2**80 IDs in one ms
                    millis, rand = last_millis + 1, 0
            else:
                rand = secrets.randbits(_RANDOM_BITS - 1)  # headroom to increment
            self._last = (millis, rand)
        return f"j-{millis:012x}{rand:020x}"


_JOB_IDS = _JobIds()


def new_job_id() -> str:
    """A job ID that sorts by creation time: ``j-`` + 48-bit ms time + 80 random bits."""
    return _JOB_IDS.next()


# --- schema ----------------------------------------------------------------


_SCHEMA_V1 = (
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        project TEXT NOT NULL,
        work_item TEXT NOT NULL,
        agent_type TEXT NOT NULL,
        command TEXT,            -- JSON list, or NULL for the worker's default
        env TEXT NOT NULL,       -- JSON object, secret
        timeout_s REAL,
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        attempts INTEGER NOT NULL,
        container_id TEXT,
        image_id TEXT,
        from_snapshot INTEGER NOT NULL,
        snapshot_committed INTEGER NOT NULL,
        exit_code INTEGER,
        error TEXT,
        logs_tail TEXT NOT NULL,
        started_at REAL,
        finished_at REAL,
        deadline REAL
    )
    """,
    "CREATE INDEX jobs_state ON jobs (state, created_at)",
    "CREATE INDEX jobs_project ON jobs (project, created_at)",
    "CREATE INDEX jobs_created ON jobs (created_at)",
    """
    CREATE TABLE job_history (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        state TEXT NOT NULL,
        at REAL NOT NULL,
        note TEXT
    )
    """,
    "CREATE INDEX job_history_job ON job_history (job_id, seq)",
)


def _schema_v1(db: sqlite3.Connection) -> None:
    # Statement by statement: executescript() would commit the migration's
    # transaction halfway and leave a half-built schema on a crash.
    for statement in _SCHEMA_V1:
        db.execute(statement)


def _schema_v2(db: sqlite3.Connection) -> None:
    """The store becomes the queue: key holders, backoff, and indexed claims.

    ``holds_key`` marks the job that holds its (project, work item), from its
    claim until its container is gone; the unique partial index makes a
    second holder impossible. An old database's starting and running jobs
    hold their keys (the oldest one per key, should a bug have left two).
    The partial indexes spell their conditions as literals: SQLite uses a
    partial index only for a query whose WHERE clause repeats them so.
    """
    db.execute("ALTER TABLE jobs ADD COLUMN holds_key INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE jobs ADD COLUMN retry_at REAL")
    db.execute(
        """
        UPDATE jobs SET holds_key = 1
        WHERE state IN ('starting', 'running') AND id = (
            SELECT other.id FROM jobs AS other
            WHERE other.project = jobs.project AND other.work_item = jobs.work_item
              AND other.state IN ('starting', 'running')
            ORDER BY other.created_at, other.id LIMIT 1
        )
        """
    )
    db.execute(
        "CREATE UNIQUE INDEX jobs_key_holder ON jobs (project, work_item) WHERE holds_key = 1"
    )
    db.execute("CREATE INDEX jobs_queue ON jobs (created_at, id) WHERE state = 'queued'")
    db.execute(
        "CREATE INDEX jobs_queue_by_key ON jobs (project, work_item, created_at, id) "
        "WHERE state = 'queued'"
    )


# MIGRATIONS[n] takes a database at user_version n to n + 1. To change the
# schema, append a function; never edit one that has shipped.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_schema_v1, _schema_v2)
SCHEMA_VERSION = len(MIGRATIONS)

_COLUMNS = (
    "id",
    "project",
    "work_item",
    "agent_type",
    "command",
    "env",
    "timeout_s",
    "state",
    "created_at",
    "attempts",
    "container_id",
    "image_id",
    "from_snapshot",
    "snapshot_committed",
    "exit_code",
    "error",
    "logs_tail",
    "started_at",
    "finished_at",
    "deadline",
    "retry_at",
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM jobs"  # noqa: S608 - constant column list


def _row(job: Job) -> tuple[Any, ...]:
    spec = job.spec
    return (
        job.id,
        spec.project,
        spec.work_item,
        spec.agent_type,
        None if spec.command is None else json.dumps(list(spec.command)),
        json.dumps(dict(spec.env), sort_keys=True),
        spec.timeout_s,
        job.state.value,
        job.created_at,
        job.attempts,
        job.container_id,
        job.image_id,
        int(job.from_snapshot),
        int(job.snapshot_committed),
        job.exit_code,
        job.error,
        tail(job.logs_tail),
        job.started_at,
        job.finished_at,
        job.deadline,
        job.retry_at,
    )


def _job(row: sqlite3.Row) -> Job:
    command = row["command"]
    spec = JobSpec(
        project=row["project"],
        work_item=row["work_item"],
        agent_type=row["agent_type"],
        command=None if command is None else tuple(json.loads(command)),
        env=json.loads(row["env"]),
        timeout_s=row["timeout_s"],
    )
    return Job(
        id=row["id"],
        spec=spec,
        state=JobState(row["state"]),
        created_at=row["created_at"],
        attempts=row["attempts"],
        container_id=row["container_id"],
        image_id=row["image_id"],
        from_snapshot=bool(row["from_snapshot"]),
        snapshot_committed=bool(row["snapshot_committed"]),
        exit_code=row["exit_code"],
        error=row["error"],
        logs_tail=row["logs_tail"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        deadline=row["deadline"],
        retry_at=row["retry_at"],
    )


class SqliteStore:
    """Jobs, their state history and the queue, in one SQLite file."""

    def __init__(self, path: str | os.PathLike[str], clock: Clock | None = None) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock or SystemClock()
        self._lock = threading.RLock()
        self._depth = 0  # open batch() levels; writes inside commit with the outermost
        # isolation_level=None: we open transactions ourselves, so a commit
        # happens exactly where the code says it does.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL, not NORMAL: in WAL mode NORMAL may lose the last commits on
            # power loss, and a submitted job must be on disk before submit
            # returns. batch() shares one fsync among a message's writes.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> None:
        with self._lock:
            try:
                version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"{self.path} is not a Snapyard job store: {exc}") from None
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has schema version {version}; this Snapyard knows "
                    f"up to {SCHEMA_VERSION}. Upgrade Snapyard or use another data_dir."
                )
            for target in range(version, SCHEMA_VERSION):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    MIGRATIONS[target](self._db)
                    self._db.execute(f"PRAGMA user_version = {target + 1}")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """One transaction for every write inside: one fsync for a message's changes.

        It commits even when the body raises: the caller's memory already
        reflects the writes made so far, as it did when each write committed
        on its own, and a rollback would make the two disagree.
        """
        with self._lock:
            if self._depth == 0:
                self._db.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """All or nothing: its own transaction, or a savepoint inside a batch."""
        with self._lock:
            commit: str
            rollback: tuple[str, ...]
            if self._depth == 0:
                self._db.execute("BEGIN IMMEDIATE")
                commit, rollback = "COMMIT", ("ROLLBACK",)
            else:
                self._db.execute("SAVEPOINT write")
                commit, rollback = "RELEASE write", ("ROLLBACK TO write", "RELEASE write")
            try:
                yield self._db
            except sqlite3.IntegrityError as exc:
                for statement in rollback:
                    self._db.execute(statement)
                if "jobs.project, jobs.work_item" in str(exc):
                    raise KeyHeld(f"another job holds this (project, work item): {exc}") from None
                raise
            except BaseException:
                for statement in rollback:
                    self._db.execute(statement)
                raise
            self._db.execute(commit)

    def _write(self, statements: Iterable[tuple[str, tuple[Any, ...]]]) -> None:
        with self._transaction() as db:
            for sql, params in statements:
                db.execute(sql, params)

    def _history_time(self, job: Job) -> float:
        """The moment of a transition, taken from the job when it says so.

        The Supervisor stamps started_at/finished_at with its own (injected)
        clock; reusing them keeps history consistent with the job itself.
        """
        if job.state.terminal and job.finished_at is not None:
            return job.finished_at
        if job.state is JobState.RUNNING and job.started_at is not None:
            return job.started_at
        return self._clock.now()

    def add(self, job: Job, note: str | None = None) -> None:
        """Insert a new job and its first history row; raises if the ID exists."""
        columns = (*_COLUMNS, "holds_key")
        placeholders = ", ".join("?" for _ in columns)
        self._write(
            [
                (
                    f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({placeholders})",  # noqa: S608
                    (*_row(job), int(job.state in _HOLDING_STATES)),
                ),
                (
                    "INSERT INTO job_history (job_id, state, at, note) VALUES (?, ?, ?, ?)",
                    (job.id, job.state.value, job.created_at, note),
                ),
            ]
        )

    def update(self, job: Job, note: str | None = None, *, holds_key: bool | None = None) -> None:
        """Write every field of ``job``; a state change also appends a history row."""
        holds = job.state in _HOLDING_STATES if holds_key is None else holds_key
        assignments = ", ".join(f"{name} = ?" for name in (*_COLUMNS[1:], "holds_key"))
        row = _row(job)
        with self._transaction() as db:
            current = db.execute("SELECT state FROM jobs WHERE id = ?", (job.id,)).fetchone()
            if current is None:
                raise KeyError(job.id)
            db.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ?",  # noqa: S608
                (*row[1:], int(holds), job.id),
            )
            if current["state"] != job.state.value:
                db.execute(
                    "INSERT INTO job_history (job_id, state, at, note) VALUES (?, ?, ?, ?)",
                    (job.id, job.state.value, self._history_time(job), note),
                )

    def claim(
        self,
        slots: int,
        now: float,
        caps: Caps,
        *,
        blocked: Collection[SnapshotKey] = (),
        note: str | None = None,
    ) -> builtins.list[Job]:
        """Move up to ``slots`` queued jobs to STARTING; see ``JobStore.claim`` for the rules.

        Two steps in one transaction, as River and Oban fetch: walk the queue
        in submission order through ``jobs_queue``, keeping only keys' oldest
        jobs whose key no one holds (both checks are index lookups), and stop
        as soon as the slots are filled; then mark the chosen ones. The cost
        follows the jobs looked at, never the length of the queue.
        """
        if slots <= 0:
            return []
        with self._transaction() as db:
            projects: collections.Counter[str] = collections.Counter()
            agents: collections.Counter[str] = collections.Counter()
            for holder in db.execute(_HOLDERS):
                projects[holder["project"]] += 1
                agents[holder["agent_type"]] += 1
            taken = set(blocked)
            chosen: builtins.list[Job] = []
            cursor = db.execute(_CLAIMABLE)
            try:
                for row in cursor:
                    job = _job(row)
                    spec = job.spec
                    if spec.key in taken or (job.retry_at is not None and job.retry_at > now):
                        continue
                    project_cap = caps.project(spec.project)
                    if project_cap is not None and projects[spec.project] >= project_cap:
                        continue
                    agent_cap = caps.agent_type(spec.agent_type)
                    if agent_cap is not None and agents[spec.agent_type] >= agent_cap:
                        continue
                    taken.add(spec.key)
                    projects[spec.project] += 1
                    agents[spec.agent_type] += 1
                    chosen.append(job)
                    if len(chosen) >= slots:
                        break
            finally:
                cursor.close()
            claimed = []
            for job in chosen:
                db.execute(
                    "UPDATE jobs SET state = 'starting', holds_key = 1, retry_at = NULL "
                    "WHERE id = ? AND state = 'queued'",
                    (job.id,),
                )
                db.execute(
                    "INSERT INTO job_history (job_id, state, at, note) VALUES (?, ?, ?, ?)",
                    (job.id, JobState.STARTING.value, now, note),
                )
                claimed.append(_replace_state(job))
        return claimed

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute(f"{_SELECT} WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def list(
        self, state: JobState | None = None, project: str | None = None, limit: int = 100
    ) -> builtins.list[Job]:
        """Jobs, newest first, optionally filtered by state and project."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        where: builtins.list[str] = []
        params: builtins.list[Any] = []
        if state is not None:
            where.append("state = ?")
            params.append(JobState(state).value)
        if project is not None:
            where.append("project = ?")
            params.append(project)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        sql = f"{_SELECT}{clause} ORDER BY created_at DESC, rowid DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*params, limit)).fetchall()
        return [_job(row) for row in rows]

    def unfinished(self) -> builtins.list[Job]:
        """Queued, starting and running jobs and key holders, oldest first: what to resume.

        A terminal job that still holds its key was cancelled while its
        container ran, and the process died before the container was gone.
        """
        marks = ", ".join("?" for _ in UNFINISHED_STATES)
        sql = (
            f"{_SELECT} WHERE state IN ({marks}) OR holds_key = 1 "
            "ORDER BY created_at ASC, rowid ASC"
        )
        with self._lock:
            rows = self._db.execute(sql, [s.value for s in UNFINISHED_STATES]).fetchall()
        return [_job(row) for row in rows]

    def history(self, job_id: str) -> builtins.list[tuple[JobState, float, str | None]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT state, at, note FROM job_history WHERE job_id = ? ORDER BY seq",
                (job_id,),
            ).fetchall()
        return [(JobState(row["state"]), row["at"], row["note"]) for row in rows]

    def job_ids(self) -> set[str]:
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT id FROM jobs")}

    def count_by_state(self) -> dict[JobState, int]:
        """Every state, zero included, so a gauge can be set from it directly."""
        counts = dict.fromkeys(JobState, 0)
        with self._lock:
            for row in self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
                counts[JobState(row[0])] = int(row[1])
        return counts

    def explain_claim(self) -> builtins.list[str]:
        """SQLite's plan for the claim's queries, for the test that keeps them indexed."""
        with self._lock:
            return [
                str(row["detail"])
                for sql in (_HOLDERS, _CLAIMABLE)
                for row in self._db.execute(f"EXPLAIN QUERY PLAN {sql}")
            ]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# Every job holding a key: as many as the workers, found through jobs_key_holder.
_HOLDERS = "SELECT project, agent_type FROM jobs WHERE holds_key = 1"

# The queue in submission order, keys' oldest jobs only, keys no one holds.
# INDEXED BY: the planner would rather take jobs_state and sort ties on id in
# a temporary B-tree; with it the walk streams and stops at the last slot.
_CLAIMABLE = f"""
    {_SELECT} AS j INDEXED BY jobs_queue
    WHERE j.state = 'queued'
      AND NOT EXISTS (
        SELECT 1 FROM jobs AS h
        WHERE h.holds_key = 1 AND h.project = j.project AND h.work_item = j.work_item
      )
      AND NOT EXISTS (
        SELECT 1 FROM jobs AS e
        WHERE e.state = 'queued' AND e.project = j.project AND e.work_item = j.work_item
          AND (e.created_at, e.id) < (j.created_at, j.id)
      )
    ORDER BY j.created_at, j.id
"""  # noqa: S608 - constant SQL


def _replace_state(job: Job) -> Job:
    return dataclasses.replace(job, state=JobState.STARTING, retry_at=None)
