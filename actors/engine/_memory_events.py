"""Docker's event stream, in memory: a bounded history for ``since`` replays
and one queue per open stream."""

from __future__ import annotations

import queue
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence

from actors.clock import Clock
from actors.engine._memory_faults import FaultInjection
from actors.engine.base import EngineEvent, EngineUnavailable, EventKind

__all__ = ["EventLog", "MemoryEventStream"]

# The daemon keeps only this many events for ``since`` replays (events.go).
_EVENT_BACKLOG = 256


class _Closed:
    """Sentinel that ends an event stream's iteration."""


class MemoryEventStream:
    """One subscriber's events; an EngineUnavailable pushed in is raised to it."""

    def __init__(
        self, on_close: Callable[[MemoryEventStream], None], backlog: Sequence[EngineEvent]
    ) -> None:
        self._on_close = on_close
        self._queue: queue.SimpleQueue[EngineEvent | EngineUnavailable | _Closed] = (
            queue.SimpleQueue()
        )
        for event in backlog:
            self._queue.put(event)

    def push(self, item: EngineEvent | EngineUnavailable) -> None:
        self._queue.put(item)

    def queued(self) -> int:
        """Items pushed and not read yet (approximate while others push)."""
        return self._queue.qsize()

    def __iter__(self) -> Iterator[EngineEvent]:
        while True:
            item = self._queue.get()
            if isinstance(item, _Closed):
                return
            if isinstance(item, EngineUnavailable):
                raise item
            yield item

    def close(self) -> None:
        self._on_close(self)
        self._queue.put(_Closed())


class EventLog(FaultInjection):
    """The MemoryEngine layer that emits events and serves ``events()``."""

    def __init__(self, clock: Clock | None = None) -> None:
        super().__init__(clock)
        self._history: deque[EngineEvent] = deque(maxlen=_EVENT_BACKLOG)
        self._streams: list[MemoryEventStream] = []

    def events(self, since: float | None = None) -> MemoryEventStream:
        self._enter("events", since)
        with self._lock:
            backlog = [] if since is None else [e for e in self._history if e.time >= since]
            stream = MemoryEventStream(self._unsubscribe, backlog)
            self._streams.append(stream)
            return stream

    def _unsubscribe(self, stream: MemoryEventStream) -> None:
        with self._lock:
            if stream in self._streams:
                self._streams.remove(stream)

    def _emit(
        self,
        kind: EventKind,
        object_id: str,
        exit_code: int | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """Record and fan out one event (the caller holds the lock)."""
        event = EngineEvent(
            kind=kind,
            id=object_id,
            time=self.clock.now(),
            exit_code=exit_code,
            labels=dict(labels or {}),
        )
        self._history.append(event)
        for stream in self._streams:
            stream.push(event)
