"""The rig the supervisor state machine drives: real actors on a ChaosEngine.

``ChaosEngine`` is a MemoryEngine that plays the worker (the job's command
says how it ends), checks the limits at the one moment they matter (a start)
and lets a test read its state without recording a call. ``Rig`` starts and
restarts the actors the way the application does and knows when they are
quiet: ``settle()`` waits on futures and on the Watcher's event count (a
condition, notified as events are pushed and handled), never on a sleep.
Time passes only by ``advance``/``advance_to``, and a drain reads where to go
from the timers themselves (``timer_due``), so nothing here is a fixed budget.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pykka
from actor_kit import kit_settings
from pykka.messages import ProxyGetAttr

from actors.clock import FakeClock
from actors.engine.base import (
    Conflict,
    ContainerSpec,
    EngineError,
    EngineEvent,
    ImageConfig,
    ImageMissing,
)
from actors.engine.memory import MemoryContainer, MemoryEngine, MemoryImage, normalize_tag
from actors.labels import (
    LABEL_BASE_IMAGE_ID,
    LABEL_CREATED_AT,
    LABEL_JOB_ID,
    LABEL_MANAGED,
    LABEL_PROJECT,
    LABEL_ROLE,
    LABEL_WORK_ITEM,
    ROLE_SNAPSHOT,
)
from actors.messages import (
    GetStatus,
    ListSnapshots,
    StopDispatching,
    SupervisorStatus,
)
from actors.model import Snapshot
from actors.naming import snapshot_image_name
from actors.reaper import Reaper
from actors.settings import Settings
from actors.spawner import Spawner
from actors.store import SqliteStore
from actors.telemetry import Secrets
from actors.timers import Scheduler
from actors.watcher import Watcher
from actors.wiring import Actors, Wiring, start_actors

BASE_TAG = "snapyard-worker:machine"
REPOSITORY = "snapyard-snapshot"
ASK_S = 10.0
SETTLE_S = 30.0
Key = tuple[str, str]

# The worker's part, spelled in the job's command: ("worker", OUTCOME).
HANG = "hang"
OOM = "oom"


def outcome_command(outcome: int | str) -> tuple[str, str]:
    return ("worker", f"exit:{outcome}" if isinstance(outcome, int) else outcome)


def machine_settings(**overrides: Any) -> Settings:
    settings = kit_settings(
        BASE_TAG,
        retry={"attempts": 2, "backoff_initial_s": 1.0, "backoff_max_s": 8.0},
        snapshots={
            "repository": REPOSITORY,
            "max_count": 2,
            # A snapshot weighs its own layer (~4 KB here; the shared 5 MB base is
            # not its own): two fit, three do not.
            "max_total_bytes": 10_000,
            "ttl_s": 600.0,
            "sweep_interval_s": 120.0,
            "max_layers": 6,
        },
        supervisor={
            "max_workers": 2,
            "spawners": 2,
            "stop_grace_s": 5.0,
            "orphan_grace_s": 30.0,
            "orphan_sweep_interval_s": 60.0,
            "tick_interval_s": 1.0,
            "default_timeout_s": 300.0,
            "shutdown_timeout_s": 10.0,
        },
    )
    return settings.replace(**overrides)


@dataclass
class _Tracked:
    """One event stream as the Watcher sees it: events pushed vs. events handled.

    The counts change under ``changed``, the engine's one condition for all
    its streams, so a test waits for the Watcher to catch up instead of polling.
    """

    inner: Any
    changed: threading.Condition
    pushed: int = 0
    handled: int = 0
    done: bool = False

    def __iter__(self) -> Iterator[EngineEvent]:
        try:
            for event in self.inner:
                yield event
                # The Watcher asks for the next event only after handling this one.
                with self.changed:
                    self.handled += 1
                    self.changed.notify_all()
        finally:
            self._finish()

    def close(self) -> None:
        self._finish()  # closed before (or while) iterating: nothing more is owed
        self.inner.close()

    def _finish(self) -> None:
        with self.changed:
            self.done = True
            self.changed.notify_all()

    @property
    def quiet(self) -> bool:
        """Call with ``changed`` held."""
        return self.done or self.pushed == self.handled


class ChaosEngine(MemoryEngine):
    """A MemoryEngine that runs the machine's workers and checks limits at each start."""

    def __init__(self, clock: FakeClock, settings: Settings) -> None:
        super().__init__(clock=clock, exit_policy=self._worker)
        self.settings = settings
        self.violations: list[str] = []
        # Guards ``streams`` and their counts. Taken inside the engine lock
        # (events are pushed under it), never the other way round.
        self._watched = threading.Condition()
        self.streams: list[_Tracked] = []
        self.started_jobs: dict[str, list[str]] = {}  # job id -> container ids
        self.snapshot_starts: list[tuple[str, str]] = []  # (job id, image id)
        # The key of the job this thread's engine call is for: hooks target one key.
        self.context = threading.local()

    # --- the worker --------------------------------------------------------

    def _worker(self, container: MemoryContainer) -> int | None:
        last = (container.cmd or ("",))[-1]
        if last.startswith("exit:"):
            return int(last.removeprefix("exit:"))
        if last == OOM:
            self.exit_container(container.id, 137, oom=True)
        return None  # HANG: runs until stopped (or its timeout)

    # --- checks at the moments they matter ---------------------------------

    def call_key(self) -> Key | None:
        key: Key | None = getattr(self.context, "key", None)
        return key

    def _enter_for(self, labels: Mapping[str, str]) -> None:
        project, work_item = labels.get(LABEL_PROJECT), labels.get(LABEL_WORK_ITEM)
        self.context.key = None if project is None or work_item is None else (project, work_item)

    def create_container(self, spec: ContainerSpec) -> str:
        self._enter_for(spec.labels)
        if spec.image != self.settings.worker.image:
            self._check_snapshot_choice(spec)
        return super().create_container(spec)

    def _check_snapshot_choice(self, spec: ContainerSpec) -> None:
        """A snapshot start uses its own key's newest snapshot of the current base."""
        with self._lock:
            image = self._images.get(spec.image)
            base_id = self._tags.get(normalize_tag(self.settings.worker.image))
            if image is None or base_id is None:
                return  # the 404 (or the base check) is the Spawner's to handle
            key = (spec.labels.get(LABEL_PROJECT), spec.labels.get(LABEL_WORK_ITEM))
            own = (image.labels.get(LABEL_PROJECT), image.labels.get(LABEL_WORK_ITEM))
            if own != key:
                self.violations.append(f"job for {key} started from {own}'s snapshot {image.id}")
                return
            if image.labels.get(LABEL_BASE_IMAGE_ID) != base_id:
                self.violations.append(f"job for {key} started from {image.id} of an old base")
                return
            newer = [
                other.id
                for other in self._key_snapshots(key)
                if other.labels.get(LABEL_BASE_IMAGE_ID) == base_id
                and _created(other) > _created(image)
            ]
            if newer:
                self.violations.append(
                    f"job for {key} started from {image.id}, not the newest {newer}"
                )

    def start_container(self, container_id: str) -> None:
        with self._lock:
            found = self._containers.get(container_id)
        self._enter_for(found.labels if found is not None else {})
        # Held across the start, so two Spawners cannot both pass the check.
        with self._lock:
            record = self._containers.get(container_id)
            if record is not None and record.labels.get(LABEL_MANAGED) == "true":
                running = [
                    c
                    for c in self._containers.values()
                    if c.status == "running" and c.labels.get(LABEL_MANAGED) == "true"
                ]
                if len(running) + 1 > self.settings.supervisor.max_workers:
                    self.violations.append(
                        f"{len(running) + 1} running workers > max_workers "
                        f"{self.settings.supervisor.max_workers}"
                    )
                key = _container_key(record)
                if any(_container_key(c) == key for c in running):
                    self.violations.append(f"two running jobs for work item {key}")
            super().start_container(container_id)
            if record is not None:
                job_id = record.labels.get(LABEL_JOB_ID, "")
                self.started_jobs.setdefault(job_id, []).append(container_id)
                if record.spec.image != self.settings.worker.image:
                    self.snapshot_starts.append((job_id, record.image_id))

    def commit_container(
        self, container_id: str, repository: str, tag: str, config: ImageConfig
    ) -> str:
        with self._lock:
            found = self._containers.get(container_id)
        self._enter_for(found.labels if found is not None else {})
        return super().commit_container(container_id, repository, tag, config)

    def events(self, since: float | None = None) -> Any:
        with self._lock:
            stream = super().events(since)
            tracked = _Tracked(stream, self._watched, pushed=stream._queue.qsize())
            push = stream.push

            def counting_push(item: object) -> None:
                # Counted before it is queued: a waiter never sees "quiet" with it in
                # flight. An outage notice counts too: until the Watcher reads it, it
                # still believes it is connected.
                with self._watched:
                    tracked.pushed += 1
                push(item)  # type: ignore[arg-type]

            stream.push = counting_push  # type: ignore[method-assign]
            with self._watched:
                self.streams.append(tracked)
                self._watched.notify_all()  # a waiter may be waiting for the Watcher to reconnect
            return tracked

    # --- reading state without recording a call ----------------------------

    def _quiet(self, live: bool) -> bool:
        if not all(s.quiet for s in self.streams):
            return False
        # With the engine up, a Watcher between two streams has events to replay.
        return not live or (bool(self.streams) and not self.streams[-1].done)

    def watcher_quiet(self, live: bool) -> bool:
        with self._watched:
            return self._quiet(live)

    def wait_watcher_quiet(self, live: bool, timeout_s: float) -> None:
        """Wait until the Watcher has handled every event pushed to it.

        ``live``: the engine is up, so the Watcher must also be on an open
        stream; one that is reconnecting replays what happened meanwhile.
        """
        with self._watched:
            if not self._watched.wait_for(lambda: self._quiet(live), timeout_s):
                counts = [(s.pushed, s.handled, s.done) for s in self.streams]
                raise AssertionError(
                    f"the Watcher did not forward every event in {timeout_s}s: {counts}"
                )

    def events_pushed(self) -> int:
        with self._watched:
            return sum(s.pushed for s in self.streams)

    def base_id(self) -> str | None:
        with self._lock:
            return self._tags.get(normalize_tag(self.settings.worker.image))

    def has_image(self, image_id: str) -> bool:
        with self._lock:
            return image_id in self._images

    def managed_containers(self) -> list[MemoryContainer]:
        with self._lock:
            return [c for c in self._containers.values() if c.labels.get(LABEL_MANAGED) == "true"]

    def snapshot_images(self) -> list[MemoryImage]:
        """Snapshot images as ``docker images`` shows them (untagged parents hidden)."""
        with self._lock:
            return [
                image
                for image in self._images.values()
                if image.labels.get(LABEL_ROLE) == ROLE_SNAPSHOT
                and (image.tags or not self._children(image.id))
            ]

    def all_images(self) -> list[MemoryImage]:
        with self._lock:
            return list(self._images.values())

    def _key_snapshots(self, key: tuple[str | None, str | None]) -> list[MemoryImage]:
        return [
            image
            for image in self._images.values()
            if image.labels.get(LABEL_ROLE) == ROLE_SNAPSHOT
            and (image.labels.get(LABEL_PROJECT), image.labels.get(LABEL_WORK_ITEM)) == key
        ]

    # --- deleting from outside ----------------------------------------------

    def tag_behind_back(self, image: str, tag: str) -> None:
        """An operator's ``docker tag``: no call recorded, no fault injected."""
        with self._lock:
            self._set_tag(self._find_image(image), normalize_tag(tag))

    def before_key(self, method: str, key: Key, action: Callable[[], None]) -> None:
        """Run ``action`` right before the next ``method`` call made for a job of ``key``."""

        def hook() -> None:
            if self.call_key() == key:
                action()
            else:
                self.before(method, hook)  # another key's call: wait for ours

        self.before(method, hook)

    def delete_key_snapshots(self, key: Key) -> list[str]:
        """``docker rmi -f`` every snapshot image of ``key``; by tag when the ID is refused."""
        with self._lock:
            ids = [image.id for image in self._key_snapshots(key)]
        repository, tag = snapshot_image_name(REPOSITORY, *key)
        deleted = []
        for image_id in ids:
            try:
                self.delete_image_behind_back(image_id)
                deleted.append(image_id)
            except ImageMissing:
                pass
            except Conflict:
                # In use by a running container, or a parent: Docker refuses by ID;
                # ``rmi -f <tag>`` still takes the name away.
                with contextlib.suppress(EngineError):
                    self.delete_image_behind_back(f"{repository}:{tag}")
        return deleted


