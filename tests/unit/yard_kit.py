"""A rig for Supervisor and Watcher tests: real actors on a MemoryEngine and a FakeClock.

Tests wait on futures (``ask(...)`` returns when the message was handled) and,
for "eventually" conditions, on ``eventually``: it polls a query with a
bounded real-time timeout and fails loudly with the last value it saw.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pykka
from actor_kit import BASE_TAG, kit_settings
from waiting import EVENTUALLY_S, eventually

from actors.clock import FakeClock
from actors.engine.base import ContainerMissing, ContainerSpec, ContainerState
from actors.engine.memory import MemoryEngine
from actors.labels import LABEL_JOB_ID, MANAGED_FILTER
from actors.messages import GetJob, Reconcile, Submit, Tick
from actors.metrics import Metrics
from actors.model import Job, JobState, validate_spec
from actors.settings import Settings
from actors.store import JobStore, SqliteStore
from actors.watcher import Watcher
from actors.wiring import Actors, Wiring, start_actors

ASK_S = 10.0


def yard_settings(**supervisor: Any) -> Settings:
    return kit_settings(
        retry={"attempts": 3, "backoff_initial_s": 0.5, "backoff_max_s": 4.0},
        supervisor={
            "max_workers": 4,
            "spawners": 2,
            "stop_grace_s": 10.0,
            "orphan_grace_s": 300.0,
            "default_timeout_s": 3600.0,
            **supervisor,
        },
    )


def new_engine(clock: FakeClock) -> MemoryEngine:
    engine = MemoryEngine(clock=clock)
    engine.add_worker_image(BASE_TAG)
    return engine


class Yard:
    """One Supervisor with its SnapshotManager, Spawners and (optionally) a Watcher."""

    def __init__(
        self,
        tmp_path: Path,
        settings: Settings | None = None,
        *,
        clock: FakeClock | None = None,
        engine: MemoryEngine | None = None,
        store: JobStore | None = None,
        watcher: bool = True,
    ) -> None:
        self.clock = clock or FakeClock()
        self.engine = engine or new_engine(self.clock)
        self.settings = settings or yard_settings()
        self.store = store or SqliteStore(tmp_path / "jobs.db", self.clock)
        self.use_watcher = watcher
        self.fatal: list[str] = []
        self.metrics = Metrics.unscraped()
        # The Watcher's backoff sleep: returns at once unless a test holds it.
        self.engine_back = threading.Event()
        self.engine_back.set()
        self.watcher: Watcher | None = None
        self.sup: pykka.ActorRef[Any]
        self.snapshots: pykka.ActorRef[Any]
        self.actors: Actors

    def start(self) -> Yard:
        """The application's wiring, with the timers left to the test (``tick``)."""
        self.actors = start_actors(
            Wiring(
                self.engine,
                self.store,
                self.settings,
                self.clock,
                on_fatal=self.fatal.append,
                watcher=self.use_watcher,
                watcher_sleep=lambda _s: self.engine_back.wait(EVENTUALLY_S),
                run_timers=False,
                metrics=self.metrics,
            )
        )
        assert self.actors.supervisor is not None
        assert self.actors.snapshots is not None
        self.sup, self.snapshots = self.actors.supervisor, self.actors.snapshots
        self.watcher = self.actors.watcher
        return self

    def stop(self) -> None:
        """Like a supervisor process going away: containers keep running."""
        self.actors.stop(ASK_S)

    # --- asking ------------------------------------------------------------

    def submit(self, project: str = "p", work_item: str = "w", **fields: Any) -> Job:
        job: Job = self.sup.ask(Submit(validate_spec(project, work_item, **fields)), timeout=ASK_S)
        return job

    def job(self, job_id: str) -> Job:
        job: Job | None = self.sup.ask(GetJob(job_id), timeout=ASK_S)
        assert job is not None, job_id
        return job

    def wait_state(self, job_id: str, *states: JobState) -> Job:
        return eventually(
            lambda: self.job(job_id),
            lambda j: j.state in states,
            f"job {job_id} to be {'/'.join(states)}",
        )

    def tick(self, advance_s: float = 0.0) -> None:
        """Advance time and deliver a Tick; returns once the Supervisor handled it."""
        now = self.clock.advance(advance_s)
        self.sup.ask(Tick(now), timeout=ASK_S)

    def reconcile_rounds(self, rounds: int = 2) -> None:
        """Sync with the Reaper: after two listings it ran, every removal the
        Supervisor asked for before them has been carried out (FIFO inboxes)."""
        for _ in range(rounds):
            before = len(self.engine.calls_of("list_containers"))
            self.sup.tell(Reconcile())
            eventually(
                lambda: len(self.engine.calls_of("list_containers")),
                lambda n, before=before: n > before,  # type: ignore[misc]
                "a listing by the Reaper",
            )

    # --- the engine's view -------------------------------------------------

    def running(self) -> list[ContainerState]:
        return [c for c in self.engine.list_containers(MANAGED_FILTER) if c.running]

    def exists(self, container_id: str) -> bool:
        try:
            self.engine.inspect_container(container_id)
        except ContainerMissing:
            return False
        return True

    def created_for(self) -> list[str]:
        """The job IDs of every container created, in creation order."""
        specs = [args[0] for args in self.engine.calls_of("create_container")]
        return [s.labels.get(LABEL_JOB_ID, "") for s in specs if isinstance(s, ContainerSpec)]

    def running_job(self, job_id: str) -> Job:
        job = self.wait_state(job_id, JobState.RUNNING)
        assert job.container_id is not None
        return job

    def foreign_container(self, labels: dict[str, str], start: bool = True) -> str:
        cid = self.engine.create_container(ContainerSpec(image=BASE_TAG, labels=labels))
        if start:
            self.engine.start_container(cid)
        return cid
