"""A rig for SnapshotManager and Spawner tests: real actors, MemoryEngine, FakeClock.

Replies go to a Collector actor that puts them on a queue; a test blocks on
that queue (like a future's ``.get()``), never sleeps for an actor to catch up.
"""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pykka

from actors.clock import FakeClock
from actors.engine.memory import MemoryEngine
from actors.flight import commit_decision
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
from actors.model import JobSpec, Snapshot, SnapshotKey
from actors.naming import snapshot_image_name
from actors.settings import Settings
from actors.snapshot_manager import SnapshotManager
from actors.spawner import Spawner
from actors.wiring import spawner_factory, start_root, start_snapshots

BASE_TAG = "snapyard-worker:test"
REPLY_TIMEOUT_S = 10.0


def test_settings(**sections: Any) -> Settings:
    settings = Settings().replace(
        worker={"image": BASE_TAG, "setup_seconds": 1.0},
        retry={"attempts": 4, "backoff_initial_s": 0.5, "backoff_max_s": 4.0},
    )
    return settings.replace(**sections)


test_settings.__test__ = False  # type: ignore[attr-defined]


class Collector(pykka.ThreadingActor):
    """Stands in for the Supervisor: every message it gets goes on a queue."""

    def __init__(self, inbox: queue.Queue[Any]) -> None:
        super().__init__()
        self._inbox = inbox

    def on_receive(self, message: Any) -> None:
        self._inbox.put(message)


def snapshot_labels(
    key: SnapshotKey, base_id: str, created_at: float, repository: str = "snapyard-snapshot"
) -> dict[str, str]:
    return {
        "snapyard.role": "snapshot",
        "snapyard.project": key.project,
        "snapyard.work_item": key.work_item,
        "snapyard.base_image_id": base_id,
        "snapyard.created_at": repr(created_at),
        "snapyard.repository": repository,
    }


@dataclass
class Rig:
    engine: MemoryEngine
    clock: FakeClock
    settings: Settings
    base_id: str
    manager: pykka.ActorRef[SnapshotManager] | None = None
    spawner: pykka.ActorRef[Spawner] | None = None
    inbox: queue.Queue[Any] = field(default_factory=queue.Queue)
    collector: pykka.ActorRef[Collector] | None = None
    root: pykka.ActorRef[Any] | None = None
    fatal: list[str] = field(default_factory=list)

    def start(self, spawner: bool = True) -> Rig:
        """The application's wiring for these two: the manager under a Root,
        the Spawner from the same factory, reporting to a Collector."""
        self.root = start_root(self.settings, self.clock, self.fatal.append)
        self.manager = start_snapshots(self.engine, self.settings, self.clock, self.root)
        self.collector = Collector.start(self.inbox)
        if spawner:
            factory = spawner_factory(self.engine, self.manager, self.settings, self.clock)
            self.spawner = factory("spawner-1", self.collector)
        return self

    def restart_manager(self) -> None:
        assert self.manager is not None
        assert self.root is not None
        self.manager.stop()
        self.manager = start_snapshots(self.engine, self.settings, self.clock, self.root)

    # --- SnapshotManager ---------------------------------------------------

    def ask(self, message: object) -> Any:
        assert self.manager is not None
        return self.manager.ask(message, timeout=REPLY_TIMEOUT_S)

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

    def add_snapshot(
        self,
        key: SnapshotKey,
        created_at: float | None = None,
        size_bytes: int = 1000,
        layers: int = 4,
        base_id: str | None = None,
        repository: str = "snapyard-snapshot",
    ) -> Snapshot:
        """Seed a snapshot image in the engine (not the registry) and return its entry."""
        created = self.clock.now() if created_at is None else created_at
        base = base_id or self.base_id
        repo, tag = snapshot_image_name(repository, key.project, key.work_item)
        image_id = self.engine.add_image(
            f"{repo}:{tag}-{created}",
            labels=snapshot_labels(key, base, created, repository),
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

    # --- Spawner -----------------------------------------------------------

    def reply(self) -> Any:
        return self.inbox.get(timeout=REPLY_TIMEOUT_S)

    def spawn(self, job_id: str, spec: JobSpec, snapshots: bool = True) -> Started | SpawnFailed:
        assert self.spawner is not None
        assert self.collector is not None
        self.spawner.tell(Spawn(job_id, spec, snapshots, self.collector))
        reply = self.reply()
        assert isinstance(reply, Started | SpawnFailed), reply
        return reply

    def finish(self, job_id: str, spec: JobSpec, container_id: str, exit_code: int) -> Finished:
        assert self.spawner is not None
        assert self.collector is not None
        # As the Supervisor decides it: commit a clean exit only.
        commit = commit_decision(exit_code, None, snapshots_on=True)
        self.spawner.tell(Finish(job_id, spec, container_id, exit_code, commit, self.collector))
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
        started = self.spawn(job_id, spec, snapshots)
        assert isinstance(started, Started), started
        return started, self.finish(job_id, spec, started.container_id, exit_code)

    def created_images(self) -> list[str]:
        return [args[0].image for args in self.engine.calls_of("create_container")]  # type: ignore[attr-defined]


def make_rig(
    settings: Settings | None = None,
    exit_code: int | None = 0,
    base_labels: Mapping[str, str] | None = None,
) -> Rig:
    """An engine holding the base image; containers exit with ``exit_code`` when started."""
    clock = FakeClock()
    engine = MemoryEngine(
        clock=clock, exit_policy=(lambda _c: exit_code) if exit_code is not None else None
    )
    base_id = engine.add_worker_image(BASE_TAG, labels=base_labels)
    return Rig(engine=engine, clock=clock, settings=settings or test_settings(), base_id=base_id)
