"""The Waker: a thread that turns the store's LISTEN/NOTIFY into ``WorkAvailable``.

A job submitted on another host (or rescued) is claimable at once; without
this the Supervisor would only claim it at its next Tick. The wait blocks,
so it runs on its own thread, never in an actor's inbox; the Tick still
claims too, so a lost notification costs one tick interval at most.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pykka

from actors.messages import WorkAvailable

__all__ = ["Waker"]

log = logging.getLogger(__name__)


class Waker:
    def __init__(
        self,
        wait_for_work: Callable[[float], bool],
        supervisor: pykka.ActorRef[Any],
        timeout_s: float,
    ) -> None:
        """``wait_for_work(timeout)`` returns True when the store was notified of work."""
        self._wait = wait_for_work
        self._supervisor = supervisor
        self._timeout_s = timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.wakes = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="snapyard-waker", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                woken = self._wait(self._timeout_s)
            except Exception as exc:
                # The database is away: the Tick claims meanwhile; try again later.
                log.warning("waiting for work notifications failed: %s", exc)
                self._stop.wait(self._timeout_s)
                continue
            if not woken or self._stop.is_set():
                continue
            self.wakes += 1
            try:
                self._supervisor.tell(WorkAvailable())
            except pykka.ActorDeadError:
                return
