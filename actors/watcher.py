"""Watcher: the engine's event stream, turned into messages.

A thread, not an actor: iterating the event stream blocks, and a blocked
actor could not even handle its own stop request. The Watcher only ``tell``s,
so it can never deadlock with the actors it feeds.

- ``container_exited`` of a managed container -> ``ContainerExited`` to the
  Supervisor (an OOM event before it marks that exit as OOM).
- ``image_deleted`` -> ``ImageDeleted`` to the SnapshotManager, so a snapshot
  is invalidated before any Spawner hits the 404. ``image_untagged`` is not
  forwarded: a tag moving does not mean the image is gone.

When the stream breaks it reconnects with backoff and tells the Supervisor
``Reconcile()``: an exit that happened while nobody was listening is then
found by listing the containers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pykka

from actors.backoff import backoff, delay_after
from actors.clock import Clock
from actors.engine.base import Engine, EngineEvent, EngineUnavailable, EventStream
from actors.labels import LABEL_MANAGED
from actors.messages import ContainerExited, ImageDeleted, Reconcile
from actors.settings import RetrySettings
from actors.telemetry import capture_error

__all__ = ["Watcher"]

log = logging.getLogger(__name__)

# Remembered OOM marks are dropped past this many: an OOM whose exit never
# came (the container was removed) must not grow the set forever.
_MAX_OOM_MARKS = 10_000


class Watcher:
    """Follows ``engine.events`` on a daemon thread until ``stop()``."""

    def __init__(
        self,
        engine: Engine,
        supervisor: pykka.ActorRef[Any],
        snapshots: pykka.ActorRef[Any],
        clock: Clock,
        since: float | None = None,
        retry: RetrySettings | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        """``since``: replay events from this time on (the moment recovery listed
        the containers), so nothing between that listing and this stream is missed.
        ``retry`` sets the reconnect backoff (the one policy, ``actors.backoff``);
        ``sleep`` defaults to ``clock.sleep``: it waits that backoff."""
        self._engine = engine
        self._supervisor = supervisor
        self._snapshots = snapshots
        self._clock = clock
        self._since = since
        self._backoff = backoff(retry or RetrySettings())
        self._sleep = sleep or clock.sleep
        self._lock = threading.Lock()
        self._stream: EventStream | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._oom: set[str] = set()
        self.connected = threading.Event()
        self.reconnects = 0

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="snapyard-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close the stream (which unblocks the iteration) and join the thread."""
        self._stopped.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            try:
                stream.close()
            except Exception as exc:  # closing a broken stream is not our problem
                log.debug("closing the event stream: %s", exc)
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- the thread --------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stopped.is_set():
            try:
                stream = self._engine.events(since=self._since)
            except Exception as exc:
                failures += 1
                self._broken(exc, failures)
                continue
            with self._lock:
                self._stream = stream
            if self._stopped.is_set():  # stop() ran before we published the stream
                stream.close()
                break
            if failures or self.reconnects:
                # Back after a break: whatever exited meanwhile is found by a listing.
                self._tell(self._supervisor, Reconcile())
            failures = 0
            self.connected.set()
            try:
                for event in stream:
                    self._since = event.time
                    self._on_event(event)
                if self._stopped.is_set():
                    break
                raise EngineUnavailable("the event stream ended")
            except Exception as exc:
                if self._stopped.is_set():
                    break
                failures += 1
                self._broken(exc, failures)
            finally:
                self.connected.clear()
                with self._lock:
                    self._stream = None
        log.debug("watcher stopped")

    def _broken(self, exc: Exception, failures: int) -> None:
        if self._stopped.is_set():
            return
        self.reconnects += 1
        if isinstance(exc, EngineUnavailable):
            log.warning("event stream broken (%s); reconnecting", exc)
        else:
            log.exception("event stream failed; reconnecting")
            capture_error(exc, source="watcher")
        self._sleep(delay_after(self._backoff, failures))

    def _on_event(self, event: EngineEvent) -> None:
        match event.kind:
            case "container_oom" if self._managed(event):
                if len(self._oom) >= _MAX_OOM_MARKS:
                    self._oom.clear()
                self._oom.add(event.id)
            case "container_exited" if self._managed(event):
                oom = event.id in self._oom
                self._oom.discard(event.id)
                code = event.exit_code if event.exit_code is not None else -1
                self._tell(self._supervisor, ContainerExited(event.id, code, oom))
            case "image_deleted":
                self._tell(self._snapshots, ImageDeleted(event.id))
            case _:
                pass  # image_untagged, and containers that are not ours

    @staticmethod
    def _managed(event: EngineEvent) -> bool:
        return event.labels.get(LABEL_MANAGED) == "true"

    def _tell(self, ref: pykka.ActorRef[Any], message: object) -> None:
        try:
            ref.tell(message)
        except pykka.ActorDeadError:
            log.debug("watcher: %s is gone; dropped %s", ref, type(message).__name__)
