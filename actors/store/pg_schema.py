"""The PostgreSQL store's schema and its migrations, versioned in ``schema_version``.

``MIGRATIONS[n]`` takes a database at version n to n + 1; each runs in one
transaction under an advisory lock, so hosts starting together migrate once.
Job rows are ``actors.store.rows``'s columns, the same as SQLite's, plus
``holds_key`` and ``added`` (insertion order, SQLite's rowid). The partial
indexes are what keep a claim's cost flat with the queue's length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from actors.store.base import StoreError

__all__ = [
    "CHANNEL",
    "CLAIM_LOCK",
    "HISTORY_ROWS",
    "HOME",
    "MIGRATIONS",
    "NOTIFY",
    "RESCUE_LOCK",
    "SCHEMA_VERSION",
    "migrate",
]

# Advisory lock keys ("snap" + a number): one namespace for the whole database.
CLAIM_LOCK = 0x736E_6170_0001  # cluster-wide caps: one capped claim at a time
RESCUE_LOCK = 0x736E_6170_0002  # the rescue election
_MIGRATE_LOCK = 0x736E_6170_0003
_HISTORY_LOCK = 0x736E_6170_0004

# History rows, one per (job ID, state, at, note) of the arrays given, in order.
# ``changes`` promises that seq only grows for a follower: but a seq is taken at
# insert, not at commit, so a later seq could commit first and a follower skip
# the earlier one for good. Writers of history therefore take a lock first and
# hold it to their commit: seqs commit in order. (A write costs this wait only
# while another transaction that wrote history is still open: milliseconds.)
HISTORY_ROWS = f"""
INSERT INTO job_history (job_id, state, at, note)
SELECT h.job_id, h.state, h.at, h.note
FROM (SELECT pg_advisory_xact_lock({_HISTORY_LOCK})) AS serialised,
     unnest(%s::text[], %s::text[], %s::float8[], %s::text[])
         WITH ORDINALITY AS h(job_id, state, at, note, n)
ORDER BY h.n
"""  # noqa: S608 - constant SQL

_SCHEMA_V1 = (
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        added BIGINT GENERATED ALWAYS AS IDENTITY,
        project TEXT NOT NULL,
        work_item TEXT NOT NULL,
        agent_type TEXT NOT NULL,
        command TEXT,            -- JSON list, or NULL for the worker's default
        env TEXT NOT NULL,       -- JSON object, secret
        timeout_s DOUBLE PRECISION,
        state TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        attempts INTEGER NOT NULL,
        container_id TEXT,
        image_id TEXT,
        from_snapshot BOOLEAN NOT NULL,
        snapshot_committed BOOLEAN NOT NULL,
        exit_code INTEGER,
        error TEXT,
        logs_tail TEXT NOT NULL,
        started_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        deadline DOUBLE PRECISION,
        retry_at DOUBLE PRECISION,
        attempt INTEGER NOT NULL DEFAULT 0,
        host TEXT,
        queued_at DOUBLE PRECISION,
        holds_key BOOLEAN NOT NULL DEFAULT false,
        -- Not a Job field: the host of the key's newest snapshot, kept on queued
        -- jobs so a host finds its local work through jobs_home, in queue order.
        -- A hint (the snapshot index is the truth): stale only costs locality.
        home TEXT
    )
    """,
    "CREATE INDEX jobs_state ON jobs (state, created_at)",
    "CREATE INDEX jobs_project ON jobs (project, created_at)",
    "CREATE INDEX jobs_created ON jobs (created_at, added)",
    "CREATE INDEX jobs_host ON jobs (host, state)",
    # One active job per (project, work item), cluster-wide: the schema refuses a second.
    "CREATE UNIQUE INDEX jobs_key_holder ON jobs (project, work_item) WHERE holds_key",
    "CREATE INDEX jobs_queue ON jobs (created_at, id) WHERE state = 'queued'",
    "CREATE INDEX jobs_queue_by_key ON jobs (project, work_item, created_at, id) "
    "WHERE state = 'queued'",
    "CREATE INDEX jobs_home ON jobs (home, created_at, id) WHERE state = 'queued'",
    """
    CREATE TABLE job_history (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        state TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        note TEXT
    )
    """,
    "CREATE INDEX job_history_job ON job_history (job_id, seq)",
    # Last-use times are each host's own: its LRU order over its own copies.
    """
    CREATE TABLE snapshot_usage (
        host_id TEXT NOT NULL,
        project TEXT NOT NULL,
        work_item TEXT NOT NULL,
        image_id TEXT NOT NULL,
        last_used_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (host_id, project, work_item, image_id)
    )
    """,
    """
    CREATE TABLE hosts (
        host_id TEXT PRIMARY KEY,
        started_at DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL,
        lease_until DOUBLE PRECISION NOT NULL,
        api TEXT NOT NULL,
        max_workers INTEGER NOT NULL,
        running INTEGER NOT NULL,
        draining BOOLEAN NOT NULL DEFAULT false
    )
    """,
    # The snapshot index: each key's newest snapshot, and the host that holds it.
    """
    CREATE TABLE snapshots (
        project TEXT NOT NULL,
        work_item TEXT NOT NULL,
        agent_type TEXT NOT NULL,
        host_id TEXT NOT NULL,
        image_id TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        digest TEXT,
        PRIMARY KEY (project, work_item)
    )
    """,
)

# NOTIFY'd when work may have become claimable: a job added or re-queued, a key released.
CHANNEL = "snapyard_jobs"
NOTIFY = f"SELECT pg_notify('{CHANNEL}', '')"

# The ``home`` of a job of a key: set from the snapshot index whenever the job
# is written, and on every queued job of the key when its newest snapshot moves.
HOME = "(SELECT s.host_id FROM snapshots s WHERE s.project = %s AND s.work_item = %s)"

# v2: a cancel asked of a host that does not run the job: the database is the
# only channel between hosts, so it is recorded on the job's row (and NOTIFY'd)
# and the owning host acts on it. Indexed for the owner's poll at each Tick.
_SCHEMA_V2 = (
    "ALTER TABLE jobs ADD COLUMN cancel_requested BOOLEAN NOT NULL DEFAULT false",
    "CREATE INDEX jobs_cancel_requested ON jobs (host) WHERE cancel_requested",
)

# To change the schema, append a tuple of statements; never edit one that has shipped.
MIGRATIONS: tuple[Sequence[str], ...] = (_SCHEMA_V1, _SCHEMA_V2)
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: psycopg.Connection[dict[str, Any]], where: str) -> None:
    """Bring the database to ``SCHEMA_VERSION``; ``where`` names it in errors (no password)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT max(version) AS version FROM schema_version").fetchone()
        version = 0 if row is None or row["version"] is None else int(row["version"])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the database {where} has Snapyard schema version {version}; this Snapyard "
                f"knows up to {SCHEMA_VERSION}. Upgrade Snapyard on this host."
            )
        for target in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[target]:
                conn.execute(statement)  # constant SQL
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (target + 1,))
