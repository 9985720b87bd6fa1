"""The SQLite store's schema and its migrations (rows and Jobs: ``actors.store.rows``).

The schema is the contract: every transition is a short SQL statement on one
row. It is versioned with ``PRAGMA user_version``; ``MIGRATIONS[n]`` takes a
database at version n to n + 1.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from actors.model import JobState
from actors.store.rows import COLUMNS

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SELECT"]


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


def _schema_v3(db: sqlite3.Connection) -> None:
    """A job's env is kept only while it may still run: scrub the finished ones.

    Before this, ``snapyard.db`` kept every job's secrets forever (issue 11, 4).
    """
    terminal = ", ".join(f"'{state.value}'" for state in JobState if state.terminal)
    db.execute(f"UPDATE jobs SET env = '{{}}' WHERE state IN ({terminal})")  # noqa: S608


def _schema_v4(db: sqlite3.Connection) -> None:
    """When each snapshot was last used: image labels hold only the commit
    time, so LRU order was lost on every restart (issue 11, item 8)."""
    db.execute(
        """
        CREATE TABLE snapshot_usage (
            project TEXT NOT NULL,
            work_item TEXT NOT NULL,
            image_id TEXT NOT NULL,
            last_used_at REAL NOT NULL,
            PRIMARY KEY (project, work_item, image_id)
        )
        """
    )


def _schema_v5(db: sqlite3.Connection) -> None:
    """The cluster's job fields, kept by the single-host store too (one contract):
    the claim generation that fences outcome writes, the claiming host, and
    when the job last became queued (issue 14)."""
    db.execute("ALTER TABLE jobs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE jobs ADD COLUMN host TEXT")
    db.execute("ALTER TABLE jobs ADD COLUMN queued_at REAL")


# MIGRATIONS[n] takes a database at user_version n to n + 1. To change the
# schema, append a function; never edit one that has shipped.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _schema_v1,
    _schema_v2,
    _schema_v3,
    _schema_v4,
    _schema_v5,
)
SCHEMA_VERSION = len(MIGRATIONS)

SELECT = f"SELECT {', '.join(COLUMNS)} FROM jobs"  # noqa: S608 - constant column list
