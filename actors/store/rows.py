"""Jobs as rows and back: one mapping for every store, so they agree field by field.

Flags are Python bools (SQLite stores them as 0/1, PostgreSQL as booleans);
``command`` and ``env`` are JSON text in both.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Protocol

from actors.clock import Clock
from actors.model import Job, JobSpec, JobState
from actors.store.base import tail

__all__ = ["COLUMNS", "Row", "history_time", "job_of", "list_filter", "row_of"]


class Row(Protocol):
    """A row read by column name: ``sqlite3.Row`` or a psycopg ``dict_row``."""

    def __getitem__(self, key: str, /) -> Any: ...


COLUMNS = (
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
    "attempt",
    "host",
    "queued_at",
)


def row_of(job: Job) -> tuple[Any, ...]:
    """The values of ``COLUMNS``, in order."""
    spec = job.spec
    return (
        job.id,
        spec.project,
        spec.work_item,
        spec.agent_type,
        None if spec.command is None else json.dumps(list(spec.command)),
        # A finished job never runs again: its secrets leave the store with it.
        "{}" if job.state.terminal else json.dumps(dict(spec.env), sort_keys=True),
        spec.timeout_s,
        job.state.value,
        job.created_at,
        job.attempts,
        job.container_id,
        job.image_id,
        bool(job.from_snapshot),
        bool(job.snapshot_committed),
        job.exit_code,
        job.error,
        tail(job.logs_tail),
        job.started_at,
        job.finished_at,
        job.deadline,
        job.retry_at,
        job.attempt,
        job.host,
        job.queued_at,
    )


def job_of(row: Row) -> Job:
    command = row["command"]
    # A few projects and agent types repeat over every row: one string each,
    # not one per job read (a claimed job's spec lives as long as its run).
    spec = JobSpec(
        project=sys.intern(row["project"]),
        work_item=row["work_item"],
        agent_type=sys.intern(row["agent_type"]),
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
        attempt=row["attempt"],
        host=row["host"],
        queued_at=row["queued_at"],
    )


def history_time(job: Job, clock: Clock) -> float:
    """The moment of a transition, taken from the job when it says so.

    The Supervisor stamps started_at/finished_at with its own (injected)
    clock; reusing them keeps history consistent with the job itself.
    """
    if job.state.terminal and job.finished_at is not None:
        return job.finished_at
    if job.state is JobState.RUNNING and job.started_at is not None:
        return job.started_at
    return clock.now()


def list_filter(
    state: JobState | None, project: str | None, limit: int, mark: str
) -> tuple[str, list[Any]]:
    """``list()``'s WHERE clause and parameters, ``mark`` being the driver's
    placeholder (``?`` for sqlite3, ``%s`` for psycopg); the LIMIT is last."""
    if limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit}")
    where: list[str] = []
    params: list[Any] = []
    if state is not None:
        where.append(f"state = {mark}")
        params.append(JobState(state).value)
    if project is not None:
        where.append(f"project = {mark}")
        params.append(project)
    return (f" WHERE {' AND '.join(where)}" if where else ""), [*params, limit]
