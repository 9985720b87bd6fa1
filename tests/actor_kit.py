"""Helpers every suite shares: one reply-collecting actor, one settings
builder, one rig for a SnapshotManager and its Spawners on any engine.

They lived as copies in the unit kits and the Docker tests; a fix to one copy
never reached the others. Replies go to a Collector that puts them on a queue;
a test blocks on that queue (like a future's ``.get()``), never sleeps for an
actor to catch up.
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import pykka

from actors.clock import Clock, FakeClock
from actors.engine.base import Engine
from actors.engine.memory import MemoryEngine
from actors.flight import commit_decision
from actors.labels import (
    LABEL_BASE_IMAGE_ID,
    LABEL_CREATED_AT,
    LABEL_INSTANCE,
    LABEL_PROJECT,
    LABEL_REPOSITORY,
    LABEL_ROLE,
    LABEL_WORK_ITEM,
    ROLE_SNAPSHOT,
)
from actors.messages import (
    Finish,
    Finished,
    ListSnapshots,
    Lookup,
    Register,
    Spawn,
    SpawnFailed,
    Started,
    SweepSnapshots,
)
from actors.metrics import Metrics
from actors.model import JobSpec, Snapshot, SnapshotKey
from actors.naming import snapshot_image_name
from actors.settings import Settings
from actors.usage import UsageStore
from actors.wiring import spawner_factory, start_root, start_snapshots

BASE_TAG = "snapyard-worker:test"
# The instance every kit's actors run as (and label their objects with).
KIT_INSTANCE = "kit"
REPLY_TIMEOUT_S = 10.0
# Ask a Collector this to wait until everything told to it before is queued.
SYNC = "sync"

E = TypeVar("E", bound=Engine)


def kit_settings(
    base_tag: str = BASE_TAG, *, setup_seconds: float = 0.0, **sections: Any
) -> Settings:
    """Settings for actors under test: the kit's base image, the worker's setup
    cost (none unless asked), then each section's overrides."""
    settings = Settings().replace(
        worker={"image": base_tag, "setup_seconds": setup_seconds},
        supervisor={"instance_id": KIT_INSTANCE},
    )
    return settings.replace(**sections)


class Collector(pykka.ThreadingActor):
    """Stands in for a parent actor: every message it is told goes on a queue."""

    def __init__(self, inbox: queue.Queue[Any]) -> None:
        super().__init__()
        self._inbox = inbox

    def on_receive(self, message: Any) -> None:
        if message != SYNC:
            self._inbox.put(message)


def drain(inbox: queue.Queue[Any]) -> list[Any]:
    """What is on the queue now, without waiting."""
    items = []
    while not inbox.empty():
        items.append(inbox.get_nowait())
    return items


def snapshot_labels(
    key: SnapshotKey,
    base_id: str,
    created_at: float,
    repository: str = "snapyard-snapshot",
    instance: str = KIT_INSTANCE,
) -> dict[str, str]:
    """The labels a committed snapshot carries (the registry is rebuilt from them)."""
    return {
        LABEL_ROLE: ROLE_SNAPSHOT,
        LABEL_PROJECT: key.project,
        LABEL_WORK_ITEM: key.work_item,
        LABEL_BASE_IMAGE_ID: base_id,
        LABEL_CREATED_AT: repr(created_at),
        LABEL_REPOSITORY: repository,
        LABEL_INSTANCE: instance,
    }


def _without_none(labels: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in labels.items() if not (k == LABEL_INSTANCE and v == "")}


@dataclass
class Run:
    """One job driven through a Spawner, with its wall-clock timings."""

    started: Started
    finished: Finished
    start_s: float  # Spawn sent -> Started received
    total_s: float  # Spawn sent -> Finished received


