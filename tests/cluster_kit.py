"""Hosts of a cluster on one machine: real actors on MemoryEngines, one real PostgreSQL.

Each ``Host`` is a host's whole wiring (``actors.wiring.start_actors`` with
``Wiring.cluster``) on its own MemoryEngine, its own ``PostgresStore`` (its host
ID) and one shared FakeClock; the engines share one MemoryRegistry. A host's
database connection runs through a ``Cable`` (a TCP proxy the test cuts), so a
partition is a real lost connection, not a patched method. Timers are the
test's: ``beat`` sends the HostLease its Beat and waits for the renewal.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pykka
from actor_kit import BASE_TAG, kit_settings
from waiting import eventually

from actors.clock import FakeClock
from actors.cluster.lease import LeaseStatus
from actors.engine.base import ContainerState
from actors.engine.memory import MemoryEngine, MemoryRegistry
from actors.labels import LABEL_JOB_ID, MANAGED_FILTER
from actors.messages import Beat, GetJob, GetLease, GetStatus, ShipSnapshots, Submit, Tick
from actors.model import Job, JobState, validate_spec
from actors.settings import Settings
from actors.store.postgres import PostgresStore
from actors.wiring import Actors, ClusterWiring, Wiring, start_actors

REGISTRY = "127.0.0.1:5000"
ASK_S = 10.0
LEASE_S, BEAT_S = 6.0, 1.0


class Cable:
    """A TCP proxy to ``target`` on a loopback port; ``cut()`` drops every connection
    and refuses new ones until ``mend()``: a partition between a host and its database."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._cut = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, name="cable", daemon=True).start()

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open.clear()

    def mend(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._cut.is_set():
                client.close()
                continue
            try:
                server = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, server]
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        try:
            selector.register(a, selectors.EVENT_READ, b)
            selector.register(b, selectors.EVENT_READ, a)
            while True:
                for key, _ in selector.select(timeout=1.0):
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data.sendall(data)
        except (OSError, ValueError):
            return
        finally:
            selector.close()
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.close()


