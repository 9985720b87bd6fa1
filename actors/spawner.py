"""The Spawner actor: starts a job's container, and commits it when it ends well.

Spawners make the slow Docker calls (create, start, commit, stop), so the
Supervisor keeps a pool of them and the SnapshotManager makes none of these.
Every failure a job can cause is caught per message and answered with a reply
(``SpawnFailed``, ``Finished(error=...)``): one bad job never stops a Spawner.
Anything else is a bug; it crashes the actor and ``on_failure`` tells the
parent, which restarts it and learns which job was in flight.

The incident this module exists for: a registry entry pointing at a deleted
snapshot image. Create then answers 404; the Spawner invalidates that entry
(by image ID, so a newer snapshot survives) and retries on the base image,
under the same retry budget, limits and labels, so the job simply runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import pykka
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
)
from tenacity.wait import wait_base

from actors.backoff import backoff
from actors.clock import Clock
from actors.engine.base import (
    ContainerMissing,
    Engine,
    EngineError,
    EngineUnavailable,
    ImageMissing,
)
from actors.labels import LABEL_INSTANCE, LABEL_JOB_ID
from actors.lineage import BaseImageMissing, StaleSnapshot, start_image
from actors.masking import mask_secrets
from actors.messages import (
    ActorCrashed,
    Finish,
    Finished,
    Invalidate,
    Lookup,
    Register,
    SetBaseImage,
    Spawn,
    SpawnFailed,
    Started,
    Terminate,
    Terminated,
)
from actors.metrics import Metrics
from actors.model import JobSpec, Snapshot, SnapshotKey
from actors.settings import Settings
from actors.snapshotter import Snapshotter
from actors.telemetry import capture_error, job_log
from actors.worker_spec import worker_container_spec

__all__ = [
    "BaseImageMissing",
    "Spawner",
    "StaleSnapshot",
]

log = logging.getLogger(__name__)

LOGS_TAIL_LINES = 200
# A Lookup is an in-memory read; if the manager does not answer in this
# long it is dead or wedged, and a base-image start beats a stuck job.
LOOKUP_TIMEOUT_S = 30.0

T = TypeVar("T")
# (key, the local entry, the job's base image ID) -> the snapshot to start from
# (``actors.cluster.shipping.RemoteSnapshots.fetch``: pulls a newer one from elsewhere).
RemoteLookup = Callable[[SnapshotKey, Snapshot | None, str | None], Snapshot | None]


@dataclass
class _Plan:
    """What one Spawn has learned so far; the retry loop reads and updates it."""

    snapshots_enabled: bool
    # The job's agent type's base image reference (worker.image or its override).
    base_image: str
    attempts: int = 0
    looked_up: bool = False
    snapshot: Snapshot | None = None
    stale_image_id: str | None = None


@dataclass(frozen=True)
class _Launched:
    container_id: str
    image_id: str
    from_snapshot: bool


class Spawner(pykka.ThreadingActor):
    """Creates, starts, commits, stops and removes worker containers, one job at a time."""

    def __init__(
        self,
        engine: Engine,
        snapshots: pykka.ActorRef[Any],
        settings: Settings,
        clock: Clock,
        name: str,
        supervisor: pykka.ActorRef[Any] | None = None,
        labels: Mapping[str, str] | None = None,
        *,
        metrics: Metrics | None = None,
        remote: RemoteLookup | None = None,
    ) -> None:
        """``labels`` are stamped on every container (and so every snapshot), e.g. for
        tests; ``metrics`` is the app's (None: a private registry nobody scrapes);
        ``remote`` is a cluster host's second opinion on each Lookup (a pull)."""
        self._remote = remote
        super().__init__()
        self._metrics = metrics if metrics is not None else Metrics.unscraped()
        self._engine = engine
        self._snapshots = snapshots
        self._settings = settings
        self._clock = clock
        self.name = name
        self._supervisor = supervisor
        self._extra_labels = dict(labels or {})
        # Each base image reference's ID as last resolved, to tell the manager of a change.
        self._base_ids: dict[str, str] = {}
        self._job_id: str | None = None
        self._snapshotter = Snapshotter(
            engine, settings, clock, self._patiently, self._resolve_base
        )

    def on_receive(self, message: Any) -> Any:
        match message:
            case Spawn():
                self._job_id = message.job_id
                self._spawn(message)
            case Finish():
                self._job_id = message.job_id
                self._finish(message)
            case Terminate():
                self._job_id = message.job_id
                self._terminate(message)
            case _:
                return super().on_receive(message)
        self._job_id = None
        return None

    def on_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exception_value is not None:
            capture_error(
                exception_value,
                source="spawner",
                extras={"job_id": self._job_id, "spawner": self.name},
            )
        if self._supervisor is not None:
            self._supervisor.tell(
                ActorCrashed(
                    name=self.name,
                    error=f"{exception_type}: {exception_value}",
                    job_id=self._job_id,
                    urn=self.actor_urn,
                )
            )

    # --- Spawn -------------------------------------------------------------

    def _spawn(self, msg: Spawn) -> None:
        began = self._clock.now()
        plan = _Plan(
            snapshots_enabled=msg.snapshots_enabled,
            base_image=self._settings.worker_for(msg.spec.agent_type).image,
        )
        jlog = job_log(log, msg.job_id, msg.spec.project, msg.spec.work_item)
        try:
            launched = self._start_policy(plan)(self._launch, msg, plan)
        except EngineError as exc:
            retryable = isinstance(exc, EngineUnavailable)
            image = plan.snapshot.image_id if plan.snapshot else plan.base_image
            extras: dict[str, object] = {"job_id": msg.job_id, "image": image}
            if plan.stale_image_id is not None:
                extras["stale_image_id"] = plan.stale_image_id
            capture_error(exc, source="spawner", job_type=msg.spec.agent_type, extras=extras)
            error = str(exc)
            if retryable:
                error = f"engine unavailable after {plan.attempts} attempts: {exc}"
            jlog.error("spawn failed (retryable=%s): %s", retryable, error)
            self._metrics.spawn_failures.inc()
            self._tell(
                msg.reply_to,
                SpawnFailed(
                    job_id=msg.job_id,
                    error=error,
                    spawner=self.name,
                    retryable=retryable,
                    answered=retryable and exc.status_code is not None,
                ),
            )
            return
        self._metrics.spawn_seconds.observe(self._clock.now() - began)
        jlog.info(
            "started %s from %s %s (attempts %d)",
            launched.container_id,
            "snapshot" if launched.from_snapshot else "base",
            launched.image_id,
            plan.attempts,
        )
        self._tell(
            msg.reply_to,
            Started(
                job_id=msg.job_id,
                container_id=launched.container_id,
                image_id=launched.image_id,
                from_snapshot=launched.from_snapshot,
                attempts=plan.attempts,
                spawner=self.name,
            ),
        )

    def _start_policy(self, plan: _Plan) -> Retrying:
        """Retry a blip with backoff; retry a vanished snapshot at once, on the base image.

        The fallback attempt does not spend the retry budget: with
        ``retry.attempts = 1`` a stale snapshot still gets its base-image run.
        """
        backoff = self._backoff()

        def wait(state: RetryCallState) -> float:
            return 0.0 if _failed_with(state, StaleSnapshot) else backoff(state)

        def attempts_exhausted(state: RetryCallState) -> bool:
            fallbacks = 1 if plan.stale_image_id is not None else 0
            return state.attempt_number - fallbacks >= self._settings.retry.attempts

        return Retrying(
            retry=retry_if_exception_type(EngineUnavailable)
            | retry_if_exception_type(StaleSnapshot),
            wait=wait,
            stop=attempts_exhausted,
            sleep=self._clock.sleep,
            reraise=True,
        )

    def _launch(self, msg: Spawn, plan: _Plan) -> _Launched:
        """One attempt: resolve the base, look up a snapshot (once), create, start."""
        plan.attempts += 1
        if plan.attempts > 1:
            self._remove_earlier_attempts(msg)
        base_id = self._resolve_base(plan.base_image)
        if plan.snapshots_enabled and not plan.looked_up:
            plan.snapshot = self._lookup(msg, base_id)
            plan.looked_up = True
        # Never another agent type's lineage, even if the manager answered one.
        start = start_image(plan.snapshot, plan.base_image, base_id)
        plan.snapshot = snapshot = start.snapshot
        spec = worker_container_spec(
            msg.job_id,
            msg.spec,
            start,
            self._settings.worker_for(msg.spec.agent_type),
            msg.snapshots_enabled,
            self._extra_labels,
            msg.attempt,
        )
        try:
            container_id = self._engine.create_container(spec)
        except ImageMissing as exc:
            raise self._image_missing(msg, plan, exc) from exc
        try:
            self._engine.start_container(container_id)
        except Exception as exc:
            # Created but not started: remove it, or every failed start leaks one.
            self._discard(container_id, msg)
            if isinstance(exc, ImageMissing):
                raise self._image_missing(msg, plan, exc) from exc
            raise
        return _Launched(
            container_id=container_id,
            image_id=snapshot.image_id if snapshot else base_id,
            from_snapshot=snapshot is not None,
        )

    def _image_missing(self, msg: Spawn, plan: _Plan, exc: ImageMissing) -> ImageMissing:
        """Decide what a 404 means: a stale snapshot to drop, or a base image to build."""
        snapshot = plan.snapshot
        if snapshot is None:
            return BaseImageMissing(plan.base_image, self._engine.describe())
        reason = f"404 on create/start for job {msg.job_id}: {exc}"
        self._tell(self._snapshots, Invalidate(snapshot.key, snapshot.image_id, reason))
        self._metrics.stale_snapshot_fallbacks.inc()
        job_log(
            log, msg.job_id, msg.spec.project, msg.spec.work_item, image=snapshot.image_id
        ).warning("snapshot image is gone; invalidated it, retrying on the base image")
        plan.stale_image_id = snapshot.image_id
        plan.snapshot = None
        return StaleSnapshot(snapshot.image_id, exc)

    def _resolve_base(self, image: str) -> str:
        """The base image's current ID; a new one is told to the SnapshotManager first."""
        try:
            base_id = self._engine.inspect_image(image).id
        except ImageMissing as exc:
            raise BaseImageMissing(image, self._engine.describe()) from exc
        if base_id != self._base_ids.get(image):
            # Told before the Lookup that follows: the manager sees it first
            # and never hands out a snapshot of the previous base.
            self._tell(self._snapshots, SetBaseImage(base_id, image=image))
            self._base_ids[image] = base_id
        return base_id

    def _lookup(self, msg: Spawn, base_id: str) -> Snapshot | None:
        try:
            found = self._snapshots.ask(
                Lookup(msg.spec.key, base_image_id=base_id), timeout=LOOKUP_TIMEOUT_S
            )
        except Exception as exc:  # dead, wedged, or failing: a base start beats a crash
            job_log(log, msg.job_id, msg.spec.project, msg.spec.work_item).warning(
                "snapshot lookup failed (%s); starting from the base image", exc
            )
            return None
        local = found if isinstance(found, Snapshot) else None
        return local if self._remote is None else self._remote(msg.spec.key, local, base_id)

    # --- Finish ------------------------------------------------------------

    def _finish(self, msg: Finish) -> None:
        spec = msg.spec
        jlog = job_log(log, msg.job_id, spec.project, spec.work_item, container=msg.container_id)
        errors: list[str] = []
        logs_tail = ""
        try:
            logs = self._patiently(self._engine.container_logs, msg.container_id, LOGS_TAIL_LINES)
            logs_tail = mask_secrets(logs.text, spec.env.values())
        except EngineError as exc:
            errors.append(f"could not read logs: {exc}")
            self._capture(exc, spec, msg.job_id, msg.container_id)
        snapshot_id: str | None = None
        # Whether to commit was decided once, by the Supervisor (flight.on_exit).
        if msg.commit:
            try:
                snapshot_id = self._commit(msg)
            except EngineError as exc:
                errors.append(f"snapshot not committed: {exc}")
                self._capture(exc, spec, msg.job_id, msg.container_id)
                jlog.warning("commit failed: %s", exc)
        try:
            self._patiently(self._engine.remove_container, msg.container_id, True)
        except ContainerMissing:
            pass
        except EngineError as exc:
            errors.append(f"container not removed: {exc}")
            self._capture(exc, spec, msg.job_id, msg.container_id)
        jlog.info("finished with exit code %d, snapshot %s", msg.exit_code, snapshot_id)
        self._tell(
            msg.reply_to,
            Finished(
                job_id=msg.job_id,
                container_id=msg.container_id,
                exit_code=msg.exit_code,
                snapshot_image_id=snapshot_id,
                logs_tail=logs_tail,
                error="; ".join(errors) or None,
                spawner=self.name,
            ),
        )

    def _commit(self, msg: Finish) -> str | None:
        """Commit the container as the key's snapshot (``actors.snapshotter``); register it."""
        snapshot = self._snapshotter.commit(msg.job_id, msg.spec, msg.container_id)
        if snapshot is None:
            return None
        # Awaited: the job's end (and its key's release) must not overtake its
        # snapshot, or the key's next job could miss it (on a cluster: run on
        # another host before the index says where the snapshot is).
        try:
            self._snapshots.ask(Register(snapshot), timeout=LOOKUP_TIMEOUT_S)
        except Exception as exc:  # dead or wedged: the sweep's rebuild finds the image
            log.warning("snapshot %s not registered: %s", snapshot.image_id, exc)
        return snapshot.image_id

    # --- Terminate ---------------------------------------------------------

    def _terminate(self, msg: Terminate) -> None:
        try:
            self._patiently(self._engine.stop_container, msg.container_id, msg.grace_s)
        except ContainerMissing:
            pass  # already gone: what we wanted
        except EngineError as exc:
            # The Supervisor's reconciler finds a container that still runs.
            log.warning("could not stop %s for job %s: %s", msg.container_id, msg.job_id, exc)
            capture_error(
                exc, source="spawner", extras={"job_id": msg.job_id, "container": msg.container_id}
            )
        self._tell(
            msg.reply_to,
            Terminated(job_id=msg.job_id, container_id=msg.container_id, spawner=self.name),
        )

    # --- helpers -----------------------------------------------------------

    def _backoff(self) -> wait_base:
        return backoff(self._settings.retry)

    def _patiently(self, call: Callable[..., T], *args: Any) -> T:
        """One engine call, retried through a blip like a start is; other errors pass."""
        retrying = Retrying(
            retry=retry_if_exception_type(EngineUnavailable),
            wait=self._backoff(),
            stop=stop_after_attempt(self._settings.retry.attempts),
            sleep=self._clock.sleep,
            reraise=True,
        )
        return retrying(call, *args)

    def _tell(self, ref: pykka.ActorRef[Any], message: object) -> None:
        """A dead receiver is its parent's problem; it must not take this Spawner down too."""
        try:
            ref.tell(message)
        except pykka.ActorDeadError:
            log.warning("%s is dead; dropped %s", ref, type(message).__name__)

    def _remove_earlier_attempts(self, msg: Spawn) -> None:
        """A create whose reply was lost (the engine blinked) still made a container:
        remove this job's before making another, or every blip leaks one."""
        mine = {LABEL_JOB_ID: msg.job_id}
        if LABEL_INSTANCE in self._extra_labels:
            mine[LABEL_INSTANCE] = self._extra_labels[LABEL_INSTANCE]
        for container in self._engine.list_containers(mine):
            self._discard(container.id, msg)

    def _discard(self, container_id: str, msg: Spawn) -> None:
        # Retried through a blip: a start that timed out may still have run the
        # container, and the next attempt must not start a second one beside it.
        try:
            self._patiently(self._engine.remove_container, container_id, True)
        except ContainerMissing:
            pass
        except EngineError as exc:
            # Labelled snapyard.managed: the Supervisor's orphan sweep removes it.
            log.warning("could not remove unstarted container %s: %s", container_id, exc)
            self._capture(exc, msg.spec, msg.job_id, container_id)

    def _capture(self, exc: BaseException, spec: JobSpec, job_id: str, container_id: str) -> None:
        capture_error(
            exc,
            source="spawner",
            job_type=spec.agent_type,
            extras={"job_id": job_id, "container": container_id},
        )


def _failed_with(state: RetryCallState, kind: type[BaseException]) -> bool:
    outcome = state.outcome
    return outcome is not None and isinstance(outcome.exception(), kind)