@dataclass
class SpawnRig(Generic[E]):
    """A SnapshotManager, a pool of Spawners and a Collector standing in for the
    Supervisor: the Spawner's half of the system, on a MemoryEngine or Docker."""

    engine: E
    clock: Clock
    settings: Settings
    base_id: str = ""
    reply_s: float = REPLY_TIMEOUT_S
    manager: pykka.ActorRef[Any] | None = None
    spawners: list[pykka.ActorRef[Any]] = field(default_factory=list)
    inbox: queue.Queue[Any] = field(default_factory=queue.Queue)
    collector: pykka.ActorRef[Collector] | None = None
    # The rig's own registry: a test reads exactly what its actors recorded.
    metrics: Metrics = field(default_factory=Metrics.unscraped)
    root: pykka.ActorRef[Any] | None = None
    fatal: list[str] = field(default_factory=list)
    # Where the manager keeps snapshot use times (None: forgotten on restart).
    usage: UsageStore | None = None
    _next: int = 0

    def start(
        self,
        spawners: int = 1,
        *,
        prefix: str = "spawner",
        labels: Mapping[str, str] | None = None,
    ) -> SpawnRig[E]:
        """The application's wiring for these parts: the manager under a Root,
        the Spawners from the same factory, reporting to the Collector."""
        self.root = start_root(self.settings, self.clock, self.fatal.append)
        self.manager = start_snapshots(
            self.engine, self.settings, self.clock, self.root, self.metrics, self.usage
        )
        self.collector = Collector.start(self.inbox)
        factory = spawner_factory(
            self.engine, self.manager, self.settings, self.clock, labels, self.metrics
        )
        self.spawners = [factory(f"{prefix}-{i}", self.collector) for i in range(1, spawners + 1)]
        return self

    @property
    def spawner(self) -> pykka.ActorRef[Any] | None:
        """The first Spawner (most tests run one)."""
        return self.spawners[0] if self.spawners else None

    @spawner.setter
    def spawner(self, ref: pykka.ActorRef[Any]) -> None:
        self.spawners = [ref]

    def restart_manager(self) -> None:
        assert self.manager is not None
        assert self.root is not None
        self.manager.stop()
        self.manager = start_snapshots(
            self.engine, self.settings, self.clock, self.root, self.metrics, self.usage
        )

    # --- SnapshotManager ---------------------------------------------------

    def ask(self, message: object) -> Any:
        assert self.manager is not None
        return self.manager.ask(message, timeout=self.reply_s)

    def lookup(self, key: SnapshotKey) -> Snapshot | None:
        found = self.ask(Lookup(key))
        assert found is None or isinstance(found, Snapshot)
        return found

    def snapshots(self) -> list[Snapshot]:
        found = self.ask(ListSnapshots())
        assert isinstance(found, list)
        return found

    def sweep(self) -> None:
        self.ask(SweepSnapshots())

    def register(self, snapshot: Snapshot) -> None:
        self.ask(Register(snapshot))

    def image_ids(self) -> set[str]:
        return {info.id for info in self.engine.list_images({})}

    # --- Spawner -----------------------------------------------------------

    def reply(self) -> Any:
        return self.inbox.get(timeout=self.reply_s)

    def spawn(self, job_id: str, spec: JobSpec, snapshots: bool = True) -> Started | SpawnFailed:
        """Spawn on the next Spawner of the pool (round robin); its reply."""
        assert self.spawners
        assert self.collector is not None
        spawner = self.spawners[self._next % len(self.spawners)]
        self._next += 1
        spawner.tell(Spawn(job_id, spec, snapshots, self.collector))
        reply = self.reply()
        assert isinstance(reply, Started | SpawnFailed), reply
        return reply

    def finish(
        self,
        job_id: str,
        spec: JobSpec,
        container_id: str,
        exit_code: int,
        snapshots: bool = True,
        spawner: str | None = None,
    ) -> Finished:
        """Finish on the Spawner named ``spawner`` (default: the first); its reply."""
        assert self.spawners
        assert self.collector is not None
        ref = self.spawners[0]
        if spawner is not None:
            ref = next(r for r in self.spawners if r.proxy().name.get() == spawner)
        # As the Supervisor decides it (flight.commit_decision): commit a clean exit only.
        commit = commit_decision(exit_code, None, snapshots_on=snapshots)
        ref.tell(Finish(job_id, spec, container_id, exit_code, commit, self.collector))
        reply = self.reply()
        assert isinstance(reply, Finished), reply
        self.settle()
        return reply

    def settle(self) -> None:
        """Wait until the manager has handled what the Spawner told it (Register)."""
        with contextlib.suppress(pykka.ActorDeadError):
            self.snapshots()

    def run(
        self, job_id: str, spec: JobSpec, exit_code: int = 0, snapshots: bool = True
    ) -> tuple[Started, Finished]:
        """Spawn, then Finish with ``exit_code`` (the engine's exit policy ran the job)."""
        started = self.spawn(job_id, spec, snapshots)
        assert isinstance(started, Started), started
        return started, self.finish(job_id, spec, started.container_id, exit_code, snapshots)

    def drive(self, job_id: str, spec: JobSpec, snapshots: bool = True) -> Run:
        """Spawn, wait for the container to exit, Finish (commit on exit 0), timed."""
        began = time.monotonic()
        started = self.spawn(job_id, spec, snapshots)
        assert isinstance(started, Started), started
        start_s = time.monotonic() - began
        code = self.engine.wait_container(started.container_id, timeout_s=self.reply_s)
        finished = self.finish(
            job_id, spec, started.container_id, code, snapshots, spawner=started.spawner
        )
        return Run(started, finished, start_s, time.monotonic() - began)


