"""The application: wires the actors together, starts them in dependency order
and stops them in reverse (as Mopidy does), and offers one small facade that
the HTTP API and the CLI use. ``snapyard run``'s process life (signals, exit
codes) is ``actors.run``.

Start order: engine check -> worker image -> job store -> the actors, started
by ``actors.wiring.start_actors`` (Root -> SnapshotManager -> Reaper ->
Supervisor -> Watcher -> timers). Stop order is the reverse. Stopping never
kills a running worker: its container keeps running and the next start
re-adopts it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import pykka
from prometheus_client import CollectorRegistry

from actors.clock import Clock, SystemClock
from actors.cluster.member import (
    cluster_snapshots,
    cluster_wiring,
    held_elsewhere,
    open_cluster_store,
    runs_elsewhere,
)
from actors.engine.base import Engine, EngineError
from actors.engine.docker import DockerEngine
from actors.instance import resolve_instance_id
from actors.messages import (
    Cancel,
    GetJob,
    GetStatus,
    ListJobs,
    ListSnapshots,
    PruneJobs,
    RemoveSnapshot,
    StopDispatching,
    Submit,
    SupervisorStatus,
    SweepSnapshots,
)
from actors.metrics import MeteredEngine, Metrics
from actors.model import Job, JobSpec, JobState, Snapshot, SnapshotKey
from actors.private_files import loose_permissions
from actors.settings import Settings
from actors.store import JobStore, SqliteStore, StoreError
from actors.store.cluster import ClusterStore, HostInfo
from actors.supervisor import SupervisorStopped
from actors.telemetry import (
    Secrets,
    flush_sentry,
)
from actors.watcher import Watcher
from actors.wiring import Actors, Wiring, start_actors
from actors.worker_image import WorkerImageError, ensure_worker_images

__all__ = ["Snapyard", "SnapyardError"]

log = logging.getLogger(__name__)

# How long a facade call waits for an actor's answer before giving up.
ASK_TIMEOUT_S = 30.0
_WAIT_POLL_S = 0.05


class SnapyardError(RuntimeError):
    """Snapyard cannot start (or go on): the message says what to fix."""


class Snapyard:
    """The running supervisor and its facade: ``start()``, ``submit()``, ``stop()``."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine | None = None,
        clock: Clock | None = None,
        store: JobStore | None = None,
        *,
        container_labels: Mapping[str, str] | None = None,
    ) -> None:
        """``engine``/``clock``/``store`` default to Docker, real time and the
        store under ``settings.data_dir``; ``container_labels`` are stamped on
        every worker container (tests mark theirs with their session ID)."""
        self.settings = settings
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.secrets = Secrets()
        self.clock: Clock = clock or SystemClock()
        self._engine = engine
        self._store = store
        self._owns_store = store is None
        self._container_labels = dict(container_labels or {})
        self.snapshots_ref: pykka.ActorRef[Any] | None = None
        self.supervisor_ref: pykka.ActorRef[Any] | None = None
        self.watcher: Watcher | None = None
        self._actors: Actors | None = None
        self.base_image_id: str | None = None
        self.base_image_ids: dict[str, str] = {}  # every configured image's ID
        self._accepting = False
        self._started = False
        self._fatal: str | None = None
        self.stopped = threading.Event()
        # Set when the Supervisor gives up; run_forever waits on it too.
        self.failed = threading.Event()

    # --- life cycle --------------------------------------------------------

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise SnapyardError("Snapyard is not started")
        return self._engine

    @property
    def store(self) -> JobStore:
        if self._store is None:
            raise SnapyardError("Snapyard is not started")
        return self._store

    def start(self) -> Snapyard:
        if self._started:
            return self
        settings = self.settings = resolve_instance_id(self.settings)
        engine = self._engine
        if engine is None:
            engine = DockerEngine(
                settings.engine.url,
                settings.engine.timeout_s,
                secrets_dir=str(settings.data_dir / "secrets"),
                helper_dir=str(settings.data_dir / "helper"),  # the env helper
            )
        if not isinstance(engine, MeteredEngine):
            # The one place engine errors are counted: every call goes through it.
            engine = MeteredEngine(engine, self.metrics)
        self._engine = engine
        try:
            engine.ping()
        except EngineError as exc:
            raise SnapyardError(
                f"cannot reach the container engine at {engine.describe()}: {exc}. "
                "Start it (make engine, or config/engine.sh) or set engine.url / DOCKER_HOST."
            ) from exc
        # Every configured image, worker.image and each agent type's (issue 13):
        # the demo image built if needed, a user's used as is, a missing one fatal.
        try:
            self.base_image_ids = ensure_worker_images(engine, settings.worker_images())
        except WorkerImageError as exc:
            raise SnapyardError(str(exc)) from exc
        except EngineError as exc:
            raise SnapyardError(f"cannot prepare the worker images: {exc}") from exc
        self.base_image_id = self.base_image_ids[settings.worker.image]
        if self._store is None and settings.cluster.enabled:
            try:
                self._store = open_cluster_store(settings, self.clock)
            except StoreError as exc:
                raise SnapyardError(str(exc)) from exc
        if self._store is None:
            if (problem := loose_permissions(settings.data_dir)) is not None:
                log.warning("%s; run `chmod -R go= %s`", problem, settings.data_dir)
            self._store = SqliteStore(settings.store_path, self.clock)
        try:
            self._start_actors(engine, self._store)
        except BaseException as exc:
            self._stop_actors(timeout_s=settings.supervisor.shutdown_timeout_s)
            if isinstance(exc, StoreError):  # e.g. the cluster database, at the first lease
                raise SnapyardError(str(exc)) from exc
            raise
        self._started = True
        self._accepting = True
        self.stopped.clear()
        log.info("snapyard started on %s", engine.describe())
        return self

    def _start_actors(self, engine: Engine, store: JobStore) -> None:
        self._actors = start_actors(
            Wiring(
                engine,
                store,
                self.settings,
                self.clock,
                container_labels=self._container_labels,
                on_fatal=self._on_fatal,
                base_image_ids=self.base_image_ids,
                metrics=self.metrics,
                secrets=self.secrets,
                cluster=cluster_wiring(self.settings, store, engine)
                if self.settings.cluster.enabled
                else None,
            )
        )
        self.snapshots_ref = self._actors.snapshots
        self.supervisor_ref = supervisor = self._actors.supervisor
        self.watcher = self._actors.watcher
        assert supervisor is not None
        try:
            supervisor.ask(GetStatus(), block=True, timeout=ASK_TIMEOUT_S)
        except pykka.ActorDeadError as exc:
            raise SnapyardError(
                "the supervisor failed to start (recovery of unfinished jobs failed); see the log"
            ) from exc

    def stop(self, drain: bool = False, timeout_s: float | None = None) -> None:
        """Stop intake, then the timers, the Watcher and the actors, in reverse order.

        Running containers are left running (the next start re-adopts them);
        with ``drain`` the call first waits for the jobs in flight to end (for
        ``timeout_s``, or as long as they take when it is None). Queued jobs
        stay queued in the store either way. Stopping the actors then takes at
        most ``shutdown_timeout_s``.
        """
        if not self._started:
            return
        limit = self.settings.supervisor.shutdown_timeout_s
        wait_s = timeout_s if timeout_s is not None else (math.inf if drain else limit)
        deadline = time.monotonic() + wait_s
        self._accepting = False
        if isinstance(self._store, ClusterStore):
            # Others stop waiting for this host's snapshots (locality) at once.
            with contextlib.suppress(StoreError):
                self._store.drain(True)
        supervisor = self.supervisor_ref
        if supervisor is not None and supervisor.is_alive():
            try:
                supervisor.tell(StopDispatching())
                # Let Spawners finish what they hold (a start, a commit) while the
                # Supervisor can still record it; with drain, wait for every job.
                self._wait_settled(drain, deadline)
            except (pykka.ActorDeadError, pykka.Timeout):
                pass  # dead or wedged: stop what can be stopped, within the limit
        if math.isinf(wait_s):
            deadline = time.monotonic() + limit
        self._stop_actors(timeout_s=max(1.0, deadline - time.monotonic()))
        # Before the store closes: a read from then on is "stopped", not a closed database.
        self._started = False
        if self._owns_store and self._store is not None:
            self._store.close()
        flush_sentry(min(2.0, max(0.1, deadline - time.monotonic())))
        self.stopped.set()
        log.info("snapyard stopped")

    def _wait_settled(self, drain: bool, deadline: float) -> None:
        while time.monotonic() < deadline:
            status = self.status()
            if drain and status.in_flight == 0:
                return
            if not drain and status.pending_ops == 0:
                return
            time.sleep(_WAIT_POLL_S)
        log.warning(
            "shutdown: %s did not settle in time; stopping anyway", "drain" if drain else ""
        )

    def _stop_actors(self, timeout_s: float) -> None:
        if self._actors is not None:
            self._actors.stop(timeout_s)
            self._actors = None
        self.watcher = None
        self.supervisor_ref = None
        self.snapshots_ref = None

    def _on_fatal(self, reason: str) -> None:
        self._fatal = reason
        self._accepting = False
        self.failed.set()

    def __enter__(self) -> Snapyard:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- facade ------------------------------------------------------------

    def _supervisor(self) -> pykka.ActorRef[Any]:
        ref = self.supervisor_ref
        if ref is None or not ref.is_alive():
            raise SupervisorStopped(self._fatal or "Snapyard is not running")
        return ref

    def _snapshots(self) -> pykka.ActorRef[Any]:
        ref = self.snapshots_ref
        if ref is None:
            raise SupervisorStopped("Snapyard is not running")
        return ref

    def submit(self, spec: JobSpec) -> Job:
        """Queue a validated job; it is on disk when this returns."""
        if not self._accepting:
            raise SupervisorStopped(self._fatal or "Snapyard is not accepting jobs (stopped)")
        job: Job = self._supervisor().ask(Submit(spec), block=True, timeout=ASK_TIMEOUT_S)
        return job

    def get(self, job_id: str) -> Job | None:
        ref = self.supervisor_ref
        if ref is None or not ref.is_alive():
            # Read-only questions still have an answer while the store is open;
            # once stopped, "stopped" (503), never "no such job" (404).
            if self._store is not None and self._started:
                return self._store.get(job_id)
            raise SupervisorStopped(self._fatal or "Snapyard is not running")
        job: Job | None = ref.ask(GetJob(job_id), block=True, timeout=ASK_TIMEOUT_S)
        return job

    def jobs(
        self, state: JobState | None = None, project: str | None = None, limit: int = 100
    ) -> list[Job]:
        jobs: list[Job] = self._supervisor().ask(
            ListJobs(state=state, project=project, limit=limit), block=True, timeout=ASK_TIMEOUT_S
        )
        return jobs

    def cancel(self, job_id: str) -> Job | None:
        """Raises ``RunsElsewhere`` when another cluster host runs the job."""
        job: Job | None = self._supervisor().ask(Cancel(job_id), block=True, timeout=ASK_TIMEOUT_S)
        store = self._store
        if job is not None and isinstance(store, ClusterStore):
            refusal = runs_elsewhere(job, store.host_id, store.hosts())
            if refusal is not None:
                raise refusal
        return job

    def snapshots(self) -> list[Snapshot]:
        snaps: list[Snapshot] = self._snapshots().ask(
            ListSnapshots(), block=True, timeout=ASK_TIMEOUT_S
        )
        store = self._store  # a cluster's: this host's, then the index's newest elsewhere
        return cluster_snapshots(snaps, store) if isinstance(store, ClusterStore) else snaps

    def remove_snapshot(self, key: SnapshotKey) -> bool:
        """Remove this host's snapshot of ``key``; one another host holds raises
        ``SnapshotElsewhere``, which names that host and how to remove it there."""
        removed: bool = self._snapshots().ask(
            RemoveSnapshot(key), block=True, timeout=ASK_TIMEOUT_S
        )
        store = self._store
        if not removed and isinstance(store, ClusterStore):
            elsewhere = held_elsewhere(store, key)
            if elsewhere is not None:
                raise elsewhere
        return removed

    def prune_snapshots(self) -> list[Snapshot]:
        """Run eviction now; return the entries it removed."""
        ref = self._snapshots()
        before = ref.ask(ListSnapshots(), block=True, timeout=ASK_TIMEOUT_S)
        ref.ask(SweepSnapshots(), block=True, timeout=ASK_TIMEOUT_S)
        after = {
            (s.key, s.image_id) for s in ref.ask(ListSnapshots(), block=True, timeout=ASK_TIMEOUT_S)
        }
        return [s for s in before if (s.key, s.image_id) not in after]

    def prune_jobs(self) -> int:
        """Retention now: delete finished jobs older than ``supervisor.retention_s``."""
        deleted: int = self._supervisor().ask(PruneJobs(), block=True, timeout=ASK_TIMEOUT_S)
        return deleted

    def hosts(self) -> list[HostInfo]:
        """The cluster's hosts and leases, from the shared store ([] on a single host)."""
        store = self._store
        return store.hosts() if isinstance(store, ClusterStore) else []

    def status(self) -> SupervisorStatus:
        status: SupervisorStatus = self._supervisor().ask(
            GetStatus(), block=True, timeout=ASK_TIMEOUT_S
        )
        return status

    def health(self) -> tuple[bool, str]:
        """(ok, reason): the supervisor answers, the Watcher follows events, the engine pings."""
        if self._fatal is not None:
            return False, f"supervisor stopped: {self._fatal}"
        if not self._started:
            return False, "not started"
        try:
            status = self.status()
        except (pykka.ActorDeadError, pykka.Timeout) as exc:
            return False, f"supervisor not answering: {exc or type(exc).__name__}"
        if status.fenced:
            return False, "fenced: this host cannot renew its cluster lease (see its log)"
        if self.watcher is None or not self.watcher.alive:
            return False, "the event watcher is not running"
        try:
            self.engine.ping()
        except EngineError as exc:
            return False, f"engine unreachable at {self.engine.describe()}: {exc}"
        return True, (
            f"ok: {status.running} running, {status.in_flight} in flight, {status.queued} queued"
        )

    def wait(self, job_id: str, timeout_s: float) -> Job:
        """Block until the job is terminal; TimeoutError after ``timeout_s`` (real time)."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get(job_id)
            if job is None:
                raise KeyError(job_id)
            if job.state.terminal:
                return job
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job.state} after {timeout_s:g}s")
            time.sleep(_WAIT_POLL_S)
