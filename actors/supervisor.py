"""Supervisor actor: intake, limits, per-key serialization, timeouts and the Spawner pool.

The Supervisor owns every job's life after submit. It decides; others act:
Spawners make the Docker calls (create, commit, stop), the Reaper lists and
removes containers, the Watcher reports exits. So its inbox never waits on the
engine, and it never ``ask``s anything that could ask it back: every exchange
with a child is a ``tell`` carrying ``reply_to``.

Every state change is written to the store before anyone is told about it,
which is what makes a restart lossless: queued jobs come back in FIFO order,
running containers are re-adopted by their ID, and a job that was starting
when the process died is either adopted (its container exists) or queued
again (it does not).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import pykka

from actors.clock import Clock
from actors.engine.base import ContainerState, Engine, EngineError
from actors.messages import (
    ActorCrashed,
    Cancel,
    ContainerExited,
    ContainersListed,
    Finish,
    Finished,
    GetJob,
    GetStatus,
    ListContainers,
    ListJobs,
    ListSnapshots,
    Reconcile,
    RemoveContainer,
    Spawn,
    SpawnFailed,
    Started,
    StopDispatching,
    Submit,
    SupervisorStatus,
    SweepOrphans,
    Terminate,
    Terminated,
    Tick,
)
from actors.model import InvalidJob, Job, JobSpec, JobState, Snapshot, SnapshotKey
from actors.reaper import MANAGED_LABEL, MANAGED_LABELS, Reaper
from actors.restarts import RestartIntensity
from actors.settings import Settings
from actors.snapshot_manager import LABEL_PROJECT, LABEL_WORK_ITEM
from actors.spawner import LABEL_JOB_ID
from actors.store import Caps, JobStore, new_job_id
from actors.telemetry import METRICS, SECRETS, capture_error, job_log

__all__ = ["JOB_LABELS", "SpawnerFactory", "Supervisor", "SupervisorStopped", "job_timeout"]

log = logging.getLogger(__name__)

# Builds (or rebuilds, after a crash) the Spawner called ``name``, whose crash
# reports go to the given supervisor ref.
SpawnerFactory = Callable[[str, pykka.ActorRef[Any]], pykka.ActorRef[Any]]

# The Spawner's job-ID label finds the container of a job that was
# "starting" when the process died.
JOB_LABELS = (LABEL_JOB_ID,)

# A job that crashed its Spawner this many times is failed, not retried: a
# poison job must not burn the restart intensity of the whole supervisor.
MAX_CRASHES_PER_JOB = 2
# Re-queues of a job whose start the daemon answered with a 5xx each time.
MAX_REFUSED_STARTS = 10
# The registry is in memory: a slower answer means the SnapshotManager is wedged.
SNAPSHOTS_ASK_S = 10.0
# How long an exit of a not-yet-known container is kept: the Watcher can see
# an exit before the Spawner's Started reaches us.
EARLY_EXIT_TTL_S = 600.0
EARLY_EXIT_MAX = 10_000

_ASKS = (Submit, Cancel, GetJob, ListJobs, GetStatus)


class SupervisorStopped(pykka.ActorDeadError):
    """The Supervisor gave up (Spawners crashed too often) or is shutting down.

    An ActorDeadError, so callers that already treat a dead actor as
    "unavailable, retry later" (the HTTP API answers 503) need no new case."""


def job_timeout(settings: Settings, spec: JobSpec) -> float:
    """The job's run-time limit: its own, else the project watchdog plus buffer,
    else its agent type's, else the default."""
    if spec.timeout_s is not None:
        return spec.timeout_s
    watchdog = settings.project(spec.project).watchdog_s
    if watchdog is not None:
        return watchdog + settings.supervisor.watchdog_buffer_s
    agent_timeout = settings.agent_type(spec.agent_type).timeout_s
    if agent_timeout is not None:
        return agent_timeout
    return settings.supervisor.default_timeout_s


Phase = Literal["recovering", "starting", "running", "finishing"]
OpKind = Literal["spawn", "finish", "terminate"]


@dataclass
class _Slot:
    """One job in flight: it holds a worker slot and its key until Finished."""

    job_id: str
    spec: JobSpec
    phase: Phase
    container_id: str | None = None
    deadline: float | None = None
    # Set once we decide to kill: the terminal state wins over the exit it causes.
    kill_state: JobState | None = None
    kill_note: str | None = None
    oom: bool = False
    exit_code: int | None = None
    commit: bool = False
    terminate_sent: bool = False
    terminated_at: float = 0.0
    # The listing sequence number when it started running: only listings asked
    # for after that may call its container missing.
    running_seq: int = 0
    # Likewise for a slot being recovered: a listing asked for before it
    # (before its Spawner crashed, say) may not show its container yet.
    recover_seq: int = 0