class MemoryRig(SpawnRig[MemoryEngine]):
    """A SpawnRig on a MemoryEngine, which can seed snapshots and show its calls."""

    def add_snapshot(
        self,
        key: SnapshotKey,
        created_at: float | None = None,
        size_bytes: int = 1000,
        layers: int = 4,
        base_id: str | None = None,
        repository: str = "snapyard-snapshot",
        instance: str | None = KIT_INSTANCE,
    ) -> Snapshot:
        """Seed a snapshot image in the engine (not the registry) and return its entry;
        ``instance`` None: made before the instance label existed."""
        created = self.clock.now() if created_at is None else created_at
        base = base_id or self.base_id
        repo, tag = snapshot_image_name(repository, key.project, key.work_item)
        image_id = self.engine.add_image(
            f"{repo}:{tag}-{created}",
            labels=_without_none(snapshot_labels(key, base, created, repository, instance or "")),
            layers=layers,
            size_bytes=size_bytes,
        )
        return Snapshot(
            key=key,
            image_id=image_id,
            tag=f"{repo}:{tag}",
            base_image_id=base,
            created_at=created,
            last_used_at=created,
            size_bytes=size_bytes,
            layers=layers,
        )

    def created_images(self) -> list[str]:
        return [args[0].image for args in self.engine.calls_of("create_container")]  # type: ignore[attr-defined]


def make_rig(
    settings: Settings | None = None,
    exit_code: int | None = 0,
    base_labels: Mapping[str, str] | None = None,
) -> MemoryRig:
    """An engine holding the base image; containers exit with ``exit_code`` when started."""
    clock = FakeClock()
    engine = MemoryEngine(
        clock=clock, exit_policy=(lambda _c: exit_code) if exit_code is not None else None
    )
    base_id = engine.add_worker_image(BASE_TAG, labels=base_labels)
    return MemoryRig(
        engine=engine, clock=clock, settings=settings or spawn_settings(), base_id=base_id
    )


def spawn_settings(**sections: Any) -> Settings:
    """The Spawner tests' settings: a setup cost a snapshot saves, a retry budget to spend."""
    return kit_settings(
        setup_seconds=1.0, retry={"attempts": 4, "backoff_initial_s": 0.5, "backoff_max_s": 4.0}
    ).replace(**sections)
