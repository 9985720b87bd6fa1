"""Every timer in Snapyard, in one place: pykka has none, so we add one small scheduler.

A timer is "tell this actor this message every N seconds". Due times are read
from the injected Clock, so a test advances a FakeClock and calls
``run_due()``; in production ``start()`` runs a daemon thread that calls
``run_due()`` at a fixed real-time granularity. The scheduler only ever
``tell``s: it never waits on an actor, so a slow actor cannot stall the others'
timers, and a dead one only cancels its own timer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka

from actors.clock import Clock

__all__ = ["Scheduler", "Timer"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Timer:
    """One periodic message. ``cancel()`` is safe from any thread, at any time."""

    interval_s: float
    target: pykka.ActorRef[Any]
    message_factory: Callable[[float], object]
    due: float
    cancelled: bool = False
    fired: int = 0

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    """Sends periodic messages to actors; time comes from the Clock."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._timers: list[Timer] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def every(
        self,
        interval_s: float,
        target: pykka.ActorRef[Any],
        message_factory: Callable[[float], object],
        first_after_s: float | None = None,
    ) -> Timer:
        """Tell ``target`` ``message_factory(now)`` every ``interval_s`` seconds.

        The first message is due ``first_after_s`` from now (default: one
        interval), which is how a sweep waits out a start-up grace period.
        """
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, not {interval_s}")
        first = interval_s if first_after_s is None else max(0.0, first_after_s)
        timer = Timer(interval_s, target, message_factory, self._clock.now() + first)
        with self._lock:
            self._timers.append(timer)
        return timer

    def run_due(self, now: float | None = None) -> int:
        """Send every message that is due at ``now`` (default: the clock's now); return how many."""
        now = self._clock.now() if now is None else now
        with self._lock:
            self._timers = [t for t in self._timers if not t.cancelled]
            due = [t for t in self._timers if t.due <= now]
            for timer in due:
                # A late run sends once, not once per missed interval: a burst of
                # stale Ticks after a pause would only repeat the same work.
                timer.due += timer.interval_s
                if timer.due <= now:
                    timer.due = now + timer.interval_s
        sent = 0
        for timer in due:
            try:
                timer.target.tell(timer.message_factory(now))
            except pykka.ActorDeadError:
                log.info("timer target %s is gone; cancelling its timer", timer.target)
                timer.cancel()
                continue
            except Exception:
                # One broken factory must not stop the other timers.
                log.exception("timer for %s failed", timer.target)
                continue
            timer.fired += 1
            sent += 1
        return sent

    def start(self, granularity_s: float = 1.0) -> None:
        """Run ``run_due`` every ``granularity_s`` real seconds on a daemon thread."""
        if self._thread is not None:
            return
        if granularity_s <= 0:
            raise ValueError(f"granularity_s must be > 0, not {granularity_s}")
        self._stop.clear()

        def loop() -> None:
            # The wait is on real time by design (it is the scheduler's own
            # heartbeat); what is due is decided by the injected clock.
            while not self._stop.wait(granularity_s):
                try:
                    self.run_due()
                except Exception:  # pragma: no cover - run_due already catches
                    log.exception("scheduler tick failed")

        self._thread = threading.Thread(target=loop, name="snapyard-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread (if started) and cancel every timer."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)
        with self._lock:
            for timer in self._timers:
                timer.cancel()
            self._timers.clear()

    @property
    def timers(self) -> list[Timer]:
        with self._lock:
            return [t for t in self._timers if not t.cancelled]
