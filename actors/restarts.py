"""Restart intensity, as OTP's supervisors count it: N restarts within T seconds.

A child that keeps crashing is a bug that restarting will not fix; past the
budget the parent stops with a clear error instead of spinning. Every actor
has a parent that counts its crashes: the Supervisor for the Spawners, the
``Root`` for the SnapshotManager and the Reaper.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any

import pykka

from actors.clock import Clock
from actors.messages import ActorCrashed, Supervise

__all__ = ["RestartIntensity", "Root"]

log = logging.getLogger(__name__)


class RestartIntensity:
    def __init__(self, max_restarts: int, window_s: float) -> None:
        self.max_restarts = max_restarts
        self.window_s = window_s
        self._times: collections.deque[float] = collections.deque()

    def record(self, now: float) -> bool:
        """Count one restart at ``now``; False when it exceeds the budget."""
        self._times.append(now)
        while self._times and self._times[0] < now - self.window_s:
            self._times.popleft()
        return len(self._times) <= self.max_restarts

    @property
    def recent(self) -> int:
        return len(self._times)

    def describe(self) -> str:
        return f"{self.recent} times within {self.window_s:g}s (restart_max = {self.max_restarts})"


class Root(pykka.ThreadingActor):
    """The root of the supervision tree: the parent of the SnapshotManager and the Reaper.

    A child that hits a bug restarts itself in place (its state is a cache of
    the engine's truth, rebuilt from labels, and its address and inbox stay
    valid for everyone holding them) and reports the crash here, as every
    child reports to its parent. This parent counts the crashes against one
    bounded intensity, as an OTP supervisor does; past it, it says why
    (``on_fatal``) and stops the child, and the application stops. A child
    that died outside a message (its start failed) is fatal at once.
    The Spawners' parent is the Supervisor, with the same policy.
    """

    def __init__(
        self,
        intensity: RestartIntensity,
        clock: Clock,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        self._intensity = intensity
        self._clock = clock
        self._on_fatal = on_fatal
        self._children: dict[str, pykka.ActorRef[Any]] = {}
        self.failed: str | None = None

    def on_receive(self, message: Any) -> Any:
        match message:
            case Supervise(name=name, ref=ref):
                self._children[name] = ref
            case ActorCrashed():
                self._on_crashed(message)
            case _:
                log.warning("root: unexpected message %r", message)
        return None

    def _on_crashed(self, crash: ActorCrashed) -> None:
        # Counted even before its Supervise arrives: a crash in on_start races it.
        if self.failed is not None:
            return
        if crash.restarted:
            log.error("%s crashed (%s); it restarted in place", crash.name, crash.error)
            if self._intensity.record(self._clock.now()):
                return
            self.failed = (
                f"the {crash.name} failed {self._intensity.describe()}; "
                f"the last error: {crash.error}"
            )
        else:
            # Dead outside a message (its start failed): everyone holds its
            # address, so a new incarnation would reach no one. Stop, and say why.
            self.failed = f"the {crash.name} died and cannot be restarted: {crash.error}"
        log.critical("%s; stopping it", self.failed)
        if self._on_fatal is not None:
            try:
                self._on_fatal(self.failed)
            except Exception:
                log.exception("on_fatal callback failed")
        child = self._children.get(crash.name)
        if child is not None:
            child.stop(block=False)
