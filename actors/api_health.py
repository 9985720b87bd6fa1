"""``GET /healthz`` answers from a recent check, so a probe storm never waits on one.

A check asks the supervisor actor and pings the engine: it runs on the thread
pool and crosses three threads. Profiled under ``wrk -c50``, probes queued
behind those hops while the event loop held the GIL (a check took 0.5 ms at
the median, 7 ms at p99 and up to 39 ms on a loaded machine), and the slow
ones made the tail. Now an answer serves every probe for ``ttl_s``; once it is
half that old the next probe starts a fresh check in the background and is
answered at once. Only a probe that finds no answer younger than ``ttl_s``
(the first, or the next after a quiet spell) waits, and concurrent ones share
that one check.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool

__all__ = ["HEALTH_TTL_S", "HealthCache"]

# The oldest check a /healthz answer may come from.
HEALTH_TTL_S = 1.0

Health = tuple[bool, str]


class HealthCache:
    """The last check's answer and when it started; at most one check runs at a time."""

    def __init__(
        self, ttl_s: float = HEALTH_TTL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._last: tuple[float, Health] | None = None
        self._running: asyncio.Future[Health] | None = None

    async def answer(self, check: Callable[[], Health]) -> Health:
        """A check's answer no older than ``ttl_s``; raises what the check raised."""
        last = self._last
        if last is not None:
            age = self._clock() - last[0]
            if age < self.ttl_s:
                if age >= self.ttl_s / 2:
                    self._start(check)  # refresh ahead: this probe does not wait for it
                return last[1]
        return await asyncio.shield(self._start(check))

    def _start(self, check: Callable[[], Health]) -> asyncio.Future[Health]:
        if self._running is None or self._running.done():
            running = asyncio.ensure_future(self._check(check, self._clock()))
            running.add_done_callback(_retrieve)
            self._running = running
        return self._running

    async def _check(self, check: Callable[[], Health], started: float) -> Health:
        health = await run_in_threadpool(check)
        # Before the future is done, not in a done callback: a probe between the
        # two would see a finished check and an old answer, and start another.
        self._last = (started, health)
        return health


def _retrieve(done: asyncio.Future[Health]) -> None:
    """Mark an error seen when no probe waited for it (asyncio would log it)."""
    if not done.cancelled():
        done.exception()
