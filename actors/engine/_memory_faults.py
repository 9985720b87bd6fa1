"""Fault injection and the call log: the MemoryEngine layer that lets a test
put a failure exactly between two engine calls, where the races this project
exists to survive happen."""

from __future__ import annotations

import copy
import threading
from collections import deque
from collections.abc import Callable

from actors.clock import Clock, SystemClock
from actors.engine.base import Engine, EngineError, EngineUnavailable

__all__ = ["FaultInjection"]

# ``describe`` never talks to the engine, so there is nothing to inject into it.
_ENGINE_METHODS = frozenset(
    name
    for name in dir(Engine)
    if not name.startswith("_") and callable(getattr(Engine, name)) and name != "describe"
)


class FaultInjection:
    """Records every engine call and applies the faults injected for it.

    The bottom layer of MemoryEngine: it owns the lock every layer above shares,
    so a hook and the state it inspects agree.
    """

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or SystemClock()
        self.calls: list[tuple[str, tuple[object, ...]]] = []
        self._lock = threading.RLock()
        self._failures: dict[str, deque[EngineError]] = {}
        self._hooks: dict[str, list[tuple[Callable[[], None], bool]]] = {}
        self._delays: dict[str, float] = {}
        self._unavailable = False

    def describe(self) -> str:
        return "memory://"

    def fail_next(self, method: str, times: int = 1, error: EngineError | None = None) -> None:
        """Make the next ``times`` calls of ``method`` raise ``error``."""
        self._check_method(method)
        error = error or EngineUnavailable("injected: engine unavailable")
        with self._lock:
            pending = self._failures.setdefault(method, deque())
            pending.extend(copy.copy(error) for _ in range(times))

    def before(self, method: str, hook: Callable[[], None], once: bool = True) -> None:
        """Run ``hook`` right before ``method`` executes, outside the engine lock.

        The hook may call the engine (``delete_image_behind_back`` is the usual
        one), which is how a test deletes an image between two steps of a spawn.
        """
        self._check_method(method)
        with self._lock:
            self._hooks.setdefault(method, []).append((hook, once))

    def delay(self, method: str, seconds: float) -> None:
        """``clock.sleep(seconds)`` before every call of ``method``; 0 removes the delay."""
        self._check_method(method)
        with self._lock:
            if seconds > 0:
                self._delays[method] = seconds
            else:
                self._delays.pop(method, None)

    def calls_of(self, method: str) -> list[tuple[object, ...]]:
        """The arguments of every recorded call of ``method``."""
        with self._lock:
            return [args for name, args in self.calls if name == method]

    def _check_method(self, method: str) -> None:
        if method not in _ENGINE_METHODS:
            raise ValueError(
                f"{method!r} is not an Engine method; one of: {', '.join(sorted(_ENGINE_METHODS))}"
            )

    def _enter(self, method: str, *args: object) -> None:
        """Record the call, then apply the faults injected for it, in call order."""
        with self._lock:
            self.calls.append((method, args))
            hooks = self._hooks.get(method, [])
            due = [hook for hook, _ in hooks]
            self._hooks[method] = [(hook, once) for hook, once in hooks if not once]
            pause = self._delays.get(method, 0.0)
        if pause:
            self.clock.sleep(pause)
        for hook in due:
            hook()
        with self._lock:
            if self._unavailable:
                raise EngineUnavailable(f"{self.describe()}: engine unavailable (injected)")
            pending = self._failures.get(method)
            if pending:
                raise pending.popleft()
