"""Snapyard's benchmark harness: ``python -m bench [--scenario NAME ...] [--quick]``.

Speed and memory targets are checked here, not in timed unit tests. Every
figure is a ratio against a baseline measured in the same process, so a
slower machine moves both sides and the ratio stays comparable; the runner
compares each figure with ``bench/baselines.json`` (``--check`` fails on a
regression past the tolerance).
"""

from __future__ import annotations

from bench.model import Figure, ScenarioResult
from bench.scenarios import SCENARIOS

__all__ = ["SCENARIOS", "Figure", "ScenarioResult"]
