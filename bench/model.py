"""What a scenario returns: named figures, the raw samples behind them, its parameters."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["Figure", "ScenarioResult", "median", "percentile", "rss_bytes"]

Better = Literal["lower", "higher"]


@dataclass(frozen=True)
class Figure:
    """One reported number. ``checked`` figures take part in ``--check``.

    Only ratios are checked: absolute times and sizes move with the machine,
    a ratio against a same-process baseline should not.
    """

    name: str
    value: float
    unit: str
    better: Better
    checked: bool = False
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Figure:
        return cls(**data)


@dataclass
class ScenarioResult:
    name: str
    title: str
    figures: list[Figure]
    # Raw samples (seconds unless the key says otherwise), for the plot and for re-analysis.
    samples: dict[str, list[float]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # Figure name -> (operator, value): the targets, reported as met or missed.
    targets: dict[str, tuple[str, float]] = field(default_factory=dict)

    def figure(self, name: str) -> Figure:
        for figure in self.figures:
            if figure.name == name:
                return figure
        raise KeyError(f"{self.name} has no figure {name!r}")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["figures"] = [f.to_json() for f in self.figures]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScenarioResult:
        data = dict(data)
        data["figures"] = [Figure.from_json(f) for f in data["figures"]]
        data["targets"] = {k: (op, float(v)) for k, (op, v) in data.get("targets", {}).items()}
        return cls(**data)

    def verdicts(self) -> dict[str, bool]:
        """Figure name -> whether it meets its target (only figures that have one)."""
        out = {}
        for name, (op, limit) in self.targets.items():
            value = self.figure(name).value
            out[name] = value <= limit if op == "<=" else value >= limit
        return out


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def rss_bytes() -> int:
    """This process's resident set size (VmRSS in /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status (not Linux?)")
