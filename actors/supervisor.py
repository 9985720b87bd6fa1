"""Supervisor actor: a job's life from submit to its container gone, top-down.

The store is the queue (``JobStore.claim`` applies the admission rules); the
Supervisor holds only what it must: one ``Flight`` per job in flight, the
Spawner pool, and its timers. It decides; others act: Spawners make the
Docker calls (create, commit, stop), the Reaper lists and removes containers,
the Watcher reports exits. So its inbox never waits on the engine, and it
never ``ask``s anything that could ask it back.

Every state change is written to the store before anyone is told about it,
which is what makes a restart lossless (see ``actors.recovery``).

One job, in the order of this file: ``_submit`` -> ``_dispatch`` (claim) ->
Spawn -> ``_on_started`` -> ``_on_exited`` (the commit decision,
``flight.on_exit``) -> Finish -> ``_on_finished`` -> ``_complete``. What
listings and crashed Spawners tell it is handled in ``actors.reconcile``;
each state write goes through ``actors.ledger``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import pykka

from actors.backoff import backoff
from actors.clock import Clock
from actors.deadlines import tick_action
from actors.engine.base import ContainerState, Engine, EngineError
from actors.fencing import NOT_HANDLED, Fencing
from actors.flight import EarlyExits, Flight, Flights, Kill, job_timeout, on_exit, outcome
from actors.labels import MANAGED_FILTER
from actors.ledger import Ledger, job_logger
from actors.messages import (
    ActorCrashed,
    Cancel,
    ContainerExited,
    ContainersListed,
    Finish,
    Finished,
    GetJob,
    GetStatus,
    ListJobs,
    PruneJobs,
    Reconcile,
    Spawn,
    SpawnFailed,
    Started,
    StopDispatching,
    Submit,
    SweepOrphans,
    Terminate,
    Terminated,
    Tick,
)
from actors.metrics import Metrics
from actors.model import InvalidJob, Job, JobSpec, JobState, SnapshotKey
from actors.outage import StoreOutage
from actors.pool import SpawnerFactory, SpawnerPool
from actors.reconcile import SupervisorStopped
from actors.restarts import RestartIntensity
from actors.settings import Settings
from actors.store import Caps, JobStore, new_job_id
from actors.telemetry import Secrets, capture_error

__all__ = ["SpawnerFactory", "Supervisor", "SupervisorStopped", "job_timeout"]

log = logging.getLogger(__name__)

# Re-queues of a job whose start the daemon answered with a 5xx each time.
MAX_REFUSED_STARTS = 10
_ASKS = (Submit, Cancel, GetJob, ListJobs, GetStatus, PruneJobs)


class Supervisor(Fencing, pykka.ThreadingActor):
    """Runs queued jobs within the limits, one per (project, work item) at a time."""

    def __init__(
        self,
        engine: Engine,
        store: JobStore,
        settings: Settings,
        clock: Clock,
        snapshots: pykka.ActorRef[Any],
        reaper: pykka.ActorRef[Any],
        spawner_factory: SpawnerFactory,
        on_fatal: Callable[[str], None] | None = None,
        *,
        metrics: Metrics | None = None,
        secrets: Secrets | None = None,
    ) -> None:
        """The Spawners are its children (it restarts them); the SnapshotManager
        and the Reaper are its siblings, started before it (``actors.wiring``).
        ``metrics`` and ``secrets`` are the app's; None gives private ones that
        nothing scrapes or scrubs with (tests that do not look at them)."""
        super().__init__()
        self._metrics = metrics if metrics is not None else Metrics.unscraped()
        self._engine = engine
        self._store = store
        self._settings = settings
        self._sup = settings.supervisor
        self._clock = clock
        self._snapshots = snapshots
        self._on_fatal = on_fatal
        self._caps = Caps.from_settings(settings)
        self._pool = SpawnerPool(spawner_factory, self._sup.spawners)
        self._reaper: pykka.ActorRef[Any] | None = reaper
        self._flights = Flights()
        self._ledger = Ledger(
            store,
            clock,
            self._flights,
            backoff(settings.retry),
            self._metrics,
            secrets if secrets is not None else Secrets(),
            on_fenced=self._dropped,
        )
        # Running containers labelled ours that no job in flight owns, e.g. a
        # cancel whose stop never reached a down engine, then a restart. Until
        # they are gone they hold their key and a worker place.
        self._leftovers: dict[str, SnapshotKey] = {}
        self._restarts = RestartIntensity(self._sup.restart_max, self._sup.restart_window_s)
        self._early_exits = EarlyExits()
        self._list_seq = 0
        self._reconcile_requested = False
        self._dispatching = True
        self._fatal: str | None = None
        self._fenced, self._abandoned, self._resync, self._redo = False, set(), False, []
        self._outage = StoreOutage("supervisor", log)
        self._superseded: set[str] = set()  # containers removed as superseded (warned once)

    # --- life cycle --------------------------------------------------------

    def on_start(self) -> None:
        self._pool.start(self.actor_ref)
        self._ledger.load()
        # Start-up reconciliation may list containers before the first message
        # (the one Docker call the Supervisor makes itself): recovery must see
        # the engine's truth before it dispatches anything.
        containers: list[ContainerState] | None
        try:
            containers = self._mine(self._engine.list_containers(MANAGED_FILTER))
        except EngineError as exc:
            log.warning("engine unreachable at start-up (%s); recovery waits for it", exc)
            containers = None
        with self._store.batch():
            self._recover(self._store.unfinished(), containers)
            if containers is not None:
                self._remove_superseded(containers)
                self._note_leftovers(containers)
            self._after_change()

    def on_stop(self) -> None:
        # Detach, do not kill: running containers keep running and are
        # re-adopted by the next start. Children stop after their inboxes.
        futures = self._pool.stop()
        deadline = time.monotonic() + self._sup.shutdown_timeout_s
        for future in futures:
            with contextlib.suppress(pykka.Timeout, pykka.ActorDeadError):
                future.get(timeout=max(0.0, deadline - time.monotonic()))
        self._metrics.running_workers.set(0)

    def on_receive(self, message: Any) -> Any:
        if self._fatal is not None:
            if isinstance(message, _ASKS):
                raise SupervisorStopped(self._fatal)
            return None
        if (answer := self._outside_store(message)) is not NOT_HANDLED:
            return answer  # the database may be cut off (actors.fencing)
        handled = False
        try:
            # One transaction per message: its state writes share one fsync,
            # and it commits before an ask's reply leaves this handler.
            with self._store.batch():
                handled = True
                answer = self._handle(message)
        except InvalidJob:
            raise
        except Exception as exc:
            self._store_lost(exc, message, handled)
            if isinstance(message, _ASKS):
                raise  # the asker reports it (the API: 503 for a store away)
            if self._outage.lost(exc):
                return None  # expected in a cluster: said once (actors.outage)
            # A tell handler that raises stops a pykka actor: log, report, go on.
            log.exception("supervisor: handling %s failed", type(message).__name__)
            capture_error(exc, source="supervisor", extras={"message": type(message).__name__})
            return None
        self._outage.answered()
        return answer

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
            case GetStatus(deadlines=deadlines):
                return self._status(deadlines)
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
            case PruneJobs():
                return self._ledger.prune(self._clock.now() - self._sup.retention_s)
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
            case _ if not self._handle_cluster(message):
                log.warning("supervisor: unexpected message %r", message)
        return None

    # --- one job's life ------------------------------------------------------

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
        self._ledger.added(job, note="submitted")
        job_logger(job).info("job queued")
        self._after_change()
        return job

    def _dispatch(self) -> None:
        """Ask the store for as many jobs as there are free worker places, and start them.

        The store applies the admission rules (see ``JobStore.claim``); the
        Supervisor adds only what it alone knows: its free places, and the
        keys of running containers no job owns (leftovers of a previous run).
        """
        if not self._dispatching or self._fenced or self._resync or not self._pool.refs:
            return
        free = self._sup.max_workers - len(self._flights) - len(self._leftovers)
        if free <= 0:
            return
        blocked = set(self._leftovers.values())
        now = self._clock.now()
        for job in self._store.claim(free, now, self._caps, blocked=blocked, note="claimed"):
            self._ledger.claimed(job)
            self._flights.add(Flight(job, "starting"))
            snapshots_on = self._settings.snapshots_enabled_for(job.spec.project)
            self._send(
                job.id, "spawn", Spawn(job.id, job.spec, snapshots_on, self.actor_ref, job.attempt)
            )

    def _on_started(self, msg: Started) -> None:
        self._pool.done(msg.spawner, msg.job_id, "spawn")
        flight = self._flights.get(msg.job_id)
        if flight is None or flight.phase != "starting":
            self._started_unknown(msg)  # not ours any more
            return
        now = self._clock.now()
        flight.phase, flight.seq = "running", self._list_seq
        flight.deadline = now + job_timeout(self._settings, flight.spec)
        self._flights.attach(flight, msg.container_id)
        self._ledger.strikes(msg.job_id).requeues = 0
        cancelled = flight.kill is not None and flight.kill.state is JobState.CANCELLED
        job = flight.job
        job = self._ledger.save(
            dataclasses.replace(
                job,
                state=JobState.CANCELLED if cancelled else JobState.RUNNING,
                container_id=msg.container_id,
                image_id=msg.image_id,
                from_snapshot=msg.from_snapshot,
                attempts=msg.attempts,
                started_at=now,
                deadline=flight.deadline,
                error=job.error if cancelled else None,
            ),
            note=f"{msg.spawner}; from {'snapshot' if msg.from_snapshot else 'base image'}",
        )
        job_logger(job).info("job running")
        if flight.kill is not None:
            self._terminate(flight)
        if (early := self._early_exits.take(msg.container_id)) is not None:
            self._on_exited(early)
        self._ledger.publish()

    def _on_spawn_failed(self, msg: SpawnFailed) -> None:
        self._pool.done(msg.spawner, msg.job_id, "spawn")
        flight = self._flights.get(msg.job_id)
        if flight is None or flight.phase != "starting":
            return
        self._flights.remove(msg.job_id)
        job, strikes = flight.job, self._ledger.strikes(msg.job_id)
        if flight.kill is not None and flight.kill.state is JobState.CANCELLED:
            self._ledger.finish(job, JobState.CANCELLED, error=job.error)
        elif msg.retryable and msg.answered and strikes.refusals >= MAX_REFUSED_STARTS:
            # Unreachable, a job waits for as long as it takes; a daemon that
            # answers but keeps refusing this start would otherwise hold it forever.
            error = f"the engine refused to start it {MAX_REFUSED_STARTS + 1} times: {msg.error}"
            self._ledger.finish(job, JobState.FAILED, error=error)
        elif msg.retryable:
            # Only refusals in a row count: an unreachable daemon resets them.
            strikes.refusals = strikes.refusals + 1 if msg.answered else 0
            self._ledger.requeue(job, f"will retry: {msg.error}", backoff=True)
        else:
            self._ledger.finish(job, JobState.FAILED, error=msg.error)
        self._after_change()

    def _on_exited(self, msg: ContainerExited) -> None:
        flight = self._flights.of_container(msg.container_id)
        if flight is None and self._leftovers.pop(msg.container_id, None) is not None:
            self._dispatch()  # its key and its worker place are free again
            return
        if flight is None:
            # Maybe its Started is still on the way; else an orphan (the sweep's).
            self._early_exits.keep(msg, self._clock.now())
            return
        if flight.phase == "finishing":
            return  # a duplicate: the first exit already started the finish
        commit = on_exit(flight, msg, self._settings.snapshots_enabled_for(flight.spec.project))
        message = Finish(
            flight.id, flight.spec, msg.container_id, msg.exit_code, commit, self.actor_ref
        )
        self._send(flight.id, "finish", message)

    def _on_finished(self, msg: Finished) -> None:
        self._pool.done(msg.spawner, msg.job_id, "finish")
        flight = self._flights.get(msg.job_id)
        if flight is not None:
            self._complete(flight, msg.exit_code, msg.logs_tail, msg.snapshot_image_id, msg.error)

    def _complete(
        self,
        flight: Flight,
        exit_code: int | None,
        logs_tail: str,
        snapshot_image_id: str | None,
        error: str | None,
    ) -> None:
        """The container is gone: record the outcome, free the place, start the next."""
        state, error = outcome(flight, exit_code, error)
        self._flights.remove(flight.id)
        self._ledger.finish(
            flight.job,
            state,
            error=error,
            exit_code=exit_code,
            logs_tail=logs_tail,
            snapshot_committed=snapshot_image_id is not None,
        )
        self._after_change()

    # --- cancel, timeouts, stopping ------------------------------------------

    def _cancel(self, job_id: str) -> Job | None:
        flight = self._flights.get(job_id)
        if flight is None:
            stored = self._store.get(job_id)
            if stored is None or stored.state is not JobState.QUEUED:
                self._hand_over_cancel(stored)  # another cluster host runs it
                return stored  # unknown (None), already finished, or handed over
            job = self._ledger.finish(
                stored, JobState.CANCELLED, error="cancelled before it started"
            )
            # A job backing off holds its key's later jobs: they may start now, not at a Tick.
            self._dispatch()
            return job
        if flight.phase in ("finishing", "recovering") or flight.kill is not None:
            # Already exited, already being stopped, or not yet re-adopted (the
            # engine is unreachable): nothing to stop yet, so nothing changes.
            return flight.job
        flight.kill = Kill(JobState.CANCELLED, "cancelled while running")
        # Cancelled is final from the caller's point of view; the place stays
        # taken until the container is stopped and removed.
        job = self._ledger.save(
            dataclasses.replace(flight.job, state=JobState.CANCELLED, error=flight.kill.note),
            note="cancel requested",
        )
        if flight.phase == "running":
            self._terminate(flight)
        return job

    def _on_tick(self, now: float) -> None:
        self._catch_up()
        self._cancels_from_elsewhere()  # a lost NOTIFY costs one Tick
        for flight in self._flights.in_phase("running"):
            match tick_action(flight, now, self._sup.stop_grace_s):
                case "time_out":
                    limit = job_timeout(self._settings, flight.spec)
                    flight.kill = Kill(JobState.TIMED_OUT, f"timed out after {limit:g}s")
                    job_logger(flight.job).warning("job timed out; stopping its container")
                    self._terminate(flight)
                case "stop_again":
                    self._terminate(flight)
        self._early_exits.expire(now)
        if self._reconcile_requested:
            self._request_listing("recover")
        self._after_change()

    def _terminate(self, flight: Flight) -> None:
        if flight.stop_pending or flight.container_id is None:
            return
        flight.stop_pending = True
        grace = self._sup.stop_grace_s
        message = Terminate(flight.id, flight.container_id, grace, self.actor_ref)
        self._send(flight.id, "terminate", message)

    def _on_terminated(self, msg: Terminated) -> None:
        self._pool.done(msg.spawner, msg.job_id, "terminate")
        flight = self._flights.get(msg.job_id)
        if flight is not None and flight.phase == "running":
            # The container is stopped; its exit normally reaches us from the
            # Watcher. Ask the engine too, so a lost event cannot strand the job.
            # If the stop itself failed (engine down), a later Tick sends it again.
            flight.stop_pending = False
            flight.stopped_at = self._clock.now()
            self._request_listing("terminated")

    # --- helpers -----------------------------------------------------------

    def _after_change(self) -> None:
        """Places may have freed up: claim more work; then publish the gauges."""
        self._dispatch()
        self._ledger.publish()
