"""Snapyard's benchmark harness: ``python -m bench [--scenario NAME ...] [--quick]``.

Speed and memory targets are checked here, not in timed unit tests. Each
scenario compares Snapyard side by side, in one run, with plain docker-py at
the same concurrency (``bench.peers.raw``) or with the script users write
instead (``bench.peers.naive``), so a slower or busier machine moves both
sides and the ratio stays comparable. Scenarios are listed in
``bench.scenarios``; the runner reports each target as met or missed and
compares each figure with ``bench/baselines.json``.
"""

from __future__ import annotations

from bench.model import Figure, ScenarioResult
from bench.scenarios import SCENARIOS

__all__ = ["SCENARIOS", "Figure", "ScenarioResult"]
