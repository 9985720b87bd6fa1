"""The Supervisor's cluster half: fencing, waking, and what it says of itself.

A mixin of ``Supervisor``, as ``actors.reconcile`` is. On one host nothing
here ever fires: only the HostLease sends ``Fence``/``Unfence``, and only a
ClusterStore raises ``Fenced``.

- ``Fence``: this host's lease may end before it renews, and then another host
  rescues its jobs. So it claims nothing and kills every worker now (no grace:
  the margin is one heartbeat), and forgets its flights: the store is the
  truth, and it may not be reachable. Handled outside any store transaction.
- ``Unfence``: the lease is renewed. At the next Tick, recover as after a
  restart; a job whose worker this host killed is queued again (its attempt guards the write: if
  it was rescued meanwhile the write raises ``Fenced`` and is dropped).
- ``Fenced`` on any outcome write: the attempt was rescued; drop the flight,
  stop its container if it still runs, never crash.
- ``StoreUnavailable`` mid-message: that message's writes were rolled back, so
  the flights and the store disagree; at a Tick (Spawners idle) the Supervisor
  re-reads its jobs and re-adopts its containers, as after a restart.
"""

from __future__ import annotations

import logging
from typing import Any

from actors import instance
from actors.deadlines import due_times
from actors.flight import Flights
from actors.ledger import Ledger, job_logger
from actors.messages import (
    ActorCrashed,
    ContainerExited,
    ContainersListed,
    Fence,
    Finished,
    GetStatus,
    SpawnFailed,
    Started,
    SupervisorStatus,
    Terminated,
    Unfence,
    WorkAvailable,
)
from actors.model import Job, SnapshotKey
from actors.pool import SpawnerPool
from actors.reconcile import Reconciling
from actors.store.base import StoreUnavailable
from actors.store.cluster import ClusterStore

__all__ = ["NOT_HANDLED", "Fencing"]

log = logging.getLogger("actors.supervisor")


NOT_HANDLED = object()
# Replies and events kept while the store was away, handled again at a Tick.
_REPLIES = (
    Started,
    SpawnFailed,
    ContainerExited,
    Finished,
    Terminated,
    ContainersListed,
    ActorCrashed,
)
MAX_REDO = 10_000


def _no_job(_job_id: str) -> bool:
    return False


