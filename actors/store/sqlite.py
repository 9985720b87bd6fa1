"""The single-host job store: SQLite in WAL mode, so nothing is lost on restart.

It implements ``actors.store.base.JobStore``; the contract suite pins what
that means. Only the Supervisor actor writes; the API may read from other
threads. One connection guarded by a lock keeps that simple and correct: the
store is never the bottleneck next to starting a container.

A job's ``env`` is stored (a queued job must be runnable after a restart,
a running one re-adoptable) but it is secret: it is blanked when the job ends
(with ``secure_delete``, so the old bytes are zeroed, not left in free space),
this module never logs it, and ``Job``/``JobSpec`` reprs hide it.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import dataclasses
import os
import sqlite3
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from actors.clock import Clock, SystemClock
from actors.model import Job, JobState, SnapshotKey
from actors.private_files import ensure_private_dir, ensure_private_file
from actors.store.base import Caps, KeyHeld, StoreError
from actors.store.cluster import Fenced
from actors.store.rows import COLUMNS, history_time, job_of, list_filter, row_of
from actors.store.schema import MIGRATIONS, SCHEMA_VERSION, SELECT
from actors.usage import UsageKey

__all__ = ["SqliteStore"]

UNFINISHED_STATES = (JobState.QUEUED, JobState.STARTING, JobState.RUNNING)
_HOLDING_STATES = (JobState.STARTING, JobState.RUNNING)
_TERMINAL_SQL = ", ".join(f"'{s.value}'" for s in JobState if s.terminal)


class SqliteStore:
    """Jobs, their state history and the queue, in one SQLite file."""

    def __init__(self, path: str | os.PathLike[str], clock: Clock | None = None) -> None:
        self.path = Path(path).expanduser()
        # Queued jobs' env is in here: private (0600), and SQLite's journals follow.
        ensure_private_dir(self.path.parent)
        ensure_private_file(self.path)
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
            # A finished job's env is overwritten: zero the old bytes on disk too.
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            # 32 MB of page cache (allocated as used): a claim touches the same
            # few index pages, and with the default 2 MB a 100k-job queue made
            # each claim read them back, 2.6 times slower than with 1k jobs.
            self._db.execute("PRAGMA cache_size=-32000")
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

    def add(self, job: Job, note: str | None = None) -> None:
        """Insert a new job and its first history row; raises if the ID exists."""
        columns = (*COLUMNS, "holds_key")
        placeholders = ", ".join("?" for _ in columns)
        self._write(
            [
                (
                    f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({placeholders})",  # noqa: S608
                    (*row_of(job), int(job.state in _HOLDING_STATES)),
                ),
                (
                    "INSERT INTO job_history (job_id, state, at, note) VALUES (?, ?, ?, ?)",
                    (job.id, job.state.value, job.created_at, note),
                ),
            ]
        )

    def update(
        self,
        job: Job,
        note: str | None = None,
        *,
        holds_key: bool | None = None,
        was_attempt: int | None = None,
    ) -> None:
        """Write every field of ``job``; a state change also appends a history row.

        Only while the row's ``attempt`` is still the job's, else ``Fenced``: the
        same contract as the cluster's store, trivially kept on one host.
        """
        holds = job.state in _HOLDING_STATES if holds_key is None else holds_key
        assignments = ", ".join(f"{name} = ?" for name in (*COLUMNS[1:], "holds_key"))
        row = row_of(job)
        with self._transaction() as db:
            current = db.execute(
                "SELECT state, attempt FROM jobs WHERE id = ?", (job.id,)
            ).fetchone()
            if current is None:
                raise KeyError(job.id)
            guard = job.attempt if was_attempt is None else was_attempt
            if current["attempt"] != guard:
                raise Fenced(job.id, guard)
            db.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ? AND attempt = ?",  # noqa: S608
                (*row[1:], int(holds), job.id, guard),
            )
            if current["state"] != job.state.value:
                db.execute(
                    "INSERT INTO job_history (job_id, state, at, note) VALUES (?, ?, ?, ?)",
                    (job.id, job.state.value, history_time(job, self._clock), note),
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
                    job = job_of(row)
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
            row = self._db.execute(f"{SELECT} WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else job_of(row)

    def list(
        self, state: JobState | None = None, project: str | None = None, limit: int = 100
    ) -> builtins.list[Job]:
        """Jobs, newest first, optionally filtered by state and project."""
        clause, params = list_filter(state, project, limit, "?")
        sql = f"{SELECT}{clause} ORDER BY created_at DESC, rowid DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        return [job_of(row) for row in rows]

    def unfinished(self) -> builtins.list[Job]:
        """Queued, starting and running jobs and key holders, oldest first: what to resume.

        A terminal job that still holds its key was cancelled while its
        container ran, and the process died before the container was gone.
        """
        marks = ", ".join("?" for _ in UNFINISHED_STATES)
        sql = (
            f"{SELECT} WHERE state IN ({marks}) OR holds_key = 1 ORDER BY created_at ASC, rowid ASC"
        )
        with self._lock:
            rows = self._db.execute(sql, [s.value for s in UNFINISHED_STATES]).fetchall()
        return [job_of(row) for row in rows]

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
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, job_id, state, at FROM job_history WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit),
            ).fetchall()
        return [(row[0], row[1], JobState(row[2]), row[3]) for row in rows]

    def last_change(self) -> int:
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

    def prune_finished(self, before: float) -> int:
        with self._transaction() as db:
            cursor = db.execute(
                f"DELETE FROM jobs WHERE state IN ({_TERMINAL_SQL}) AND holds_key = 0 "  # noqa: S608
                "AND COALESCE(finished_at, created_at) < ?",
                (before,),
            )
            return int(cursor.rowcount)

    # --- snapshot use times (actors.usage.UsageStore) ---------------------------

    def record_usage(
        self, uses: Mapping[UsageKey, float], keep: Collection[UsageKey] | None
    ) -> None:
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO snapshot_usage (project, work_item, image_id, last_used_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (project, work_item, image_id) "
                "DO UPDATE SET last_used_at = MAX(last_used_at, excluded.last_used_at)",
                [(*key, at) for key, at in uses.items()],
            )
            if keep is not None:
                stale = set(self.load_usage()) - set(keep)
                db.executemany(
                    "DELETE FROM snapshot_usage WHERE project = ? AND work_item = ? "
                    "AND image_id = ?",
                    list(stale),
                )

    def load_usage(self) -> dict[UsageKey, float]:
        with self._lock:
            rows = self._db.execute(
                "SELECT project, work_item, image_id, last_used_at FROM snapshot_usage"
            )
            return {(r[0], r[1], r[2]): float(r[3]) for r in rows}

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
    {SELECT} AS j INDEXED BY jobs_queue
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
