"""A followed container log, in memory: Docker's ``logs --follow`` semantics.

It replays the output from the first line, then waits on the engine's
condition for more; it ends once the container has stopped (or is removed)
and every line written before that was delivered, as the daemon's does.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator

from actors.engine._memory_records import MemoryContainer

__all__ = ["MemoryLogStream"]


class MemoryLogStream:
    """One follower of one container's output; ``close()`` from any thread ends it."""

    def __init__(self, record: MemoryContainer, changed: threading.Condition) -> None:
        self._record = record
        self._changed = changed
        self._closed = False

    def __iter__(self) -> Iterator[str]:
        sent = 0
        while True:
            with self._changed:
                # A stopped container's remaining lines still go out, then the end.
                self._changed.wait_for(functools.partial(self._ready, sent))
                if self._closed:
                    return
                lines = [line for _stream, line in self._record.log[sent:]]
                sent += len(lines)
                stopped = self._record.status != "running" or self._record.removed
            if lines:
                yield "".join(lines)
            elif stopped:
                return

    def _ready(self, sent: int) -> bool:
        record = self._record
        return (
            self._closed or len(record.log) > sent or record.status != "running" or record.removed
        )

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
