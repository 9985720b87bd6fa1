"""The results as PNG plots, drawn with matplotlib (the ``bench`` extra).

``throughput.png``: jobs/s against concurrency, Snapyard, raw and naive on one
chart. ``latency.png``: the latency distributions (empirical CDFs) of the
paired scenarios. ``growth.png``: dispatch rate against queue length and the
registry's lookup and sweep against its size. A plot whose scenarios did not
run is not drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server

import matplotlib.pyplot as plt

from bench.model import ScenarioResult

__all__ = ["render_pngs"]

_COLORS = {"snapyard": "#dd8452", "raw": "#4c72b0", "naive": "#55a868", "other": "#8172b3"}


def _cdf(axis: plt.Axes, values: Sequence[float], label: str, color: str) -> None:
    if not values:
        return
    ordered = sorted(v * 1e3 for v in values)
    fractions = [0.0] + [(i + 1) / len(ordered) for i in range(len(ordered))]
    axis.step(
        [ordered[0], *ordered],
        fractions,
        where="post",
        color=color,
        label=f"{label} (n={len(ordered)})",
    )
    axis.set_ylim(0, 1.02)


def _throughput(result: ScenarioResult, path: Path, subtitle: str) -> Path:
    levels = result.params["levels"]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for side in ("snapyard", "raw", "naive"):
        axis.plot(
            levels,
            result.samples[f"{side}_jobs_per_s"],
            marker="o",
            label=side,
            color=_COLORS[side],
        )
    axis.set_xscale("log", base=2)
    axis.set_xticks(levels, [str(level) for level in levels])
    axis.set_xlabel("concurrency (worker places / threads)")
    axis.set_ylabel("jobs/s")
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend()
    axis.set_title(
        f"Throughput, {result.params['jobs']} trivial jobs per level\n{subtitle}", fontsize=10
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


_LATENCY_PANELS = {
    "dispatch": (
        "1. slot free -> running vs raw create+start",
        [("snapyard_s", "snapyard"), ("raw_s", "raw")],
    ),
    "exit_detection": (
        "6. exit -> recorded vs wait() returns",
        [("snapyard_s", "snapyard"), ("wait_s", "raw")],
    ),
    "snapshot_value": (
        "4. submit -> finished: base vs hit",
        [("base_s", "raw"), ("hit_s", "snapyard")],
    ),
    "stale_snapshot": (
        "5. stale vs base run",
        [
            ("base_404_s", "raw"),
            ("stale_404_s", "snapyard"),
            ("stale_event_s", "other"),
            ("naive_stale_s", "naive"),
        ],
    ),
}


def _latency(results: dict[str, ScenarioResult], path: Path, subtitle: str) -> Path | None:
    panels = [(name, spec) for name, spec in _LATENCY_PANELS.items() if name in results]
    if not panels:
        return None
    columns = 2 if len(panels) > 1 else 1
    rows = (len(panels) + 1) // 2
    figure, axes = plt.subplots(rows, columns, figsize=(11, 3.8 * rows), squeeze=False)
    for axis, (name, (title, series)) in zip(axes.flat, panels, strict=False):
        for key, color in series:
            _cdf(axis, results[name].samples.get(key, []), key.removesuffix("_s"), _COLORS[color])
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("ms")
        axis.set_ylabel("fraction of runs")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle(f"Latency distributions\n{subtitle}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _growth(result: ScenarioResult, path: Path, subtitle: str) -> Path:
    samples = result.samples
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(
        samples["queued"], samples["dispatch_jobs_per_s"], marker="o", color=_COLORS["snapyard"]
    )
    left.set_xscale("log")
    left.set_ylim(bottom=0)
    left.set_xlabel("jobs queued at release")
    left.set_ylabel("jobs/s dispatched and finished")
    left.set_title("7. Dispatch rate vs queue length", fontsize=10)
    right.plot(
        samples["snapshots"],
        [v * 1e6 for v in samples["lookup_s"]],
        marker="o",
        label="lookup (median, us)",
        color=_COLORS["snapyard"],
    )
    right.plot(
        samples["snapshots"],
        [v * 1e6 for v in samples["sweep_s"]],
        marker="s",
        label="sweep (us)",
        color=_COLORS["raw"],
    )
    right.plot(
        samples["snapshots"],
        [v * 1e6 for v in samples["adopt_s"]],
        marker="^",
        label="start, registry rebuilt (us)",
        color=_COLORS["naive"],
    )
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("snapshots in the registry")
    right.set_title("7. Registry cost vs size", fontsize=10)
    right.legend(fontsize=8)
    for axis in (left, right):
        axis.grid(alpha=0.3)
    figure.suptitle(f"Growth (MemoryEngine)\n{subtitle}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def render_pngs(results: list[ScenarioResult], out: Path, subtitle: str) -> list[Path]:
    """Every plot the results allow, into ``out``; the paths written."""
    by_name = {r.name: r for r in results}
    written: list[Path | None] = []
    if "throughput" in by_name:
        written.append(_throughput(by_name["throughput"], out / "throughput.png", subtitle))
    written.append(_latency(by_name, out / "latency.png", subtitle))
    if "growth" in by_name:
        written.append(_growth(by_name["growth"], out / "growth.png", subtitle))
    return [p for p in written if p is not None]
