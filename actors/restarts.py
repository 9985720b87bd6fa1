"""Restart intensity, as OTP's supervisors count it: N restarts within T seconds.

A child that keeps crashing is a bug that restarting will not fix; past the
budget the parent stops with a clear error instead of spinning.
"""

from __future__ import annotations

import collections

__all__ = ["RestartIntensity"]


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
