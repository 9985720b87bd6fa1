"""Every message the actors exchange, in one file.

Names follow one rule: a verb asks for an action (``Spawn``, ``Invalidate``),
a past tense reports an event (``Started``, ``ContainerExited``). Messages are
frozen dataclasses, so a message sent is a message that cannot change under
its receiver. A message that needs a reply is sent with ``ask``; the rest with
``tell``, so that no actor ever waits on one that may be waiting on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pykka

from actors.engine.base import ContainerState
from actors.model import JobSpec, Snapshot, SnapshotKey

__all__ = [
    "ActorCrashed",
    "Beat",
    "Cancel",
    "ContainerExited",
    "ContainersListed",
    "Fence",
    "Finish",
    "Finished",
    "ForgetSnapshot",
    "GetJob",
    "GetLease",
    "GetStatus",
    "ImageDeleted",
    "Invalidate",
    "ListContainers",
    "ListJobs",
    "ListSnapshots",
    "Lookup",
    "PruneJobs",
    "Reconcile",
    "RecordSnapshot",
    "Register",
    "RemoveContainer",
    "RemoveSnapshot",
    "ReportTo",
    "SetBaseImage",
    "ShipSnapshots",
    "Spawn",
    "SpawnFailed",
    "Started",
    "StopDispatching",
    "Submit",
    "Supersede",
    "Supervise",
    "SupervisorStatus",
    "SweepOrphans",
    "SweepSnapshots",
    "Terminate",
    "Terminated",
    "Tick",
    "Unfence",
    "WorkAvailable",
]

Ref = pykka.ActorRef[Any]

# --- SnapshotManager -------------------------------------------------------


@dataclass(frozen=True)
class Lookup:
    """Ask: the key's usable snapshot, or None. Refreshes last-used.

    With ``base_image_id`` only a snapshot grown from that base answers: a job
    never starts from another agent type's lineage (None: any base).
    """

    key: SnapshotKey
    base_image_id: str | None = None


@dataclass(frozen=True)
class Register:
    """A commit produced ``snapshot``; it replaces (and deletes) the key's previous image."""

    snapshot: Snapshot


@dataclass(frozen=True)
class Invalidate:
    """Drop the key's entry, but only if it still points at ``image_id``."""

    key: SnapshotKey
    image_id: str
    reason: str


@dataclass(frozen=True)
class ImageDeleted:
    """The engine reports this image gone (a ``delete`` event, not an ``untag``)."""

    image_id: str


@dataclass(frozen=True)
class SweepSnapshots:
    """Run eviction now: TTL, then max count (LRU), then max total size."""


@dataclass(frozen=True)
class ListSnapshots:
    """Ask: every registry entry."""


@dataclass(frozen=True)
class RemoveSnapshot:
    """Ask: drop the key's entry and delete its image. Replies True if there was one."""

    key: SnapshotKey


@dataclass(frozen=True)
class SetBaseImage:
    """The configured base image ``image`` now has this ID; older descendants are invalid.

    ``image`` is the configured reference (``worker.image`` or an agent type's);
    empty means ``worker.image``. Snapshots of every configured image stay valid.
    """

    image_id: str
    image: str = ""


# --- Spawner ---------------------------------------------------------------


@dataclass(frozen=True)
class Spawn:
    """Create and start the container for a job; reply ``Started`` or ``SpawnFailed``."""

    job_id: str
    spec: JobSpec
    snapshots_enabled: bool
    reply_to: Ref
    attempt: int = 0  # labelled on the container (LABEL_ATTEMPT)


@dataclass(frozen=True)
class Finish:
    """The job's container exited: read logs, commit on exit 0 (if enabled), remove it."""

    job_id: str
    spec: JobSpec
    container_id: str
    exit_code: int
    commit: bool
    reply_to: Ref


@dataclass(frozen=True)
class Terminate:
    """SIGTERM the container, SIGKILL after ``grace_s``; reply ``Terminated``."""

    job_id: str
    container_id: str
    grace_s: float
    reply_to: Ref


# --- Supervisor ------------------------------------------------------------


@dataclass(frozen=True)
class Submit:
    """Ask: persist and queue a validated job; replies with the stored Job."""

    spec: JobSpec


@dataclass(frozen=True)
class Cancel:
    """Ask: cancel a queued or running job; replies with the Job (or None if unknown)."""

    job_id: str


@dataclass(frozen=True)
class GetJob:
    job_id: str


@dataclass(frozen=True)
class ListJobs:
    state: str | None = None
    project: str | None = None
    limit: int = 100


@dataclass(frozen=True)
class Started:
    job_id: str
    container_id: str
    image_id: str
    from_snapshot: bool
    attempts: int
    spawner: str


@dataclass(frozen=True)
class SpawnFailed:
    """``retryable``: an engine error worth waiting out; the job goes back to the queue.

    ``answered``: the daemon itself answered (a 5xx), as opposed to not being
    reached at all; a job the daemon keeps refusing is failed after a while.
    """

    job_id: str
    error: str
    spawner: str
    retryable: bool = False
    answered: bool = False


