"""The Supervisor's reconciling half: what engine listings and crashed Spawners tell it.

A mixin of ``Supervisor`` (kept apart so that supervisor.py reads as one
job's life): it carries out the decisions of ``actors.recovery`` on start-up,
on each listing the Reaper sends back, and for the operations a crashed
Spawner took down with its inbox. The attributes and the unimplemented
methods declared at the top of the class are the Supervisor's.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import pykka

from actors import instance, recovery
from actors.clock import Clock
from actors.engine.base import ContainerState
from actors.flight import Flight, Flights, Kill, job_timeout
from actors.ledger import Ledger, job_logger
from actors.messages import (
    ActorCrashed,
    ContainerExited,
    ContainersListed,
    ListContainers,
    ListSnapshots,
    RemoveContainer,
)
from actors.model import Job, JobState, Snapshot, SnapshotKey
from actors.pool import OpKind, SpawnerPool
from actors.restarts import RestartIntensity
from actors.settings import Settings, SupervisorSettings
from actors.store import JobStore
from actors.store.cluster import ClusterStore
from actors.telemetry import capture_error

__all__ = ["Reconciling"]

log = logging.getLogger("actors.supervisor")

# A job that crashed its Spawner this many times is failed, not retried: a
# poison job must not burn the restart intensity of the whole supervisor.
MAX_CRASHES_PER_JOB = 2
FENCED_REQUEUE_NOTE = "re-queued: this host lost its lease and stopped it"
# The registry is in memory: a slower answer means the SnapshotManager is wedged.
SNAPSHOTS_ASK_S = 10.0


class SupervisorStopped(pykka.ActorDeadError):
    """The Supervisor gave up (Spawners crashed too often) or is shutting down.

    An ActorDeadError, so callers that already treat a dead actor as
    "unavailable, retry later" (the HTTP API answers 503) need no new case."""


class Reconciling:
    """Listings, recovery and crashed Spawners; mixed into ``Supervisor``."""

    actor_ref: pykka.ActorRef[Any]
    _settings: Settings
    _sup: SupervisorSettings
    _clock: Clock
    _store: JobStore
    _snapshots: pykka.ActorRef[Any]
    _pool: SpawnerPool
    _reaper: pykka.ActorRef[Any] | None
    _flights: Flights
    _ledger: Ledger
    _leftovers: dict[str, SnapshotKey]
    _restarts: RestartIntensity
    _list_seq: int
    _reconcile_requested: bool
    _fatal: str | None
    _abandoned: set[str]
    _superseded: set[str]
    _on_fatal: Callable[[str], None] | None

    if TYPE_CHECKING:  # pykka.ActorBase's: declared only, never shadowing it in the MRO

        def stop(self) -> None: ...

    def _on_exited(self, msg: ContainerExited) -> None:
        raise NotImplementedError

    def _complete(
        self,
        flight: Flight,
        exit_code: int | None,
        logs_tail: str,
        snapshot_image_id: str | None,
        error: str | None,
    ) -> None:
        raise NotImplementedError

    def _after_change(self) -> None:
        raise NotImplementedError

    # --- supervision of the Spawners ---------------------------------------

    def _send(self, job_id: str, kind: OpKind, message: Any) -> None:
        """Tell the least busy Spawner; a dead one is handled like its crash report."""
        name = self._pool.least_busy()
        if name is None:
            return
        dead_urn = self._pool.send(name, job_id, kind, message)
        if dead_urn is not None:
            # From our own inbox, never recursively. Its own report may be on
            # the way too: the urn lets one of them count.
            self.actor_ref.tell(
                ActorCrashed(name, "the spawner is not running", None, urn=dead_urn)
            )

    def _give_up(self, reason: str) -> None:
        self._fatal = reason
        log.critical("supervisor stopping: %s", reason)
        capture_error(SupervisorStopped(reason), source="supervisor")
        if self._on_fatal is not None:
            try:
                self._on_fatal(reason)
            except Exception:
                log.exception("on_fatal callback failed")
        self.stop()

    # --- engine listings: reconcile, recover, sweep ------------------------

    def _request_listing(self, reason: str) -> None:
        if self._reaper is None:
            return
        self._list_seq += 1
        if reason == "recover":
            self._reconcile_requested = False
        self._reaper.tell(ListContainers(reason, self._list_seq, self.actor_ref))

    def _on_listed(self, msg: ContainersListed) -> None:
        if msg.error is not None:
            log.warning("listing containers (%s) failed: %s", msg.reason, msg.error)
            if msg.reason == "recover" or self._flights.in_phase("recovering"):
                self._reconcile_requested = True
            return
        msg = dataclasses.replace(msg, containers=tuple(self._mine(msg.containers)))
        settled = [f for f in self._flights.in_phase("recovering") if f.seq < msg.seq]
        for flight in settled:
            self._flights.remove(flight.id)
        notes = {f.id: f.recover_note for f in settled if f.recover_note is not None}
        self._recover([f.job for f in settled], list(msg.containers), notes)
        self._remove_superseded(msg.containers)
        by_id = {c.id: c for c in msg.containers}
        for flight in self._flights.in_phase("running"):
            if flight.seq >= msg.seq or flight.container_id is None:
                continue
            container = by_id.get(flight.container_id)
            if container is None:
                self._container_vanished(flight)
            elif recovery.has_exited(container):
                self._on_exited(recovery.exit_of(container))
        if msg.reason == "sweep":
            owned = self._flights.containers()
            starting = {f.id for f in self._flights.in_phase("starting", "recovering")}
            grace = self._sup.orphan_grace_s
            for cid, job_id in recovery.orphans(
                msg.containers, owned, starting, self._clock.now(), grace
            ):
                log.info("removing orphan container %s (job %s)", cid, job_id or "?")
                self._remove_container(cid, self._sup.stop_grace_s, "orphan")
        self._note_leftovers(msg.containers)
        self._after_change()

    def _remove_superseded(self, containers: Iterable[ContainerState]) -> None:
        """Remove at once (not after ``orphan_grace_s``) every container, running or
        exited, whose job now belongs to another host or another attempt: rescued
        while this host was down or fenced, it must never run twice."""
        listed = {c.id for c in containers}
        self._superseded &= listed  # forget those gone; warn once per container
        owned = self._flights.containers()
        host_id = self._store.host_id if isinstance(self._store, ClusterStore) else None
        for container in containers:
            job_id = recovery.job_label(container)
            if job_id is None or container.id in owned or container.id in self._superseded:
                continue
            stored = self._store.get(job_id)
            if stored is None or not recovery.superseded(container, stored, host_id):
                continue
            self._superseded.add(container.id)
            log.warning(
                "container %s ran job %s as this host's; it is now %s's (attempt %d): removing it",
                container.id,
                job_id,
                stored.host or "queued",
                stored.attempt,
            )
            self._remove_container(container.id, 0.0, "its job was rescued elsewhere")

    def _mine(self, containers: Iterable[ContainerState]) -> list[ContainerState]:
        """Only this instance's containers: another's are never swept, counted or adopted."""
        known = lambda job_id: self._store.get(job_id) is not None  # noqa: E731
        return instance.mine(containers, self._sup.instance_id, known)

    def _container_vanished(self, flight: Flight) -> None:
        note = "its container disappeared (removed outside Snapyard?); the exit code is unknown"
        if flight.kill is None:
            flight.kill = Kill(JobState.FAILED, note)
        job_logger(flight.job).warning("job's container vanished")
        self._complete(flight, None, "", None, note)

    def _note_leftovers(self, containers: Iterable[ContainerState]) -> None:
        """Count running containers no job in flight owns; stop those of finished jobs.

        One whose job is already terminal is stopped now; one of an unknown job
        is left to the orphan sweep (after its grace) but holds its key until then.
        """
        found = recovery.unowned_running(
            containers, self._flights.containers(), {f.id for f in self._flights}
        )
        for cid, (_key, job_id) in found.items():
            stored = self._store.get(job_id) if job_id is not None else None
            if stored is not None and stored.state.terminal:
                log.warning(
                    "container %s of %s job %s is still running; stopping it",
                    cid,
                    stored.state.value,
                    job_id,
                )
                self._remove_container(cid, self._sup.stop_grace_s, "job already finished")
        self._leftovers = {cid: key for cid, (key, _job) in found.items()}

    def _recover(
        self,
        jobs: list[Job],
        containers: list[ContainerState] | None,
        notes: dict[str, str] | None = None,
    ) -> None:
        """Carry out ``recovery.plan`` for the unfinished jobs of a previous run (or crash)."""
        now = self._clock.now()
        for decision in recovery.plan(jobs, containers, notes):
            job = decision.job
            self._ledger.remember(job)
            match decision:
                case recovery.Ended(leftover=leftover):
                    if leftover is not None:
                        self._remove_container(leftover, self._sup.stop_grace_s, "ended")
                    self._ledger.finish(job, job.state, error=job.error)
                case recovery.AwaitListing():
                    self._flights.add(Flight(job, "recovering", seq=self._list_seq))
                    self._reconcile_requested = True
                case recovery.Requeue(note=note, remove=remove):
                    if remove is not None:
                        self._remove_container(remove, 0.0, "never started")
                    # Starting when a fence killed its worker: that was an attempt too.
                    fenced = job.id in self._abandoned
                    self._abandoned.discard(job.id)
                    self._ledger.requeue(job, note, backoff=False, next_attempt=fenced)
                case recovery.Vanished() | recovery.Adopt() if self._killed_by_fence(decision):
                    # Its worker was killed by a fence (actors.fencing): it never ended.
                    self._abandoned.discard(job.id)
                    self._ledger.requeue(job, FENCED_REQUEUE_NOTE, backoff=False, next_attempt=True)
                case recovery.Vanished():
                    self._finish_vanished(job)
                case recovery.Adopt(container=container):
                    self._adopt(job, container, now)

    def _killed_by_fence(self, decision: recovery.Vanished | recovery.Adopt) -> bool:
        if decision.job.id not in self._abandoned:
            return False
        if isinstance(decision, recovery.Adopt):
            if not recovery.has_exited(decision.container):
                return False  # the kill did not reach it: still this host's, adopt it
            self._remove_container(decision.container.id, 0.0, "killed by a fence")
        return True

    def _finish_vanished(self, job: Job) -> None:
        if recovery.committed_before_restart(job, self._registered_snapshots()):
            self._ledger.finish(
                job, JobState.SUCCEEDED, exit_code=0, snapshot_committed=True, error=None
            )
            job_logger(job).info("recovered: it exited 0 and committed before the restart")
            return
        error = "its container disappeared while Snapyard was down; the exit code is unknown"
        self._ledger.finish(job, JobState.FAILED, error=error)

    def _registered_snapshots(self) -> list[Snapshot]:
        # Safe to ask: the SnapshotManager never asks anyone, so it cannot wait on us.
        try:
            found = self._snapshots.ask(ListSnapshots(), timeout=SNAPSHOTS_ASK_S)
        except (pykka.ActorDeadError, pykka.Timeout):
            return []
        return list(found) if isinstance(found, list) else []

    def _adopt(self, job: Job, container: ContainerState, now: float) -> None:
        flight = self._flights.add(Flight(job, "running", seq=self._list_seq))
        self._flights.attach(flight, container.id)
        started_at = job.started_at or container.started_at or now
        flight.deadline = job.deadline or started_at + job_timeout(self._settings, job.spec)
        job = self._ledger.save(
            dataclasses.replace(
                job,
                state=JobState.RUNNING,
                container_id=container.id,
                image_id=job.image_id or container.image_id,
                started_at=started_at,
                deadline=flight.deadline,
            ),
            note="re-adopted after restart",
        )
        job_logger(job).info("re-adopted container")
        if recovery.has_exited(container):
            # Judged by when it exited, not when we came back to look.
            exited_at = container.finished_at if container.finished_at is not None else now
            if flight.deadline <= exited_at:
                limit = job_timeout(self._settings, job.spec)
                flight.kill = Kill(
                    JobState.TIMED_OUT,
                    f"timed out after {limit:g}s "
                    "(it exited while Snapyard was down, past its deadline)",
                )
            self._on_exited(recovery.exit_of(container))

    def _recover_lost_op(
        self, job_id: str, kind: OpKind, message: Any, crash: ActorCrashed
    ) -> None:
        """A crashed Spawner's inbox is gone: redo, re-queue or fail what it held."""
        flight = self._flights.get(job_id)
        if flight is None:
            return
        strikes = self._ledger.strikes(job_id)
        guilty = crash.job_id == job_id or crash.job_id is None
        if guilty:
            strikes.crashes += 1
        reason = f"{crash.name} crashed while handling it: {crash.error}"
        if guilty and strikes.crashes >= MAX_CRASHES_PER_JOB:
            if kind == "spawn":
                self._flights.remove(job_id)
                # A cancel (or timeout) decided before the crash still stands.
                kill = flight.kill or Kill(JobState.FAILED, reason)
                self._ledger.finish(flight.job, kill.state, error=kill.note)
            else:
                code = None if flight.exit is None else flight.exit.exit_code
                self._complete(flight, code, "", None, reason)
            return
        if kind == "spawn":
            # The Spawner may have started the container before it died: recover
            # the job as after a restart (adopt a container labelled with it,
            # else re-queue), so the work never runs twice.
            log.warning("job %s: %s; looking for its container", job_id, reason)
            flight.phase, flight.seq = "recovering", self._list_seq
            flight.recover_note = f"retrying: {reason}"
            self._request_listing("recover")
        else:
            self._send(job_id, kind, message)

    def _remove_container(self, container_id: str, grace_s: float, reason: str) -> None:
        if self._reaper is not None:
            self._reaper.tell(RemoveContainer(container_id, grace_s, reason))

    # --- supervision of the Spawners ---------------------------------------

    def _on_crashed(self, msg: ActorCrashed) -> None:
        if not self._pool.knows(msg.name):
            log.warning("crash report from unknown child %s: %s", msg.name, msg.error)
            return
        if not self._pool.is_current(msg.name, msg.urn):
            log.info("%s: a second report of a crash already handled", msg.name)
            return
        error = RuntimeError(f"{msg.name} crashed: {msg.error}")
        capture_error(
            error, source="supervisor", extras={"spawner": msg.name, "job_id": msg.job_id}
        )
        log.error("%s crashed (%s); restarting it", msg.name, msg.error)
        if not self._restarts.record(self._clock.now()):
            self._give_up(
                f"Spawners crashed {self._restarts.describe()}; "
                f"the last one: {msg.name}: {msg.error}"
            )
            return
        try:
            lost = self._pool.restart(msg.name, self.actor_ref)
        except Exception as exc:
            self._give_up(f"could not restart {msg.name}: {exc}")
            return
        for (job_id, kind), message in lost.items():
            self._recover_lost_op(job_id, kind, message, msg)
        self._after_change()
