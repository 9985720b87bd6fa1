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
from actors.store.pg_schema import CHANNEL, HISTORY_ROWS, HOME, NOTIFY, migrate
from actors.store.pg_session import IDLE_IN_TRANSACTION_S, Conn, PgSession
from actors.store.rows import COLUMNS, history_time, job_of, list_filter, row_of
from actors.usage import UsageKey

__all__ = ["CHANNEL", "HeldElsewhere", "PostgresStore"]

_HOLDING = (JobState.STARTING.value, JobState.RUNNING.value)
_TERMINAL = [s.value for s in JobState if s.terminal]
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM jobs"  # noqa: S608 - constant column list
_CHANGES = "SELECT seq, job_id, state, at FROM job_history WHERE seq > %s ORDER BY seq LIMIT %s"


class HeldElsewhere(Fenced):
    """A write to a job that another host of the cluster has claimed."""

    def __init__(self, job_id: str, attempt: int, holder: str) -> None:
        super().__init__(job_id, attempt)
        self.holder = holder
        self.args = (
            f"job {job_id} is claimed by host {holder}; only that host writes it now "
            "(this write is dropped)",
        )


def _row(job: Job) -> tuple[Any, ...]:
    """``row_of``, with NUL characters replaced: PostgreSQL text cannot hold them,
    and a worker's log may print one (SQLite keeps them; IDs and env never have any)."""
    return tuple(
        value.replace("\x00", "\ufffd") if isinstance(value, str) else value
        for value in row_of(job)
    )


class PostgresStore(ClusterOps):
    """Jobs, hosts and the snapshot index of a cluster, in one PostgreSQL database."""

    def __init__(
        self,
        database_url: str,
        host_id: str,
        clock: Clock | None = None,
        locality_wait_s: float = 10.0,
        *,
        idle_in_transaction_s: float = IDLE_IN_TRANSACTION_S,
    ) -> None:
        """``idle_in_transaction_s``: how long the server lets this host's session
        sit in an open transaction (a frozen host) before it ends it."""
        self.host_id = host_id
        self._clock = clock or SystemClock()
        self._locality_wait_s = locality_wait_s
        self._session = PgSession(database_url, idle_in_transaction_s)
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

    def add(self, job: Job, note: str | None = None) -> None:
        columns = (*COLUMNS, "holds_key", "home")
        marks = ", ".join("%s" for _ in columns[:-1])
        key = job.key
        with self._session.transaction() as conn:
            conn.execute(
                f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({marks}, {HOME})",  # noqa: S608
                (*_row(job), job.state.value in _HOLDING, key.project, key.work_item),
            )
            conn.execute(HISTORY_ROWS, ([job.id], [job.state.value], [job.created_at], [note]))
            if job.state is JobState.QUEUED:
                conn.execute(NOTIFY)

    def update(
        self,
        job: Job,
        note: str | None = None,
        *,
        holds_key: bool | None = None,
        was_attempt: int | None = None,
    ) -> None:
        """Write every field of ``job`` while its attempt is current, else ``Fenced``.

        Also ``Fenced`` (``HeldElsewhere``): a job another host has claimed is
        that host's to write. A write from a copy read while it was queued (a
        cancel racing a claim elsewhere) would release its key under a running
        container, or put it back in the queue to run twice.
        """
        holds = job.state.value in _HOLDING if holds_key is None else holds_key
        assignments = ", ".join(f"{name} = %s" for name in (*COLUMNS[1:], "holds_key"))
        with self._session.transaction() as conn:
            current = conn.execute(
                "SELECT state, attempt, holds_key, host FROM jobs WHERE id = %s FOR UPDATE",
                (job.id,),
            ).fetchone()
            if current is None:
                raise KeyError(job.id)
            guard = job.attempt if was_attempt is None else was_attempt
            if current["attempt"] != guard:
                raise Fenced(job.id, guard)
            if current["host"] not in (None, self.host_id):
                raise HeldElsewhere(job.id, guard, current["host"])
            conn.execute(
                f"UPDATE jobs SET {assignments}, home = {HOME} "  # noqa: S608
                "WHERE id = %s AND attempt = %s",
                (*_row(job)[1:], holds, job.key.project, job.key.work_item, job.id, guard),
            )
            if current["state"] != job.state.value:
                at = history_time(job, self._clock)
                conn.execute(HISTORY_ROWS, ([job.id], [job.state.value], [at], [note]))
            requeued = job.state is JobState.QUEUED and current["state"] != job.state.value
            if requeued or (current["holds_key"] and not holds):
                conn.execute(NOTIFY)

    def claim(
        self,
        slots: int,
        now: float,
        caps: Caps,
        *,
        blocked: Collection[SnapshotKey] = (),
        note: str | None = None,
    ) -> builtins.list[Job]:
        """Up to ``slots`` queued jobs to STARTING on this host (see ``actors.store.pg_claim``).

        Nothing while this host's lease has ended: another host may be rescuing
        its jobs right now, and would rescue a job claimed now as well, so it
        would run twice. (A host that never heartbeated has no lease to check:
        the cluster's hosts beat before they claim.)
        """
        if slots <= 0 or self._draining:
            return []
        with self._session.transaction() as conn:
            lease = conn.execute(
                "SELECT lease_until FROM hosts WHERE host_id = %s", (self.host_id,)
            ).fetchone()
            if lease is not None and lease["lease_until"] <= now:
                return []
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
            starting = JobState.STARTING.value
            conn.execute(
                HISTORY_ROWS, (ids, [starting] * len(ids), [now] * len(ids), [note] * len(ids))
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
        clause, params = list_filter(state, project, limit, "%s")
        sql = f"{_SELECT}{clause} ORDER BY created_at DESC, added DESC LIMIT %s"
        with self._session.session() as conn:
            rows = conn.execute(sql, params).fetchall()
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
            row = conn.execute("SELECT COALESCE(max(seq), 0) AS seq FROM job_history").fetchone()
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

        LISTENs on a connection of its own, made on the first call (and again
        after a lost connection): what was notified before that LISTEN is
        missed, so that call answers True at once, and the caller claims.
        """
        with self._listen_lock:
            try:
                if self._listener is None or self._listener.closed:
                    self._listener = self._session.connect()
                    self._listener.execute(f"LISTEN {CHANNEL}")
                    return True
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