def via(url: str, port: int) -> str:
    """``url`` with its port replaced: the same database, reached through a Cable."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit(":", 1)[0] + f":{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def cluster_settings(url: str, **supervisor: Any) -> Settings:
    settings = kit_settings(
        retry={"attempts": 3, "backoff_initial_s": 0.5, "backoff_max_s": 4.0},
        supervisor={
            "spawners": 2,
            "stop_grace_s": 10.0,
            "orphan_grace_s": 300.0,
            "default_timeout_s": 3600.0,
            **supervisor,
        },
    )
    return settings.replace(
        cluster={
            "database_url": url,
            "registry": REGISTRY,
            "heartbeat_s": BEAT_S,
            "lease_s": LEASE_S,
            "locality_wait_s": 30.0,
        }
    )


class Host:
    """One cluster host: its engine, store, actors; its database behind a Cable."""

    def __init__(
        self,
        name: str,
        url: str,
        clock: FakeClock,
        registry: MemoryRegistry,
        base: str,
        max_workers: int = 2,
    ) -> None:
        """``base``: the base image's registry reference (``shared_base``)."""
        self.name = name
        self.clock = clock
        self.engine = MemoryEngine(clock=clock, registry=registry)
        self.registry = registry
        server = urlsplit(url)
        self.cable = Cable(server.hostname or "127.0.0.1", server.port or 5432)
        self.settings = cluster_settings(via(url, self.cable.port), max_workers=max_workers)
        self.store = PostgresStore(self.settings.cluster.database_url, name, clock, 30.0)
        self.actors: Actors | None = None
        self.started = False
        self.fatal: list[str] = []
        # The base image as `docker save | load` brings it: the same ID on every host.
        self.base_id = self.engine.pull_image(base)
        self.engine.tag_image(self.base_id, *BASE_TAG.split(":"))

    def start(self) -> Host:
        """Start the host's actors; a restart is a new process, with a new store."""
        if self.started:
            self.store.close()
            self.store = PostgresStore(self.settings.cluster.database_url, self.name, self.clock)
        self.started = True
        self.actors = start_actors(
            Wiring(
                self.engine,
                self.store,
                self.settings,
                self.clock,
                on_fatal=self.fatal.append,
                run_timers=False,
                cluster=ClusterWiring(
                    self.store,
                    mover=self.engine,
                    delete_manifest=self.registry.delete_manifest,
                    api=f"{self.name}:8750",
                    wait_for_work=self.store.wait_for_work,
                ),
            )
        )
        # As the app does: started means recovered (its on_start has run).
        self.sup.ask(GetStatus(), timeout=ASK_S)
        return self

    def die(self) -> None:
        """The process is gone (no cleanup: containers stay, the lease is not renewed)."""
        if self.actors is not None:
            self.actors.stop(ASK_S)
            self.actors = None

    def close(self) -> None:
        self.die()
        self.store.close()
        self.cable.close()

    # --- actors -------------------------------------------------------------

    @property
    def sup(self) -> pykka.ActorRef[Any]:
        assert self.actors is not None
        assert self.actors.supervisor is not None
        return self.actors.supervisor

    def submit(self, work_item: str = "w", project: str = "p") -> Job:
        job: Job = self.sup.ask(Submit(validate_spec(project, work_item)), timeout=ASK_S)
        return job

    def job(self, job_id: str) -> Job:
        job: Job | None = self.sup.ask(GetJob(job_id), timeout=ASK_S)
        assert job is not None
        return job

    def lease(self) -> LeaseStatus:
        assert self.actors is not None
        assert self.actors.lease is not None
        status = self.actors.lease.ask(GetLease(), timeout=ASK_S)
        assert isinstance(status, LeaseStatus)
        return status

    def beat(self) -> LeaseStatus:
        """A Beat at the clock's now; returns once the renewal it started has ended."""
        before = self.lease()
        assert self.actors is not None
        assert self.actors.lease is not None
        self.actors.lease.ask(Beat(self.clock.now()), timeout=ASK_S)
        return eventually(
            self.lease,
            lambda s: s.renewals + s.failures > before.renewals + before.failures,
            f"{self.name}'s renewal to end",
            timeout_s=30.0,
        )

    def tick(self) -> None:
        self.sup.ask(Tick(self.clock.now()), timeout=ASK_S)

    def ship(self) -> None:
        assert self.actors is not None
        assert self.actors.shipper is not None
        self.actors.shipper.ask(ShipSnapshots(self.clock.now()), timeout=ASK_S)

    def fenced(self) -> bool:
        return bool(self.sup.ask(GetStatus(), timeout=ASK_S).fenced)

    # --- the engine's view ---------------------------------------------------

    def running(self, job_id: str | None = None) -> list[ContainerState]:
        found = [c for c in self.engine.list_containers(MANAGED_FILTER) if c.running]
        return [c for c in found if job_id is None or c.labels.get(LABEL_JOB_ID) == job_id]

    def created_for(self, job_id: str) -> int:
        specs = [args[0] for args in self.engine.calls_of("create_container")]
        return sum(1 for s in specs if s.labels.get(LABEL_JOB_ID) == job_id)

    def wait_running(self, job_id: str) -> ContainerState:
        return eventually(lambda: self.running(job_id), bool, f"{job_id} running on {self.name}")[0]


def shared_base(clock: FakeClock, registry: MemoryRegistry) -> str:
    """The base image, pushed once so every host loads the same image ID; its reference."""
    seed = MemoryEngine(clock=clock, registry=registry)
    return seed.push_image(seed.add_worker_image(BASE_TAG), f"{REGISTRY}/base")


def finished(store: PostgresStore, job_id: str) -> Job:
    return eventually(
        lambda: store.get(job_id),
        lambda j: j is not None and j.state.terminal,
        f"{job_id} to finish",
        timeout_s=30.0,
    )  # type: ignore[return-value]


__all__ = ["BEAT_S", "LEASE_S", "Cable", "Host", "JobState", "finished", "shared_base"]
