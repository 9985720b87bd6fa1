"""The durable job store: SQLite in WAL mode, so nothing is lost on restart.

Only the Supervisor actor writes; the API may read from other threads. One
connection guarded by a lock keeps that simple and correct: the store is
never the bottleneck next to starting a container.

A job's ``env`` is stored (a queued job must be runnable after a restart)
but it is secret: this module never logs it, and ``Job``/``JobSpec`` reprs
hide it.
"""

from __future__ import annotations

import builtins
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from actors.clock import Clock, SystemClock
from actors.model import Job, JobSpec, JobState

__all__ = ["LOGS_TAIL_LINES", "SCHEMA_VERSION", "JobStore", "StoreError", "new_job_id"]

LOGS_TAIL_LINES = 200
UNFINISHED_STATES = (JobState.QUEUED, JobState.STARTING, JobState.RUNNING)


class StoreError(RuntimeError):
    """The database cannot be used: newer schema, or not a Snapyard store."""


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


# MIGRATIONS[n] takes a database at user_version n to n + 1. To change the
# schema, append a function; never edit one that has shipped.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_schema_v1,)
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
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM jobs"  # noqa: S608 - constant column list


def _tail(text: str, lines: int = LOGS_TAIL_LINES) -> str:
    parts = text.splitlines(keepends=True)
    return "".join(parts[-lines:]) if len(parts) > lines else text


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
        _tail(job.logs_tail),
        job.started_at,
        job.finished_at,
        job.deadline,
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
    )


class JobStore:
    """Jobs and their state history, durable across restarts."""

    def __init__(self, path: str | os.PathLike[str], clock: Clock | None = None) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock or SystemClock()
        self._lock = threading.RLock()
        # isolation_level=None: we open transactions ourselves, so a commit
        # happens exactly where the code says it does.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL, not NORMAL: in WAL mode NORMAL may lose the last commits on
            # power loss, and a submitted job must be on disk before submit
            # returns. One fsync per job change is nothing next to a container.
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

    def _write(self, statements: Iterable[tuple[str, tuple[Any, ...]]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    self._db.execute(sql, params)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

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
        placeholders = ", ".join("?" for _ in _COLUMNS)
        self._write(
            [
                (f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({placeholders})", _row(job)),  # noqa: S608
                (
                    "INSERT INTO job_history (job_id, state, at, note) VALUES (?, ?, ?, ?)",
                    (job.id, job.state.value, job.created_at, note),
                ),
            ]
        )

    def update(self, job: Job, note: str | None = None) -> None:
        """Write every field of ``job``; a state change also appends a history row."""
        assignments = ", ".join(f"{name} = ?" for name in _COLUMNS[1:])
        row = _row(job)
        with self._lock:
            current = self._db.execute("SELECT state FROM jobs WHERE id = ?", (job.id,)).fetchone()
            if current is None:
                raise KeyError(job.id)
            statements: list[tuple[str, tuple[Any, ...]]] = [
                (f"UPDATE jobs SET {assignments} WHERE id = ?", (*row[1:], job.id)),  # noqa: S608
            ]
            if current["state"] != job.state.value:
                statements.append(
                    (
                        "INSERT INTO job_history (job_id, state, at, note) VALUES (?, ?, ?, ?)",
                        (job.id, job.state.value, self._history_time(job), note),
                    )
                )
            self._write(statements)

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
        """Queued, starting and running jobs, oldest first: the FIFO to resume."""
        marks = ", ".join("?" for _ in UNFINISHED_STATES)
        sql = f"{_SELECT} WHERE state IN ({marks}) ORDER BY created_at ASC, rowid ASC"
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

    def changes(
        self, after: int, limit: int = 500
    ) -> builtins.list[tuple[int, str, JobState, float]]:
        """Every job's state changes as ``(seq, job_id, state, at)`` with ``seq > after``,
        oldest first: ``seq`` only grows, so a follower (``GET /events``) resumes from it."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, job_id, state, at FROM job_history WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit),
            ).fetchall()
        return [(row[0], row[1], JobState(row[2]), row[3]) for row in rows]

    def last_change(self) -> int:
        """The ``seq`` of the newest state change (0 for none): "from now on" for ``changes``."""
        with self._lock:
            return int(
                self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM job_history").fetchone()[0]
            )

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

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
