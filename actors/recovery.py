"""Recovery and reconciliation as decisions: jobs + a container listing in, verdicts out.

Pure functions, no actors and no engine: the Supervisor feeds them what its
store and the Reaper's listing say and carries out what they return, so every
case is a row in a table test (tests/unit/test_recovery.py), not a thread race.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from actors.engine.base import ContainerState
from actors.labels import (
    LABEL_ATTEMPT,
    LABEL_JOB_ID,
    LABEL_MANAGED,
    LABEL_PROJECT,
    LABEL_WORK_ITEM,
)
from actors.messages import ContainerExited
from actors.model import Job, JobState, Snapshot, SnapshotKey

__all__ = [
    "Adopt",
    "AwaitListing",
    "Decision",
    "Ended",
    "Requeue",
    "Vanished",
    "committed_before_restart",
    "exit_of",
    "has_exited",
    "job_label",
    "orphans",
    "plan",
    "unowned_running",
]

NOT_STARTED_NOTE = "recovered: it had not started"


@dataclass(frozen=True)
class Adopt:
    """Its container exists: take it back (and judge its exit if it already exited)."""

    job: Job
    container: ContainerState


@dataclass(frozen=True)
class Requeue:
    """It never ran: queue it again, removing a container created but never started."""

    job: Job
    note: str
    remove: str | None = None


@dataclass(frozen=True)
class Vanished:
    """It ran, and its container is gone: the snapshot registry tells how it ended."""

    job: Job


@dataclass(frozen=True)
class Ended:
    """Already terminal (cancelled meanwhile): its state stands; stop what it left."""

    job: Job
    leftover: str | None


@dataclass(frozen=True)
class AwaitListing:
    """The engine did not answer: hold its place until a listing does."""

    job: Job


Decision = Adopt | Requeue | Vanished | Ended | AwaitListing


def plan(
    jobs: Iterable[Job],
    containers: Collection[ContainerState] | None,
    notes: Mapping[str, str] | None = None,
) -> list[Decision]:
    """What to do with each unfinished job of a previous run (or of a crashed Spawner).

    ``containers`` None means the engine did not answer: starting and running
    jobs keep their places until a listing does, so nothing starts twice and
    no limit is overshot meanwhile. Queued jobs need nothing: the store
    hands them out. ``notes`` says why a job is being recovered, for its history.
    """
    notes = notes or {}
    by_id = {c.id: c for c in containers or ()}
    by_job: dict[str, ContainerState] = {}
    for c in containers or ():
        job_id = job_label(c)
        if job_id is not None and (
            job_id not in by_job or c.created_at > by_job[job_id].created_at
        ):
            by_job[job_id] = c
    decisions: list[Decision] = []
    for job in jobs:
        if job.state is JobState.QUEUED:
            continue
        if containers is None:
            # A finished job here still holds its key (cancelled while running):
            # its container may run on, so it too waits for a listing to say.
            decisions.append(AwaitListing(job))
        elif job.state.terminal:
            leftover = by_job.get(job.id)
            decisions.append(Ended(job, None if leftover is None else leftover.id))
        elif job.state is JobState.STARTING:
            container = by_job.get(job.id)
            if container is None or container.status == "created":
                note = notes.get(job.id, NOT_STARTED_NOTE)
                # Created but never started: it never ran, remove it.
                decisions.append(Requeue(job, note, None if container is None else container.id))
            else:
                decisions.append(Adopt(job, container))
        else:
            found = by_id.get(job.container_id or "")
            decisions.append(Vanished(job) if found is None else Adopt(job, found))
    return decisions


def committed_before_restart(job: Job, snapshots: Iterable[Snapshot]) -> bool:
    """Did this vanished job exit 0 and commit before the process died?

    A Spawner removes the container right after committing a clean exit; if
    the process died before the outcome was stored, the snapshot tells it.
    Jobs of one key never overlap, so a snapshot of this key made after this
    job started can only be this job's commit.
    """
    since = job.started_at or job.created_at
    return any(s.key == job.key and s.created_at >= since for s in snapshots)


def unowned_running(
    containers: Iterable[ContainerState], owned: Collection[str], in_flight: Collection[str]
) -> dict[str, tuple[SnapshotKey, str | None]]:
    """Running containers labelled ours that no job in flight owns: id -> (key, job ID).

    Without counting them a restarted supervisor would start the next job of
    a key beside a container still running for it. A container of a job in
    flight but not yet known by its container (starting) is not one.
    """
    found: dict[str, tuple[SnapshotKey, str | None]] = {}
    for container in containers:
        if not container.running or container.id in owned:
            continue
        if container.labels.get(LABEL_MANAGED) != "true":
            continue
        job_id = job_label(container)
        if job_id is not None and job_id in in_flight:
            continue  # starting: its Started is on the way
        project = container.labels.get(LABEL_PROJECT)
        work_item = container.labels.get(LABEL_WORK_ITEM)
        if project is None or work_item is None:
            continue
        found[container.id] = (SnapshotKey(project, work_item), job_id)
    return found


def orphans(
    containers: Iterable[ContainerState],
    owned: Collection[str],
    starting: Collection[str],
    now: float,
    grace_s: float,
) -> list[tuple[str, str | None]]:
    """Managed containers no job owns, older than the grace: (container ID, job ID)."""
    found: list[tuple[str, str | None]] = []
    for container in containers:
        if container.labels.get(LABEL_MANAGED) != "true" or container.id in owned:
            continue
        job_id = job_label(container)
        if job_id is not None and job_id in starting:
            continue  # its Started is on the way
        if now - container.created_at < grace_s:
            continue
        found.append((container.id, job_id))
    return found


def has_exited(container: ContainerState) -> bool:
    return container.status in ("exited", "dead")


def exit_of(container: ContainerState) -> ContainerExited:
    # An unknown exit code is never 0: it must not pass for success (or commit).
    code = container.exit_code if container.exit_code is not None else -1
    return ContainerExited(container.id, code, container.oom_killed)


def superseded(container: ContainerState, job: Job, host_id: str | None) -> bool:
    """Whether ``container`` runs an attempt of ``job`` that is no longer this
    host's: the job now belongs to another host, or to a newer attempt (it was
    rescued, or queued again). Such a container must never run on: a rescued
    job would run twice. One without the attempt label is judged by host alone."""
    if job.host is not None and host_id is not None and job.host != host_id:
        return True
    label = container.labels.get(LABEL_ATTEMPT)
    return label is not None and label.isdigit() and int(label) != job.attempt


def job_label(container: ContainerState) -> str | None:
    """The job a container runs for: how a job that was "starting" when the
    process died finds its container."""
    return container.labels.get(LABEL_JOB_ID) or None
