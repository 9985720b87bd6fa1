"""The cluster's job store: PostgreSQL, shared by every host of the cluster.

It implements ``JobStore`` (the same contract suite as SQLite) and
``ClusterStore`` (hosts, leases, rescue, fencing, the snapshot index). Times
are always the caller's (the Clock), never the database's, so a FakeClock
drives it in tests; the hosts' clocks must agree to well within a lease.

A job's env is secret, as in SQLite: it is blanked when the job ends. Old row
versions stay in the table's pages until autovacuum reclaims them; keep the
database's disk as private as the hosts'. The URL's password is never logged
nor put in an error (``pg_session.describe``).
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import threading
from collections.abc import Collection, Mapping
from types import TracebackType
from typing import Any

import psycopg

from actors.clock import Clock, SystemClock
from actors.model import Job, JobState, SnapshotKey
from actors.store.base import Caps
from actors.store.cluster import Fenced
from actors.store.pg_claim import Claim
from actors.store.pg_cluster import ClusterOps
from actors.store.pg_schema import migrate
from actors.store.pg_session import Conn, PgSession
from actors.store.rows import COLUMNS, job_of, row_of
from actors.usage import UsageKey

__all__ = ["CHANNEL", "PostgresStore"]

# NOTIFY'd when work may have become claimable: a job added or re-queued, a key released.
CHANNEL = "snapyard_jobs"

_HOLDING = (JobState.STARTING.value, JobState.RUNNING.value)
_TERMINAL = [s.value for s in JobState if s.terminal]
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM jobs"  # noqa: S608 - constant column list
_HISTORY = "INSERT INTO job_history (job_id, state, at, note) VALUES (%s, %s, %s, %s)"
_NOTIFY = f"SELECT pg_notify('{CHANNEL}', '')"
# A change is shown once no transaction that could commit a smaller seq is still open.
_SETTLED = "xid < pg_snapshot_xmin(pg_current_snapshot())"
_CHANGES = (
    f"SELECT seq, job_id, state, at FROM job_history WHERE seq > %s AND {_SETTLED} "  # noqa: S608
    "ORDER BY seq LIMIT %s"
)


class PostgresStore(ClusterOps):
    """Jobs, hosts and the snapshot index of a cluster, in one PostgreSQL database."""

    def __init__(
        self,
        database_url: str,
        host_id: str,
        clock: Clock | None = None,
        locality_wait_s: float = 10.0,
    ) -> None:
        self.host_id = host_id
        self._clock = clock or SystemClock()
        self._locality_wait_s = locality_wait_s
        self._session = PgSession(database_url)
        self._draining = False
        self._heartbeats = 0  # the first one of this process sets started_at
        self._listen_lock = threading.Lock()
        self._listener: Conn | None = None
        with self._session.session() as conn:
            migrate(conn, self._session.where)

    @property
    def where(self) -> str:
        """user@host:port/dbname, for messages (never the password)."""
        return self._session.where

    # --- JobStore -------------------------------------------------------------

    def batch(self) -> contextlib.AbstractContextManager[None]:
        return self._session.batch()

    def _history_time(self, job: Job) -> float:
        """The moment of a transition, from the job when it says so (as SQLite does)."""
        if job.state.terminal and job.finished_at is not None:
            return job.finished_at
        if job.state is JobState.RUNNING and job.started_at is not None:
            return job.started_at
        return self._clock.now()

    def add(self, job: Job, note: str | None = None) -> None:
        columns = (*COLUMNS, "holds_key")
        marks = ", ".join("%s" for _ in columns)
        with self._session.transaction() as conn:
            conn.execute(
                f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({marks})",  # noqa: S608
                (*row_of(job), job.state.value in _HOLDING),
            )
            conn.execute(_HISTORY, (job.id, job.state.value, job.created_at, note))
            if job.state is JobState.QUEUED:
                conn.execute(_NOTIFY)

    def update(self, job: Job, note: str | None = None, *, holds_key: bool | None = None) -> None:
        """Write every field of ``job`` while its attempt is current, else ``Fenced``."""
        holds = job.state.value in _HOLDING if holds_key is None else holds_key
        assignments = ", ".join(f"{name} = %s" for name in (*COLUMNS[1:], "holds_key"))
        with self._session.transaction() as conn:
            current = conn.execute(
                "SELECT state, attempt, holds_key FROM jobs WHERE id = %s FOR UPDATE", (job.id,)
            ).fetchone()
            if current is None:
                raise KeyError(job.id)
            if current["attempt"] != job.attempt:
                raise Fenced(job.id, job.attempt)
            conn.execute(
                f"UPDATE jobs SET {assignments} WHERE id = %s AND attempt = %s",  # noqa: S608
                (*row_of(job)[1:], holds, job.id, job.attempt),
            )
            if current["state"] != job.state.value:
                conn.execute(_HISTORY, (job.id, job.state.value, self._history_time(job), note))
            requeued = job.state is JobState.QUEUED and current["state"] != job.state.value
            if requeued or (current["holds_key"] and not holds):
                conn.execute(_NOTIFY)

    def claim(
        self,
        slots: int,
        now: float,
        caps: Caps,
        *,
        blocked: Collection[SnapshotKey] = (),
        note: str | None = None,
    ) -> builtins.list[Job]:
        """Up to ``slots`` queued jobs to STARTING on this host (see ``actors.store.pg_claim``)."""
        if slots <= 0 or self._draining:
            return []
        with self._session.transaction() as conn:
            chosen = Claim(
                conn, self.host_id, slots, now, caps, self._locality_wait_s, blocked
            ).choose()
            if not chosen:
                return []
            ids = [job.id for job in chosen]
            conn.execute(
                "UPDATE jobs SET state = 'starting', holds_key = true, retry_at = NULL, "
                "host = %s WHERE id = ANY(%s)",
                (self.host_id, ids),
            )
            conn.execute(
                "INSERT INTO job_history (job_id, state, at, note) "
                "SELECT id, 'starting', %s, %s FROM unnest(%s::text[]) WITH ORDINALITY AS c(id, n) "
                "ORDER BY n",
                (now, note, ids),
            )
        return [
            dataclasses.replace(job, state=JobState.STARTING, retry_at=None, host=self.host_id)
            for job in chosen
        ]

    def get(self, job_id: str) -> Job | None:
        with self._session.session() as conn:
            row = conn.execute(f"{_SELECT} WHERE id = %s", (job_id,)).fetchone()
        return None if row is None else job_of(row)

    def list(
        self, state: JobState | None = None, project: str | None = None, limit: int = 100
    ) -> builtins.list[Job]:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        where: builtins.list[str] = []
        params: builtins.list[Any] = []
        if state is not None:
            where.append("state = %s")
            params.append(JobState(state).value)
        if project is not None:
            where.append("project = %s")
            params.append(project)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        sql = f"{_SELECT}{clause} ORDER BY created_at DESC, added DESC LIMIT %s"
        with self._session.session() as conn:
            rows = conn.execute(sql, (*params, limit)).fetchall()
        return [job_of(row) for row in rows]

    def unfinished(self) -> builtins.list[Job]:
        """Every queued job, and this host's starting, running and key-holding ones:
        recovery adopts only its own (a job added running on no host counts as ours)."""
        sql = (
            f"{_SELECT} WHERE state = 'queued' OR ((state = ANY(%s) OR holds_key) "
            "AND (host = %s OR host IS NULL)) ORDER BY created_at, added"
        )
        with self._session.session() as conn:
            rows = conn.execute(sql, (list(_HOLDING), self.host_id)).fetchall()
        return [job_of(row) for row in rows]

    def history(self, job_id: str) -> builtins.list[tuple[JobState, float, str | None]]:
        with self._session.session() as conn:
            rows = conn.execute(
                "SELECT state, at, note FROM job_history WHERE job_id = %s ORDER BY seq",
                (job_id,),
            ).fetchall()
        return [(JobState(row["state"]), row["at"], row["note"]) for row in rows]

    def changes(
        self, after: int, limit: int = 500
    ) -> builtins.list[tuple[int, str, JobState, float]]:
        with self._session.session() as conn:
            rows = conn.execute(
                _CHANGES,
                (after, limit),
            ).fetchall()
        return [(row["seq"], row["job_id"], JobState(row["state"]), row["at"]) for row in rows]

    def last_change(self) -> int:
        with self._session.session() as conn:
            row = conn.execute(
                f"SELECT COALESCE(max(seq), 0) AS seq FROM job_history WHERE {_SETTLED}"  # noqa: S608
            ).fetchone()
        return 0 if row is None else int(row["seq"])

    def job_ids(self) -> set[str]:
        with self._session.session() as conn:
            return {row["id"] for row in conn.execute("SELECT id FROM jobs")}

    def count_by_state(self) -> dict[JobState, int]:
        counts = dict.fromkeys(JobState, 0)
        with self._session.session() as conn:
            for row in conn.execute("SELECT state, count(*) AS n FROM jobs GROUP BY state"):
                counts[JobState(row["state"])] = int(row["n"])
        return counts

    def prune_finished(self, before: float) -> int:
        with self._session.transaction() as conn:
            cursor = conn.execute(
                "DELETE FROM jobs WHERE state = ANY(%s) AND NOT holds_key "
                "AND COALESCE(finished_at, created_at) < %s",
                (_TERMINAL, before),
            )
            return int(cursor.rowcount)

    def record_usage(
        self, uses: Mapping[UsageKey, float], keep: Collection[UsageKey] | None
    ) -> None:
        """This host's snapshot use times (each host orders its own copies)."""
        with self._session.transaction() as conn:
            if uses:
                with conn.cursor() as cursor:
                    cursor.executemany(
                        "INSERT INTO snapshot_usage "
                        "(host_id, project, work_item, image_id, last_used_at) "
                        "VALUES (%s, %s, %s, %s, %s) "
                        "ON CONFLICT (host_id, project, work_item, image_id) DO UPDATE SET "
                        "last_used_at = GREATEST(snapshot_usage.last_used_at, "
                        "excluded.last_used_at)",
                        [(self.host_id, *key, at) for key, at in uses.items()],
                    )
            if keep is not None:
                kept = builtins.list(keep)
                conn.execute(
                    "DELETE FROM snapshot_usage WHERE host_id = %s AND "
                    "(project, work_item, image_id) NOT IN "
                    "(SELECT * FROM unnest(%s::text[], %s::text[], %s::text[]))",
                    (
                        self.host_id,
                        [k[0] for k in kept],
                        [k[1] for k in kept],
                        [k[2] for k in kept],
                    ),
                )

    def load_usage(self) -> dict[UsageKey, float]:
        with self._session.session() as conn:
            rows = conn.execute(
                "SELECT project, work_item, image_id, last_used_at FROM snapshot_usage "
                "WHERE host_id = %s",
                (self.host_id,),
            )
            return {(r["project"], r["work_item"], r["image_id"]): r["last_used_at"] for r in rows}

    # --- waking claimers ----------------------------------------------------------

    def wait_for_work(self, timeout_s: float) -> bool:
        """Block until work may be claimable (a NOTIFY) or ``timeout_s``; True if woken.

        LISTENs on a connection of its own, made on the first call: a wake-up
        sent before then is missed, so callers also poll (a short timeout).
        """
        with self._listen_lock:
            try:
                if self._listener is None or self._listener.closed:
                    self._listener = self._session.connect()
                    self._listener.execute(f"LISTEN {CHANNEL}")
                woken = any(True for _ in self._listener.notifies(timeout=timeout_s, stop_after=1))
                if woken:  # one wake-up for everything that arrived meanwhile
                    for _ in self._listener.notifies(timeout=0):
                        pass
                return woken
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                listener, self._listener = self._listener, None
                if listener is not None:
                    with contextlib.suppress(psycopg.Error):
                        listener.close()
                raise self._session.unavailable(exc) from None

    def close(self) -> None:
        with self._listen_lock:
            if self._listener is not None:
                with contextlib.suppress(Exception):
                    self._listener.close()
                self._listener = None
        self._session.close()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