@dataclass
class _Pool:
    """The Spawners by name, with the operations each one owes us a reply for."""

    refs: dict[str, pykka.ActorRef[Any]] = field(default_factory=dict)
    pending: dict[str, dict[tuple[str, OpKind], Any]] = field(default_factory=dict)

    def least_busy(self) -> str | None:
        if not self.refs:
            return None
        return min(self.refs, key=lambda name: (len(self.pending.get(name, {})), name))

    def load(self) -> int:
        return sum(len(ops) for ops in self.pending.values())


class Supervisor(pykka.ThreadingActor):
    """Runs queued jobs within the limits, one per (project, work item) at a time."""

    def __init__(
        self,
        engine: Engine,
        store: JobStore,
        settings: Settings,
        clock: Clock,
        snapshots: pykka.ActorRef[Any],
        spawner_factory: SpawnerFactory,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        self._engine = engine
        self._store = store
        self._settings = settings
        self._sup = settings.supervisor
        self._clock = clock
        self._snapshots = snapshots
        self._spawner_factory = spawner_factory
        self._on_fatal = on_fatal
        self._pool = _Pool()
        self._reaper: pykka.ActorRef[Any] | None = None
        self._caps = Caps.from_settings(settings)
        self._jobs: dict[str, Job] = {}  # every job in flight (holding a slot)
        self._slots: dict[str, _Slot] = {}
        self._by_container: dict[str, str] = {}
        self._retries: dict[str, int] = {}
        self._crashes: dict[str, int] = collections.Counter()
        # Starts the daemon answered with a 5xx, in a row, per job.
        self._refusals: dict[str, int] = collections.Counter()
        # Why a job is being recovered mid-run (a Spawner crash), for its history.
        self._recover_notes: dict[str, str] = {}
        # Running containers labelled ours that no job in flight owns, e.g. a
        # cancel whose stop never reached a down engine, then a restart. Until
        # they are gone they hold their key and a worker place.
        self._leftovers: dict[str, SnapshotKey] = {}
        self._restarts = RestartIntensity(self._sup.restart_max, self._sup.restart_window_s)
        self._early_exits: dict[str, tuple[ContainerExited, float]] = {}
        self._list_seq = 0
        self._reconcile_requested = False
        self._dispatching = True
        self._fatal: str | None = None
        self._state_counts: dict[JobState, int] = {}

    # --- life cycle --------------------------------------------------------

    def on_start(self) -> None:
        for index in range(self._sup.spawners):
            name = f"spawner-{index + 1}"
            self._pool.refs[name] = self._spawner_factory(name, self.actor_ref)
            self._pool.pending[name] = {}
        self._reaper = Reaper.start(self._engine)
        self._state_counts = dict(self._store.count_by_state())
        # Start-up reconciliation may list containers before the first message
        # (the one Docker call the Supervisor makes itself): recovery must see
        # the engine's truth before it dispatches anything.
        containers: list[ContainerState] | None
        try:
            containers = self._engine.list_containers(MANAGED_LABELS)
        except EngineError as exc:
            log.warning("engine unreachable at start-up (%s); recovery waits for it", exc)
            containers = None
        with self._store.batch():
            self._recover(self._store.unfinished(), containers)
            if containers is not None:
                self._note_leftovers(containers)
            self._publish_metrics()
            self._dispatch()

    def on_stop(self) -> None:
        # Detach, do not kill: running containers keep running and are
        # re-adopted by the next start. Children stop after their inboxes.
        futures = [ref.stop(block=False) for ref in self._pool.refs.values()]
        if self._reaper is not None:
            futures.append(self._reaper.stop(block=False))
        deadline = time.monotonic() + self._sup.shutdown_timeout_s
        for future in futures:
            with contextlib.suppress(pykka.Timeout, pykka.ActorDeadError):
                future.get(timeout=max(0.0, deadline - time.monotonic()))
        METRICS.set("snapyard_running_workers", 0)

    def on_receive(self, message: Any) -> Any:
        if self._fatal is not None:
            if isinstance(message, _ASKS):
                raise SupervisorStopped(self._fatal)
            return None
        try:
            # One transaction per message: its state writes share one fsync,
            # and it commits before an ask's reply leaves this handler.
            with self._store.batch():
                return self._handle(message)
        except InvalidJob:
            raise
        except Exception as exc:
            if isinstance(message, _ASKS):
                raise
            # A tell handler that raises stops a pykka actor: log, report, go on.
            log.exception("supervisor: handling %s failed", type(message).__name__)
            capture_error(exc, source="supervisor", extras={"message": type(message).__name__})
            return None

    def _handle(self, message: Any) -> Any:
        match message:
            case Submit(spec=spec):
                return self._submit(spec)
            case Cancel(job_id=job_id):
                return self._cancel(job_id)
            case GetJob(job_id=job_id):
                return self._store.get(job_id)
            case ListJobs(state=state, project=project, limit=limit):
                return self._store.list(
                    state=None if state is None else JobState(state), project=project, limit=limit
                )
            case GetStatus():
                return self._status()
            case Started():
                self._on_started(message)
            case SpawnFailed():
                self._on_spawn_failed(message)
            case ContainerExited():
                self._on_exited(message)
            case Finished():
                self._on_finished(message)
            case Terminated():
                self._on_terminated(message)
            case Tick(now=now):
                self._on_tick(now)
            case SweepOrphans():
                self._request_listing("sweep")
            case Reconcile():
                self._request_listing("reconcile")
            case ContainersListed():
                self._on_listed(message)
            case ActorCrashed():
                self._on_crashed(message)
            case StopDispatching():
                self._dispatching = False
            case _:
                log.warning("supervisor: unexpected message %r", message)
        return None

    # --- intake ------------------------------------------------------------

    def _submit(self, spec: JobSpec) -> Job:
        if not self._dispatching:
            raise SupervisorStopped("Snapyard is shutting down; it accepts no new jobs")
        if not self._sup.allow_unknown_projects and spec.project not in self._settings.projects:
            known = ", ".join(sorted(self._settings.projects)) or "none"
            raise InvalidJob(
                "project",
                f"unknown project {spec.project!r}: add a [projects.{spec.project}] table "
                f"to the configuration (known projects: {known})",
            )
        job = Job(id=new_job_id(), spec=spec, state=JobState.QUEUED, created_at=self._clock.now())
        # Persist first: a job we replied to is a job that survives a crash.
        self._store.add(job, note="submitted")
        self._count(None, JobState.QUEUED)
        if spec.env:
            SECRETS.remember(job.id, spec.env.values())
        self._log(job).info("job queued")
        self._dispatch()
        self._publish_metrics()
        return job

    def _cancel(self, job_id: str) -> Job | None:
        job = self._jobs.get(job_id)
        slot = self._slots.get(job_id)
        if job is None or slot is None:
            stored = self._store.get(job_id)
            if stored is None or stored.state is not JobState.QUEUED:
                return stored  # unknown (None) or already finished
            self._jobs[job_id] = stored  # counted from QUEUED by _save
            return self._finish_job(stored, JobState.CANCELLED, error="cancelled before it started")
        if slot.phase in ("finishing", "recovering") or slot.kill_state is not None:
            # Already exited, already being stopped, or not yet re-adopted (the
            # engine is unreachable): nothing to stop yet, so nothing changes.
            return job
        slot.kill_state = JobState.CANCELLED
        slot.kill_note = "cancelled while running"
        # Cancelled is final from the caller's point of view; the slot stays
        # taken until the container is stopped and removed.
        job = self._save(
            dataclasses.replace(job, state=JobState.CANCELLED, error=slot.kill_note),
            note="cancel requested",
        )
        if slot.phase == "running":
            self._terminate(slot)
        return job

    # --- dispatch ----------------------------------------------------------

    def _dispatch(self) -> None:
        """Ask the store for as many jobs as there are free worker places, and start them.

        The store applies the admission rules (see ``JobStore.claim``); the
        Supervisor adds only what it alone knows: its free places, and the
        keys of running containers no job owns (leftovers of a previous run).
        """
        if not self._dispatching or not self._pool.refs:
            return
        free = self._sup.max_workers - len(self._slots) - len(self._leftovers)
        if free <= 0:
            return
        claimed = self._store.claim(
            free,
            self._clock.now(),
            self._caps,
            blocked=set(self._leftovers.values()),
            note="claimed",
        )
        for job in claimed:
            name = self._pool.least_busy()
            assert name is not None
            self._count(JobState.QUEUED, JobState.STARTING)
            if job.spec.env:
                SECRETS.remember(job.id, job.spec.env.values())
            self._slots[job.id] = _Slot(job.id, job.spec, "starting")
            self._jobs[job.id] = job
            self._send(
                name,
                job.id,
                "spawn",
                Spawn(
                    job.id,
                    job.spec,
                    self._settings.snapshots_enabled_for(job.spec.project),
                    self.actor_ref,
                ),
            )

    def _send(self, name: str, job_id: str, kind: OpKind, message: Any) -> None:
        """Tell a Spawner, remembering that it owes us a reply for this job."""
        self._pool.pending.setdefault(name, {})[(job_id, kind)] = message
        ref = self._pool.refs[name]
        try:
            ref.tell(message)
        except pykka.ActorDeadError:
            # Handled like a crash report, but from our own inbox: never recurse.
            # Its own report may be on the way too: the urn lets one of them count.
            self.actor_ref.tell(
                ActorCrashed(name, "the spawner is not running", None, urn=ref.actor_urn)
            )

    def _done(self, name: str, job_id: str, kind: OpKind) -> None:
        self._pool.pending.get(name, {}).pop((job_id, kind), None)

    def _send_any(self, job_id: str, kind: OpKind, message_for: Callable[[], Any]) -> None:
        name = self._pool.least_busy()
        if name is not None:
            self._send(name, job_id, kind, message_for())

    # --- spawner replies ---------------------------------------------------

    def _on_started(self, msg: Started) -> None:
        self._done(msg.spawner, msg.job_id, "spawn")
        slot = self._slots.get(msg.job_id)
        job = self._jobs.get(msg.job_id)
        if slot is None or job is None or slot.phase != "starting":
            # Not ours any more (e.g. re-queued after its Spawner was presumed
            # dead). The orphan sweep removes the container after its grace.
            log.warning("started container %s for unknown job %s", msg.container_id, msg.job_id)
            return
        now = self._clock.now()
        slot.phase = "running"
        slot.container_id = msg.container_id
        slot.deadline = now + job_timeout(self._settings, slot.spec)
        slot.running_seq = self._list_seq
        self._by_container[msg.container_id] = msg.job_id
        self._retries.pop(msg.job_id, None)
        state = JobState.CANCELLED if slot.kill_state is JobState.CANCELLED else JobState.RUNNING
        job = self._save(
            dataclasses.replace(
                job,
                state=state,
                container_id=msg.container_id,
                image_id=msg.image_id,
                from_snapshot=msg.from_snapshot,
                attempts=msg.attempts,
                started_at=now,
                deadline=slot.deadline,
                error=job.error if state is JobState.CANCELLED else None,
            ),
            note=f"{msg.spawner}; from {'snapshot' if msg.from_snapshot else 'base image'}",
        )
        self._log(job).info("job running")
        if slot.kill_state is not None:
            self._terminate(slot)
        early = self._early_exits.pop(msg.container_id, None)
        if early is not None:
            self._on_exited(early[0])
        self._publish_metrics()

    def _on_spawn_failed(self, msg: SpawnFailed) -> None:
        self._done(msg.spawner, msg.job_id, "spawn")
        slot = self._slots.get(msg.job_id)
        job = self._jobs.get(msg.job_id)
        if slot is None or job is None or slot.phase != "starting":
            return
        del self._slots[msg.job_id]
        if slot.kill_state is JobState.CANCELLED:
            self._finish_job(job, JobState.CANCELLED, error=job.error)
        elif msg.retryable and msg.answered and self._refusals[job.id] >= MAX_REFUSED_STARTS:
            # Unreachable, a job waits for as long as it takes; a daemon that
            # answers but keeps refusing this start would otherwise hold it forever.
            self._finish_job(
                job,
                JobState.FAILED,
                error=f"the engine refused to start it {MAX_REFUSED_STARTS + 1} times: {msg.error}",
            )
        elif msg.retryable:
            # Only refusals in a row count: an unreachable daemon resets them.
            self._refusals[job.id] = self._refusals[job.id] + 1 if msg.answered else 0
            self._requeue(job, f"will retry: {msg.error}", backoff=True)
        else:
            self._finish_job(job, JobState.FAILED, error=msg.error)
        self._dispatch()
        self._publish_metrics()

    def _on_exited(self, msg: ContainerExited) -> None:
        job_id = self._by_container.get(msg.container_id)
        if job_id is None and self._leftovers.pop(msg.container_id, None) is not None:
            self._dispatch()  # its key and its worker place are free again
            return
        if job_id is None:
            # Maybe its Started is still on the way; else an orphan (the sweep's).
            if len(self._early_exits) < EARLY_EXIT_MAX:
                self._early_exits[msg.container_id] = (msg, self._clock.now())
            return
        slot = self._slots.get(job_id)
        if slot is None or slot.phase == "finishing":
            return  # a duplicate: the first exit already started the finish
        slot.phase = "finishing"
        slot.exit_code = msg.exit_code
        slot.oom = slot.oom or msg.oom
        # A kill wins over the exit it causes: no commit, and the state is not
        # decided by the exit code.
        slot.commit = (
            slot.kill_state is None
            and msg.exit_code == 0
            and self._settings.snapshots_enabled_for(slot.spec.project)
        )
        self._finish_container(slot)

    def _finish_container(self, slot: _Slot) -> None:
        assert slot.container_id is not None
        container_id = slot.container_id
        exit_code = slot.exit_code if slot.exit_code is not None else -1
        self._send_any(
            slot.job_id,
            "finish",
            lambda: Finish(
                slot.job_id, slot.spec, container_id, exit_code, slot.commit, self.actor_ref
            ),
        )

    def _on_finished(self, msg: Finished) -> None:
        self._done(msg.spawner, msg.job_id, "finish")
        slot = self._slots.get(msg.job_id)
        job = self._jobs.get(msg.job_id)
        if slot is None or job is None:
            return
        self._complete(slot, job, msg.exit_code, msg.logs_tail, msg.snapshot_image_id, msg.error)

    def _complete(
        self,
        slot: _Slot,
        job: Job,
        exit_code: int | None,
        logs_tail: str,
        snapshot_image_id: str | None,
        error: str | None,
    ) -> None:
        """The container is gone: record the outcome, free the slot, start the next."""
        state: JobState
        if slot.kill_state is not None:
            state, error = slot.kill_state, slot.kill_note
        elif exit_code == 0:
            state = JobState.SUCCEEDED
        else:
            state = JobState.FAILED
            what = f"exited with code {exit_code}"
            if slot.oom:
                what += " (out of memory: killed by the OOM killer)"
            error = f"{what}: {error}" if error else what
        self._release(slot)
        self._finish_job(
            job,
            state,
            error=error,
            exit_code=exit_code,
            logs_tail=logs_tail,
            snapshot_committed=snapshot_image_id is not None,
        )
        self._dispatch()
        self._publish_metrics()

    def _on_terminated(self, msg: Terminated) -> None:
        self._done(msg.spawner, msg.job_id, "terminate")
        slot = self._slots.get(msg.job_id)
        if slot is not None and slot.phase == "running":
            # The container is stopped; its exit normally reaches us from the
            # Watcher. Ask the engine too, so a lost event cannot strand the job.
            # If the stop itself failed (engine down), a later Tick sends it again.
            slot.terminate_sent = False
            slot.terminated_at = self._clock.now()
            self._request_listing("terminated")

    def _terminate(self, slot: _Slot) -> None:
        if slot.terminate_sent or slot.container_id is None:
            return
        slot.terminate_sent = True
        container_id = slot.container_id
        self._send_any(
            slot.job_id,
            "terminate",
            lambda: Terminate(slot.job_id, container_id, self._sup.stop_grace_s, self.actor_ref),
        )

    # --- timers ------------------------------------------------------------

    def _on_tick(self, now: float) -> None:
        for slot in list(self._slots.values()):
            if (
                slot.phase == "running"
                and slot.kill_state is None
                and slot.deadline is not None
                and slot.deadline <= now
            ):
                limit = job_timeout(self._settings, slot.spec)
                slot.kill_state = JobState.TIMED_OUT
                slot.kill_note = f"timed out after {limit:g}s"
                job = self._jobs[slot.job_id]
                self._log(job).warning("job timed out; stopping its container")
                self._terminate(slot)
            elif (
                slot.phase == "running"
                and slot.kill_state is not None
                and not slot.terminate_sent
                and now - slot.terminated_at > self._sup.stop_grace_s
            ):
                self._terminate(slot)  # the last stop did not end it: try again
        stale = now - EARLY_EXIT_TTL_S
        for cid in [c for c, (_, at) in self._early_exits.items() if at < stale]:
            del self._early_exits[cid]
        if self._reconcile_requested:
            self._request_listing("recover")
        self._dispatch()
        self._publish_metrics()

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
            if msg.reason == "recover" or any(
                s.phase == "recovering" for s in self._slots.values()
            ):
                self._reconcile_requested = True
            return
        settled = [
            job_id
            for job_id, slot in self._slots.items()
            if slot.phase == "recovering" and slot.recover_seq < msg.seq
        ]
        if settled:
            recovering = [self._jobs[j] for j in settled]
            for job in recovering:
                self._slots.pop(job.id)
            self._recover(recovering, list(msg.containers))
        by_id = {c.id: c for c in msg.containers}
        for slot in list(self._slots.values()):
            if slot.phase != "running" or slot.running_seq >= msg.seq:
                continue
            assert slot.container_id is not None
            container = by_id.get(slot.container_id)
            if container is None:
                self._container_vanished(slot)
            elif _has_exited(container):
                self._on_exited(_exit_of(container))
        if msg.reason == "sweep":
            self._sweep_orphans(msg.containers)
        self._note_leftovers(msg.containers)
        self._dispatch()
        self._publish_metrics()

    def _container_vanished(self, slot: _Slot) -> None:
        job = self._jobs[slot.job_id]
        note = "its container disappeared (removed outside Snapyard?); the exit code is unknown"
        if slot.kill_state is None:
            slot.kill_state, slot.kill_note = JobState.FAILED, note
        self._log(job).warning("job's container vanished")
        self._complete(slot, job, None, "", None, note)

    def _note_leftovers(self, containers: Iterable[ContainerState]) -> None:
        """Count running containers no job in flight owns; stop those of finished jobs.

        Without this a restarted supervisor would start the next job of a key
        beside a container still running for it. One whose job is already
        terminal is stopped now; one of an unknown job is left to the orphan
        sweep (after its grace) but still holds its key until then.
        """
        leftovers: dict[str, SnapshotKey] = {}
        for container in containers:
            if not container.running or container.id in self._by_container:
                continue
            if container.labels.get(MANAGED_LABEL) != "true":
                continue
            job_id = _job_label(container)
            if job_id is not None and job_id in self._slots:
                continue  # starting: its Started is on the way
            project = container.labels.get(LABEL_PROJECT)
            work_item = container.labels.get(LABEL_WORK_ITEM)
            if project is None or work_item is None:
                continue
            leftovers[container.id] = SnapshotKey(project, work_item)
            stored = self._store.get(job_id) if job_id is not None else None
            if stored is not None and stored.state.terminal and self._reaper is not None:
                log.warning(
                    "container %s of %s job %s is still running; stopping it",
                    container.id,
                    stored.state.value,
                    job_id,
                )
                self._reaper.tell(
                    RemoveContainer(container.id, self._sup.stop_grace_s, "job already finished")
                )
        self._leftovers = leftovers

    def _sweep_orphans(self, containers: Iterable[ContainerState]) -> None:
        now = self._clock.now()
        owned = set(self._by_container)
        starting = {j for j, s in self._slots.items() if s.phase in ("starting", "recovering")}
        for container in containers:
            if container.labels.get(MANAGED_LABEL) != "true" or container.id in owned:
                continue
            job_id = _job_label(container)
            if job_id is not None and job_id in starting:
                continue  # its Started is on the way
            if now - container.created_at < self._sup.orphan_grace_s:
                continue
            log.info("removing orphan container %s (job %s)", container.id, job_id or "?")
            assert self._reaper is not None
            self._reaper.tell(RemoveContainer(container.id, self._sup.stop_grace_s, "orphan"))

    def _recover(self, jobs: list[Job], containers: list[ContainerState] | None) -> None:
        """Take back the unfinished jobs of a previous run (or of a failed listing).

        ``containers`` None means the engine did not answer: starting and
        running jobs keep their slots ("recovering") until a listing does, so
        nothing starts twice and no limit is overshot meanwhile.
        """
        now = self._clock.now()
        by_id = {c.id: c for c in containers or ()}
        by_job: dict[str, ContainerState] = {}
        for c in containers or ():
            job_id = _job_label(c)
            if job_id is not None and (
                job_id not in by_job or c.created_at > by_job[job_id].created_at
            ):
                by_job[job_id] = c
        for job in jobs:
            if job.state.terminal:
                # Ended (cancelled, say) while its Spawner was being recovered:
                # its state stands; a container it left is stopped, not adopted.
                self._slots.pop(job.id, None)
                self._jobs.setdefault(job.id, job)
                leftover = by_job.get(job.id)
                if leftover is not None and self._reaper is not None:
                    self._reaper.tell(RemoveContainer(leftover.id, self._sup.stop_grace_s, "ended"))
                self._finish_job(job, job.state, error=job.error)
                continue
            if job.state is JobState.QUEUED:
                continue  # the store is the queue: it is claimed like any other
            self._jobs[job.id] = job
            if job.spec.env:
                SECRETS.remember(job.id, job.spec.env.values())
            if containers is None:
                self._slots[job.id] = _Slot(
                    job.id, job.spec, "recovering", recover_seq=self._list_seq
                )
                self._reconcile_requested = True
                continue
            if job.state is JobState.STARTING:
                container = by_job.get(job.id)
                if container is None or container.status == "created":
                    if container is not None and self._reaper is not None:
                        # Created but never started: it never ran, remove it.
                        self._reaper.tell(RemoveContainer(container.id, 0.0, "never started"))
                    note = self._recover_notes.pop(job.id, "recovered: it had not started")
                    self._requeue(job, note, backoff=False)
                    continue
            else:
                container = by_id.get(job.container_id or "")
                if container is None:
                    self._finish_vanished(job)
                    continue
            self._adopt(job, container, now)

    def _finish_vanished(self, job: Job) -> None:
        """A running job's container is gone after a restart: succeeded if it committed.

        A Spawner removes the container right after committing a clean exit;
        if the process died before the outcome was stored, the snapshot tells
        it. Jobs of one key never overlap, so a snapshot of this key made
        after this job started can only be this job's commit.
        """
        since = job.started_at or job.created_at
        committed = [s for s in self._registered_snapshots() if s.key == job.key]
        if any(s.created_at >= since for s in committed):
            self._finish_job(
                job,
                JobState.SUCCEEDED,
                exit_code=0,
                snapshot_committed=True,
                error=None,
            )
            self._log(job).info("recovered: it exited 0 and committed before the restart")
            return
        self._finish_job(
            job,
            JobState.FAILED,
            error="its container disappeared while Snapyard was down; the exit code is unknown",
        )

    def _registered_snapshots(self) -> list[Snapshot]:
        # Safe to ask: the SnapshotManager never asks anyone, so it cannot wait on us.
        try:
            found = self._snapshots.ask(ListSnapshots(), timeout=SNAPSHOTS_ASK_S)
        except (pykka.ActorDeadError, pykka.Timeout):
            return []
        return list(found) if isinstance(found, list) else []

    def _adopt(self, job: Job, container: ContainerState, now: float) -> None:
        self._recover_notes.pop(job.id, None)
        slot = _Slot(job.id, job.spec, "running", container_id=container.id)
        started_at = job.started_at or container.started_at or now
        slot.deadline = job.deadline or started_at + job_timeout(self._settings, job.spec)
        slot.running_seq = self._list_seq
        self._slots[job.id] = slot
        self._by_container[container.id] = job.id
        job = self._save(
            dataclasses.replace(
                job,
                state=JobState.RUNNING,
                container_id=container.id,
                image_id=job.image_id or container.image_id,
                started_at=started_at,
                deadline=slot.deadline,
            ),
            note="re-adopted after restart",
        )
        self._log(job).info("re-adopted container")
        if _has_exited(container):
            # Judged by when it exited, not when we came back to look.
            exited_at = container.finished_at if container.finished_at is not None else now
            if slot.deadline <= exited_at:
                slot.kill_state = JobState.TIMED_OUT
                slot.kill_note = (
                    f"timed out after {job_timeout(self._settings, job.spec):g}s "
                    "(it exited while Snapyard was down, past its deadline)"
                )
            self._on_exited(_exit_of(container))

    # --- supervision -------------------------------------------------------

    def _on_crashed(self, msg: ActorCrashed) -> None:
        if msg.name not in self._pool.refs:
            log.warning("crash report from unknown child %s: %s", msg.name, msg.error)
            return
        if msg.urn is not None and msg.urn != self._pool.refs[msg.name].actor_urn:
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
        old = self._pool.refs[msg.name]
        with contextlib.suppress(pykka.ActorDeadError):
            old.stop(block=False)
        try:
            self._pool.refs[msg.name] = self._spawner_factory(msg.name, self.actor_ref)
        except Exception as exc:
            self._give_up(f"could not restart {msg.name}: {exc}")
            return
        lost = self._pool.pending.pop(msg.name, {})
        self._pool.pending[msg.name] = {}
        for (job_id, kind), message in lost.items():
            self._recover_lost_op(job_id, kind, message, msg)
        self._dispatch()
        self._publish_metrics()

    def _recover_lost_op(
        self, job_id: str, kind: OpKind, message: Any, crash: ActorCrashed
    ) -> None:
        """A crashed Spawner's inbox is gone: redo, re-queue or fail what it held."""
        slot = self._slots.get(job_id)
        job = self._jobs.get(job_id)
        if slot is None or job is None:
            return
        guilty = crash.job_id == job_id or crash.job_id is None
        if guilty:
            self._crashes[job_id] += 1
        reason = f"{crash.name} crashed while handling it: {crash.error}"
        if guilty and self._crashes[job_id] >= MAX_CRASHES_PER_JOB:
            if kind == "spawn":
                del self._slots[job_id]
                # A cancel (or timeout) decided before the crash still stands.
                self._finish_job(
                    job, slot.kill_state or JobState.FAILED, error=slot.kill_note or reason
                )
            else:
                self._complete(slot, job, slot.exit_code, "", None, reason)
            return
        if kind == "spawn":
            # The Spawner may have started the container before it died: recover
            # the job as after a restart (adopt a container labelled with it,
            # else re-queue), so the work never runs twice.
            log.warning("job %s: %s; looking for its container", job_id, reason)
            self._slots[job_id] = _Slot(job_id, job.spec, "recovering", recover_seq=self._list_seq)
            self._recover_notes[job_id] = f"retrying: {reason}"
            self._request_listing("recover")
        else:
            self._send_any(job_id, kind, lambda: message)

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

    # --- helpers -----------------------------------------------------------

    def _requeue(self, job: Job, note: str, *, backoff: bool) -> None:
        """Back to the store's queue; with ``backoff`` it is not claimed before its retry_at."""
        retry_at = None
        if backoff:
            n = self._retries.get(job.id, 0)
            self._retries[job.id] = n + 1
            retry = self._settings.retry
            # Capped exponent: days of outage must not overflow a float.
            delay = min(retry.backoff_max_s, retry.backoff_initial_s * (2 ** min(n, 32)))
            retry_at = self._clock.now() + delay
        self._save(
            dataclasses.replace(job, state=JobState.QUEUED, container_id=None, retry_at=retry_at),
            note=note,
        )

    def _release(self, slot: _Slot) -> None:
        self._slots.pop(slot.job_id, None)
        if slot.container_id is not None:
            self._by_container.pop(slot.container_id, None)

    def _finish_job(self, job: Job, state: JobState, **changes: Any) -> Job:
        job = self._save(
            dataclasses.replace(job, state=state, finished_at=self._clock.now(), **changes),
            note=changes.get("error"),
        )
        self._jobs.pop(job.id, None)
        self._retries.pop(job.id, None)
        self._crashes.pop(job.id, None)
        self._refusals.pop(job.id, None)
        self._recover_notes.pop(job.id, None)
        SECRETS.forget(job.id)
        self._log(job).info("job %s", state.value)
        return job

    def _save(self, job: Job, note: str | None = None) -> Job:
        """Write the job; it holds its key in the store exactly as long as it holds a slot.

        A job cancelled while it runs is final for its caller, but its key is
        taken until the container is gone.
        """
        previous = self._jobs.get(job.id)
        in_flight = job.id in self._slots
        self._store.update(job, note=note, holds_key=in_flight)
        if previous is not None:
            self._count(previous.state, job.state)
        if in_flight:
            self._jobs[job.id] = job
        else:
            self._jobs.pop(job.id, None)
        return job

    def _count(self, old: JobState | None, new: JobState) -> None:
        if old == new:
            return
        if old is not None:
            self._state_counts[old] = self._state_counts.get(old, 0) - 1
        self._state_counts[new] = self._state_counts.get(new, 0) + 1

    def _publish_metrics(self) -> None:
        for state in JobState:
            METRICS.set("snapyard_jobs", self._state_counts.get(state, 0), state=state.value)
        running = sum(1 for s in self._slots.values() if s.container_id is not None)
        METRICS.set("snapyard_running_workers", running)

    def _status(self) -> SupervisorStatus:
        return SupervisorStatus(
            queued=self._state_counts.get(JobState.QUEUED, 0),
            in_flight=len(self._slots),
            running=sum(1 for s in self._slots.values() if s.phase == "running"),
            pending_ops=self._pool.load(),
            spawners=len(self._pool.refs),
            dispatching=self._dispatching,
        )

    def _log(self, job: Job) -> logging.LoggerAdapter[logging.Logger]:
        return job_log(
            log, job.id, job.spec.project, job.spec.work_item, job.container_id, job.image_id
        )


def _has_exited(container: ContainerState) -> bool:
    return container.status in ("exited", "dead")


def _exit_of(container: ContainerState) -> ContainerExited:
    # An unknown exit code is never 0: it must not pass for success (or commit).
    code = container.exit_code if container.exit_code is not None else -1
    return ContainerExited(container.id, code, container.oom_killed)


def _job_label(container: ContainerState) -> str | None:
    for name in JOB_LABELS:
        value = container.labels.get(name)
        if value:
            return value
    return None