def _created(image: MemoryImage) -> float:
    try:
        return float(image.labels[LABEL_CREATED_AT])
    except (KeyError, ValueError):
        return image.created_at


def _container_key(container: MemoryContainer) -> tuple[str | None, str | None]:
    return (container.labels.get(LABEL_PROJECT), container.labels.get(LABEL_WORK_ITEM))


def add_base(engine: MemoryEngine, tag: str = BASE_TAG) -> str:
    return engine.add_worker_image(tag)


class Rig:
    """One Snapyard process's actors on a shared engine and store path; restartable.

    ``secrets`` is what the test's log handler and Sentry scrub with: the
    Supervisor remembers each job's env values there, as the app's does.
    """

    def __init__(self, settings: Settings | None = None, secrets: Secrets | None = None) -> None:
        self.secrets = secrets if secrets is not None else Secrets()
        self.clock = FakeClock()
        self.settings = settings or machine_settings()
        self.engine = ChaosEngine(self.clock, self.settings)
        add_base(self.engine)
        self._dir = tempfile.TemporaryDirectory(prefix="snapyard-machine-")
        self.store_path = Path(self._dir.name) / "jobs.db"
        self.store = SqliteStore(self.store_path, self.clock)
        self.scheduler = Scheduler(self.clock)
        self.available = True
        self._wake = threading.Event()
        self.watcher: Watcher | None = None
        self.sup: pykka.ActorRef[Any] | None = None
        self.snapshots: pykka.ActorRef[Any] | None = None
        self.fatal: list[str] = []
        self.actors: Actors | None = None

    # --- life cycle --------------------------------------------------------

    def start(self) -> None:
        """The application's wiring; the timers fire when ``advance`` runs them."""
        # The Watcher's reconnect backoff waits for the engine to come back
        # (or for stop()): a FakeClock sleep would spin while it is down.
        wake = threading.Event()
        if self.available:
            wake.set()
        self._wake = wake
        self.actors = start_actors(
            Wiring(
                self.engine,
                self.store,
                self.settings,
                self.clock,
                on_fatal=self.fatal.append,
                watcher_sleep=lambda _s: wake.wait(SETTLE_S),
                run_timers=False,
                secrets=self.secrets,
            )
        )
        self.snapshots, self.sup = self.actors.snapshots, self.actors.supervisor
        self.watcher = self.actors.watcher
        self.scheduler = self.actors.scheduler

    def stop(self, graceful: bool = True) -> None:
        """Stop like the application does: no new starts, let Spawners finish, stop in reverse."""
        if self.sup is None or self.snapshots is None or self.actors is None:
            return
        if graceful and self.sup.is_alive():
            with contextlib.suppress(pykka.ActorDeadError):
                self.sup.tell(StopDispatching())
                self.settle()
        self._wake.set()  # a Watcher waiting out its backoff must see the stop
        self.actors.stop(ASK_S)
        self.watcher = None
        self.actors = None
        self.sup = self.snapshots = None

    def restart(self, graceful: bool = True) -> None:
        self.stop(graceful)
        self.store.close()
        self.store = SqliteStore(self.store_path, self.clock)
        self.start()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(graceful=False)
        self.store.close()
        self._dir.cleanup()

    # --- the engine going away and coming back -----------------------------

    def set_available(self, available: bool) -> None:
        if available == self.available:
            return
        self.available = available
        if available:
            self.engine.set_unavailable(False)
            self._wake.set()
            if self.watcher is not None:
                assert self.watcher.connected.wait(SETTLE_S), "the Watcher did not reconnect"
        else:
            self._wake.clear()
            self.engine.set_unavailable(True)

    # --- asking ------------------------------------------------------------

    def ask_sup(self, message: object) -> Any:
        assert self.sup is not None
        return self.sup.ask(message, timeout=ASK_S)

    def registry(self) -> list[Snapshot]:
        assert self.snapshots is not None
        found: list[Snapshot] = self.snapshots.ask(ListSnapshots(), timeout=ASK_S)
        return found

    def status(self) -> SupervisorStatus:
        status: SupervisorStatus = self.ask_sup(GetStatus(deadlines=True))
        return status

    def advance(self, seconds: float) -> None:
        """Time passes; every timer that falls due fires, as the scheduler thread would."""
        self.clock.advance(seconds)
        self.scheduler.run_due()

    def advance_to(self, when: float) -> None:
        """Time passes up to ``when`` (never back); the timers due by then fire."""
        self.advance(max(0.0, when - self.clock.now()))

    def timer_due(self, message: Callable[[float], object], at_or_after: float) -> float:
        """When the timer that sends ``message`` next fires at or after ``at_or_after``.

        Read from the scheduler itself: a timer fires at its due time and every
        interval after it (``run_due`` sends a late one once, at the time reached).
        """
        (timer,) = [t for t in self.scheduler.timers if t.message_factory is message]
        if at_or_after <= timer.due:
            return timer.due
        periods = math.ceil((at_or_after - timer.due) / timer.interval_s)
        return timer.due + periods * timer.interval_s

    def settle(self) -> SupervisorStatus:
        """Wait until every actor has handled everything in flight (a fixpoint of futures).

        A round asks each actor once (FIFO inboxes: the answer means all sent
        before it was handled) after the Watcher has forwarded every event;
        two rounds that see the same engine calls, events, status and registry
        mean nothing is moving.
        """
        assert self.sup is not None
        assert self.snapshots is not None
        deadline = time.monotonic() + SETTLE_S
        previous: object = None
        while True:
            live = self.available and self.watcher is not None
            self.engine.wait_watcher_quiet(live, SETTLE_S)
            for cls in (Spawner, Reaper):
                for ref in pykka.ActorRegistry.get_by_class(cls):
                    with contextlib.suppress(pykka.ActorDeadError):
                        ref.ask(ProxyGetAttr(attr_path=("actor_urn",)), timeout=ASK_S)
            registry = tuple((s.key, s.image_id) for s in self.registry())
            status: SupervisorStatus = self.ask_sup(GetStatus(deadlines=True))
            with self.engine._lock:
                calls = len(self.engine.calls)
            current = (calls, self.engine.events_pushed(), status, registry)
            if current == previous and status.pending_ops == 0 and self.engine.watcher_quiet(live):
                return status
            previous = current
            if time.monotonic() > deadline:
                raise AssertionError(f"the actors did not settle in {SETTLE_S}s: {current!r}")