@dataclass(frozen=True)
class ContainerExited:
    container_id: str
    exit_code: int
    oom: bool = False


@dataclass(frozen=True)
class Finished:
    job_id: str
    container_id: str
    exit_code: int
    snapshot_image_id: str | None
    logs_tail: str
    error: str | None
    spawner: str


@dataclass(frozen=True)
class Terminated:
    job_id: str
    container_id: str
    spawner: str


@dataclass(frozen=True)
class Tick:
    """Timers fire: check deadlines, retry waiting work, run due sweeps."""

    now: float


@dataclass(frozen=True)
class Reconcile:
    """Events may have been missed: list managed containers and settle exits."""


@dataclass(frozen=True)
class ActorCrashed:
    """A child actor crashed; its parent decides whether to restart it."""

    name: str
    error: str
    job_id: str | None = None
    # Which incarnation died: a report about one already replaced is stale.
    urn: str | None = None
    # It restarted itself in place (its address lives on); else it is dead.
    restarted: bool = False


@dataclass(frozen=True)
class Supervise:
    """To a parent: this child is yours; its crash reports (ActorCrashed) name it."""

    name: str
    ref: Ref


@dataclass(frozen=True)
class SweepOrphans:
    """Timer: list managed containers; stop and remove those no unfinished job owns."""

    now: float


@dataclass(frozen=True)
class PruneJobs:
    """Ask (and timer): delete finished jobs, with their history and logs, that
    ended more than ``supervisor.retention_s`` ago. Replies how many went."""


@dataclass(frozen=True)
class StopDispatching:
    """Shutdown: start nothing new; queued jobs stay queued in the store."""


@dataclass(frozen=True)
class GetStatus:
    """Ask: the Supervisor's counts, for health checks and draining.

    ``deadlines`` adds when each job is next due (``SupervisorStatus.due``):
    it reads the store's backing-off jobs, so a health probe leaves it off.
    """

    deadlines: bool = False


@dataclass(frozen=True)
class SupervisorStatus:
    queued: int
    in_flight: int
    running: int
    pending_ops: int
    spawners: int
    dispatching: bool
    # Read-only views, so a drain or a check can wait for the Supervisor's own
    # deadlines instead of guessing them: (job ID, when the next Tick at or
    # after it acts on that job by itself), sorted by job ID; a job that only
    # awaits a reply is absent. Then what holds keys and worker places.
    due: tuple[tuple[str, float], ...] = ()
    busy_keys: frozenset[SnapshotKey] = frozenset()
    leftovers: int = 0
    # This host lost its lease (a cluster): it claims nothing until it renews.
    fenced: bool = False


# --- the cluster: the HostLease and the Supervisor it fences ---------------


@dataclass(frozen=True)
class Fence:
    """To the Supervisor: this host's lease may run out before it renews. Claim
    nothing, kill every worker now: its jobs are about to be rescued elsewhere."""

    reason: str


@dataclass(frozen=True)
class Unfence:
    """To the Supervisor: the lease is renewed. Recover again: what was rescued
    meanwhile is another host's now (its writes raise ``Fenced``)."""


@dataclass(frozen=True)
class WorkAvailable:
    """To the Supervisor: the store has new or rescued work; claim now, not at the next Tick."""


@dataclass(frozen=True)
class ReportTo:
    """To the HostLease (or the SnapshotShipper): the Supervisor (or manager) to tell."""

    ref: Ref


@dataclass(frozen=True)
class GetLease:
    """Ask the HostLease: its ``LeaseStatus``."""


@dataclass(frozen=True)
class Beat:
    """Timer, to the HostLease: renew now (if no renewal is under way) and judge the lease."""

    now: float


@dataclass(frozen=True)
class RecordSnapshot:
    """To the SnapshotShipper: a snapshot registered on this host; index it, push it."""

    snapshot: Snapshot


@dataclass(frozen=True)
class ForgetSnapshot:
    """To the SnapshotShipper: this host evicted the image; unindex it, delete its manifest."""

    key: SnapshotKey
    image_id: str


@dataclass(frozen=True)
class ShipSnapshots:
    """Timer, to the SnapshotShipper: retry due pushes, drop superseded local copies."""

    now: float


@dataclass(frozen=True)
class Supersede:
    """To the SnapshotManager: a newer snapshot of the key exists in the cluster; drop
    the entry if it is still ``image_id`` and delete the image."""

    key: SnapshotKey
    image_id: str
    reason: str


# --- Reaper (the Supervisor's hands for listing and removing containers) ----


@dataclass(frozen=True)
class ListContainers:
    """List every managed container; reply ``ContainersListed`` to ``reply_to``.

    ``seq`` lets the Supervisor judge only jobs that were running before the
    list was taken, so a container started meanwhile is never called missing.
    """

    reason: str
    seq: int
    reply_to: Ref


@dataclass(frozen=True)
class ContainersListed:
    reason: str
    seq: int
    containers: tuple[ContainerState, ...]
    error: str | None = None


@dataclass(frozen=True)
class RemoveContainer:
    """Stop (SIGKILL after ``grace_s``) and remove a managed container."""

    container_id: str
    grace_s: float
    reason: str