class Fencing(Reconciling):
    """Fence, Unfence, WorkAvailable and rescued writes; mixed into ``Supervisor``."""

    _flights: Flights
    _ledger: Ledger
    _pool: SpawnerPool
    _leftovers: dict[str, SnapshotKey]
    _dispatching: bool
    _fenced: bool
    _abandoned: set[str]
    _resync: bool
    _redo: list[Any]

    def _handle(self, message: Any) -> Any:
        raise NotImplementedError

    def _dispatch(self) -> None:
        raise NotImplementedError

    def _cancel(self, job_id: str) -> Job | None:
        raise NotImplementedError

    def _hand_over_cancel(self, job: Job | None) -> None:
        """A cancel of a job this host does not run: record it on the job's row for
        the host that runs it (the database is the only channel between hosts)."""
        store = self._store
        if job is None or job.state.terminal or not isinstance(store, ClusterStore):
            return
        host = store.request_cancel(job.id)
        if host is not None:
            job_logger(job).warning("cancel requested here; handed to host %s, which runs it", host)

    def _cancels_from_elsewhere(self) -> None:
        """Cancel, as a local cancel does, this host's jobs whose cancel another host
        recorded; one not yet stoppable (recovering) is retried at the next Tick."""
        store = self._store
        if not isinstance(store, ClusterStore) or self._fenced:
            return
        for job_id in store.cancel_requests():
            flight = self._flights.get(job_id)
            if flight is None or flight.kill is not None:
                continue
            job_logger(flight.job).warning("cancel requested on another host; cancelling it")
            self._cancel(job_id)

    def _handle_cluster(self, message: Any) -> bool:
        """The cluster's messages; False for any other."""
        match message:
            case WorkAvailable():
                self._cancels_from_elsewhere()
                self._after_change()
            case _:
                return False
        return True

    def _outside_store(self, message: Any) -> Any:
        """Handle what must work with the database cut off: a Fence, its listing, and a
        status without deadlines (health checks); ``NOT_HANDLED`` for the rest."""
        match message:
            case GetStatus(deadlines=False):
                return self._status()
            case Fence(reason=reason):
                self._fence(reason)
            case Unfence():
                self._unfence()
            case ContainersListed(reason="fence", error=None, containers=containers):
                if self._fenced:
                    # Only labelled ours: an unlabelled one would need the store to judge.
                    for container in instance.mine(containers, self._sup.instance_id, _no_job):
                        if container.running:
                            self._remove_container(container.id, 0.0, "host fenced")
            case ContainersListed(reason="fence"):
                log.warning("fenced, and the engine did not list its containers: %s", message.error)
            case _:
                return NOT_HANDLED
        return None

    def _fence(self, reason: str) -> None:
        """Stop claiming and kill every worker; touches no store (it may be unreachable)."""
        if self._fenced:
            return
        self._fenced = True
        log.error("fenced (%s): claiming nothing, stopping %d job(s)", reason, len(self._flights))
        for flight in self._flights:
            self._abandoned.add(flight.id)
            self._flights.remove(flight.id)
            job_logger(flight.job).warning("stopping its worker: this host is fenced")
            # A finishing one has exited: its Spawner commits and removes it.
            if flight.container_id is not None and flight.phase != "finishing":
                self._remove_container(flight.container_id, 0.0, "host fenced")
        # Containers no flight knows of (leftovers, recovering jobs): the listing kills them.
        self._request_listing("fence")
        self._ledger.publish()

    def _unfence(self) -> None:
        """Outside any transaction too: the recovery itself waits for the next Tick,
        which retries it until the store answers (``_catch_up``)."""
        if not self._fenced:
            return
        self._fenced = False
        self._resync = True
        log.warning("lease renewed: recovering this host's jobs at the next Tick")

    def _store_lost(self, exc: Exception, message: Any, handled: bool) -> None:
        """A message failed with the database away. Never begun (its transaction
        could not start): kept, and handled again at a Tick. Begun: its writes were
        rolled back while the flights moved on (a Started recorded nowhere): resync."""
        if not isinstance(exc, StoreUnavailable):
            return
        if not handled:
            if isinstance(message, _REPLIES) and len(self._redo) < MAX_REDO:
                self._redo.append(message)
            return
        if not self._resync:
            self._resync = True
            log.warning("the store was lost mid-message; re-reading this host's jobs at a Tick")

    def _catch_up(self) -> None:
        """At a Tick (the store answers again): first the replies kept while it was
        away, then, once no Spawner operation is under way (nothing is claimed
        meanwhile), recover as after a restart: the store's jobs, then a listing
        re-adopts the containers, which keep running."""
        while self._redo:
            self._handle(self._redo.pop(0))
        if not self._resync or self._fenced or self._pool.load() > 0:
            return
        jobs = self._store.unfinished()
        self._resync = False
        for flight in self._flights:
            self._flights.remove(flight.id)
        self._ledger.load()
        self._recover(jobs, None)
        # Jobs whose workers a fence killed: re-queued by the listing, if still ours.
        self._abandoned &= {f.id for f in self._flights}
        self._request_listing("recover")

    def _dropped(self, job: Job) -> None:
        """The Ledger's answer to ``Fenced``: another host owns this job now."""
        job_logger(job).warning(
            "attempt %s was rescued by the cluster; dropping it here",
            getattr(job, "attempt", "?"),
        )
        flight = self._flights.remove(job.id)
        self._abandoned.discard(job.id)
        if flight is not None and flight.container_id is not None and flight.phase != "finishing":
            self._remove_container(flight.container_id, 0.0, "its job was rescued elsewhere")

    def _started_unknown(self, msg: Started) -> None:
        """A Started for no flight of ours: re-queued after its Spawner was presumed
        dead (the orphan sweep's, after its grace), or abandoned by a fence (killed now)."""
        if self._fenced or msg.job_id in self._abandoned:
            log.warning(
                "job %s started on a fenced host; stopping %s", msg.job_id, msg.container_id
            )
            self._remove_container(msg.container_id, 0.0, "host fenced")
            return
        log.warning("started container %s for unknown job %s", msg.container_id, msg.job_id)

    def _status(self, deadlines: bool = False) -> SupervisorStatus:
        return SupervisorStatus(
            queued=self._ledger.queued,
            in_flight=len(self._flights),
            running=len(self._flights.in_phase("running")),
            pending_ops=self._pool.load(),
            spawners=len(self._pool.refs),
            dispatching=self._dispatching and not self._fenced,
            due=due_times(
                self._flights,
                self._store.unfinished(),
                self._clock.now(),
                self._sup.stop_grace_s,
                self._reconcile_requested,
            )
            if deadlines
            else (),
            busy_keys=frozenset(f.job.key for f in self._flights)
            | frozenset(self._leftovers.values()),
            leftovers=len(self._leftovers),
            fenced=self._fenced,
        )
