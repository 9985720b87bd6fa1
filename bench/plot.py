"""The results as one self-contained SVG, written by hand (no plotting library).

Panels: every checked ratio on a log scale (with the committed baseline as a
marker), the raw samples of the two paired scenarios, the latency CDFs of the
queued burst, and the memory bars. Missing scenarios leave their panel out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from xml.sax.saxutils import escape

from bench.model import ScenarioResult, median

__all__ = ["render_svg"]

WIDTH = 960
_FONT = "font-family='DejaVu Sans, Arial, sans-serif'"
_COLORS = {"base": "#4c72b0", "new": "#dd8452", "third": "#55a868", "grid": "#dddddd"}


class _Svg:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def text(
        self, x: float, y: float, text: str, size: int = 12, anchor: str = "start", **attrs: str
    ) -> None:
        extra = "".join(f" {k.replace('_', '-')}='{v}'" for k, v in attrs.items())
        self.parts.append(
            f"<text x='{x:.1f}' y='{y:.1f}' font-size='{size}' text-anchor='{anchor}' "
            f"{_FONT}{extra}>{escape(text)}</text>"
        )

    def line(
        self, x1: float, y1: float, x2: float, y2: float, color: str = "#333", width: float = 1
    ) -> None:
        self.parts.append(
            f"<line x1='{x1:.1f}' y1='{y1:.1f}' x2='{x2:.1f}' y2='{y2:.1f}' "
            f"stroke='{color}' stroke-width='{width}'/>"
        )

    def rect(self, x: float, y: float, w: float, h: float, color: str, opacity: float = 1) -> None:
        self.parts.append(
            f"<rect x='{x:.1f}' y='{y:.1f}' width='{max(w, 0):.1f}' height='{max(h, 0):.1f}' "
            f"fill='{color}' fill-opacity='{opacity}'/>"
        )

    def circle(self, x: float, y: float, r: float, color: str) -> None:
        self.parts.append(
            f"<circle cx='{x:.1f}' cy='{y:.1f}' r='{r}' fill='{color}' fill-opacity='0.7'/>"
        )

    def polyline(self, points: Sequence[tuple[float, float]], color: str) -> None:
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        self.parts.append(
            f"<polyline points='{coords}' fill='none' stroke='{color}' stroke-width='2'/>"
        )

    def diamond(self, x: float, y: float, r: float, color: str) -> None:
        self.parts.append(
            f"<polygon points='{x:.1f},{y - r:.1f} {x + r:.1f},{y:.1f} {x:.1f},{y + r:.1f} "
            f"{x - r:.1f},{y:.1f}' fill='none' stroke='{color}' stroke-width='2'/>"
        )


def _nice_max(value: float) -> float:
    if value <= 0 or not math.isfinite(value):
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        top = step * 10.0**exponent
        if top >= value:
            return top
    return 10.0 ** (exponent + 1)


def _ratio_panel(svg: _Svg, top: float, rows: list[tuple[str, float, float | None]]) -> float:
    """Horizontal bars of ratios on a log scale from 0.1 to 100; returns the height used."""
    svg.text(
        20, top + 20, "Checked ratios vs same-process baselines (log scale)", 15, font_weight="bold"
    )
    svg.text(
        20, top + 38, "bar = this run; diamond = bench/baselines.json; line at 1x", 11, fill="#555"
    )
    left, right = 330.0, WIDTH - 60.0
    lo, hi = -1.0, 2.0

    def x_of(value: float) -> float:
        logv = math.log10(min(max(value, 10**lo), 10**hi))
        return left + (logv - lo) / (hi - lo) * (right - left)

    y0 = top + 55
    height = 22 * len(rows)
    for tick in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100):
        x = x_of(tick)
        svg.line(x, y0 - 4, x, y0 + height, _COLORS["grid"] if tick != 1 else "#333")
        svg.text(x, y0 + height + 14, f"{tick:g}x", 10, "middle")
    for index, (label, value, baseline) in enumerate(rows):
        y = y0 + index * 22
        svg.text(left - 8, y + 13, label, 11, "end")
        if math.isfinite(value) and value > 0:
            start, end = sorted((x_of(1.0), x_of(value)))
            svg.rect(start, y + 3, end - start, 14, _COLORS["new"], 0.85)
            svg.text(
                x_of(value) + (6 if value >= 1 else -6),
                y + 14,
                f"{value:.3g}x",
                10,
                "start" if value >= 1 else "end",
            )
        if baseline is not None and baseline > 0:
            svg.diamond(x_of(baseline), y + 10, 6, "#222")
    return 55 + height + 30


def _strip_panel(
    svg: _Svg,
    left: float,
    top: float,
    width: float,
    title: str,
    groups: Sequence[tuple[str, Sequence[float], str]],
    unit: str,
    scale: float,
) -> None:
    """Each sample as a dot, a bar at the median, per group; a linear axis from 0."""
    height = 200.0
    svg.text(left, top + 18, title, 13, font_weight="bold")
    plot_top, plot_bottom = top + 35, top + 35 + height
    axis_left = left + 55
    values = [v * scale for _, samples, _ in groups for v in samples]
    y_max = _nice_max(max(values) if values else 1.0)

    def y_of(value: float) -> float:
        return plot_bottom - value / y_max * height

    for i in range(5):
        tick = y_max * i / 4
        svg.line(axis_left, y_of(tick), left + width, y_of(tick), _COLORS["grid"])
        svg.text(axis_left - 6, y_of(tick) + 4, f"{tick:g}", 10, "end")
    svg.text(left + 8, plot_top - 6, unit, 10, fill="#555")
    slot = (left + width - axis_left) / max(len(groups), 1)
    for index, (name, samples, color) in enumerate(groups):
        center = axis_left + slot * (index + 0.5)
        for j, sample in enumerate(samples):
            jitter = ((j * 7) % 11 - 5) * slot * 0.03
            svg.circle(center + jitter, y_of(sample * scale), 3.5, color)
        if samples:
            mid = median(samples) * scale
            svg.line(center - slot * 0.3, y_of(mid), center + slot * 0.3, y_of(mid), color, 3)
            svg.text(center + slot * 0.32, y_of(mid) + 4, f"{mid:.3g}", 10)
        svg.text(center, plot_bottom + 16, f"{name} (n={len(samples)})", 11, "middle")


def _cdf_panel(
    svg: _Svg,
    left: float,
    top: float,
    width: float,
    title: str,
    series: Sequence[tuple[str, Sequence[float], str]],
    marks: Sequence[tuple[str, float, str]],
) -> None:
    """Empirical CDFs (x in ms) with vertical reference lines."""
    height = 200.0
    svg.text(left, top + 18, title, 13, font_weight="bold")
    plot_top, plot_bottom = top + 35, top + 35 + height
    axis_left, axis_right = left + 40, left + width
    values = [v * 1e3 for _, samples, _ in series for v in samples] + [m * 1e3 for _, m, _ in marks]
    x_max = _nice_max(max(values) if values else 1.0)

    def x_of(ms: float) -> float:
        return axis_left + ms / x_max * (axis_right - axis_left)

    def y_of(fraction: float) -> float:
        return plot_bottom - fraction * height

    for i in range(5):
        svg.line(axis_left, y_of(i / 4), axis_right, y_of(i / 4), _COLORS["grid"])
        svg.text(axis_left - 6, y_of(i / 4) + 4, f"{i * 25}%", 10, "end")
        tick = x_max * i / 4
        svg.text(x_of(tick), plot_bottom + 14, f"{tick:g}", 10, "middle")
    svg.text(axis_right, plot_bottom + 28, "ms", 10, "end", fill="#555")
    legend_y = plot_top + 4
    for name, value, color in marks:
        svg.line(x_of(value * 1e3), plot_top, x_of(value * 1e3), plot_bottom, color, 2)
        svg.text(axis_left + 8, legend_y + 10, f"| {name}: {value * 1e3:.0f} ms", 10, fill=color)
        legend_y += 14
    for name, samples, color in series:
        ordered = sorted(v * 1e3 for v in samples)
        if not ordered:
            continue
        points = [(x_of(0), y_of(0))]
        for k, value in enumerate(ordered):
            points += [
                (x_of(value), y_of(k / len(ordered))),
                (x_of(value), y_of((k + 1) / len(ordered))),
            ]
        svg.polyline(points, color)
        svg.text(axis_left + 8, legend_y + 10, f"— {name} (n={len(ordered)})", 10, fill=color)
        legend_y += 14


def _bars_panel(
    svg: _Svg,
    left: float,
    top: float,
    width: float,
    title: str,
    bars: Sequence[tuple[str, float, str]],
    unit: str,
) -> None:
    height = 200.0
    svg.text(left, top + 18, title, 13, font_weight="bold")
    plot_bottom = top + 35 + height
    axis_left = left + 45
    y_max = _nice_max(max((v for _, v, _ in bars), default=1.0))
    for i in range(5):
        tick = y_max * i / 4
        y = plot_bottom - tick / y_max * height
        svg.line(axis_left, y, left + width, y, _COLORS["grid"])
        svg.text(axis_left - 6, y + 4, f"{tick:g}", 10, "end")
    svg.text(left + 8, top + 29, unit, 10, fill="#555")
    slot = (left + width - axis_left) / max(len(bars), 1)
    for index, (name, value, color) in enumerate(bars):
        x = axis_left + slot * index + slot * 0.2
        bar_h = value / y_max * height
        svg.rect(x, plot_bottom - bar_h, slot * 0.6, bar_h, color, 0.85)
        svg.text(x + slot * 0.3, plot_bottom - bar_h - 5, f"{value:.1f}", 11, "middle")
        svg.text(x + slot * 0.3, plot_bottom + 16, name, 11, "middle")


def render_svg(
    results: Sequence[ScenarioResult],
    baselines: Mapping[str, float],
    subtitle: str,
) -> str:
    """The SVG document. ``baselines`` maps ``scenario.figure`` to the committed value."""
    svg = _Svg()
    by_name = {r.name: r for r in results}
    svg.text(20, 28, "Snapyard benchmarks", 18, font_weight="bold")
    svg.text(20, 46, subtitle, 11, fill="#555")
    rows = [
        (f"{r.name} · {f.name}", f.value, baselines.get(f"{r.name}.{f.name}"))
        for r in results
        for f in r.figures
        if f.checked
    ]
    y = 60.0
    if rows:
        y += _ratio_panel(svg, y, rows)
    half = (WIDTH - 60) / 2
    cells: list[tuple[float, float]] = [
        (20, y),
        (40 + half, y),
        (20, y + 280),
        (40 + half, y + 280),
    ]
    used = 0
    hit = by_name.get("snapshot_hit_vs_base")
    if hit is not None:
        x, top = cells[used]
        used += 1
        _strip_panel(
            svg,
            x,
            top,
            half,
            "Snapshot hit vs base: submit→finished",
            [
                ("base start", hit.samples.get("base_s", []), _COLORS["base"]),
                ("snapshot hit", hit.samples.get("hit_s", []), _COLORS["new"]),
            ],
            "seconds",
            1.0,
        )
    stale = by_name.get("stale_recovery")
    if stale is not None:
        x, top = cells[used]
        used += 1
        _strip_panel(
            svg,
            x,
            top,
            half,
            "Stale-snapshot recovery vs plain base run",
            [
                ("base run", stale.samples.get("base_s", []), _COLORS["base"]),
                ("stale → base", stale.samples.get("stale_s", []), _COLORS["new"]),
            ],
            "ms, submit→finished",
            1e3,
        )
    burst = by_name.get("latency_100_queued")
    if burst is not None:
        x, top = cells[used]
        used += 1
        jobs = burst.params.get("jobs", "?")
        _cdf_panel(
            svg,
            x,
            top,
            half,
            f"{jobs} queued jobs: latency CDF",
            [
                ("submit→running", burst.samples.get("to_running_s", []), _COLORS["new"]),
                ("slot free→running", burst.samples.get("dispatch_s", []), _COLORS["third"]),
            ],
            [
                (
                    "raw create+start+wait+remove",
                    median(burst.samples.get("raw_cycle_s", [])),
                    _COLORS["base"],
                )
            ],
        )
    memory = by_name.get("memory_1000_jobs")
    if memory is not None:
        x, top = cells[used]
        used += 1
        jobs = memory.params.get("jobs", "?")
        _bars_panel(
            svg,
            x,
            top,
            half,
            f"Supervisor RSS: 0 jobs vs {jobs} finished",
            [
                ("app started, 0 jobs", memory.figure("rss_baseline_mib").value, _COLORS["base"]),
                (f"after {jobs} jobs", memory.figure("rss_after_mib").value, _COLORS["new"]),
            ],
            "MiB",
        )
    height = y + (280 * math.ceil(used / 2) if used else 0) + 20
    header = (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{height:.0f}' "
        f"viewBox='0 0 {WIDTH} {height:.0f}'>"
        f"<rect width='100%' height='100%' fill='white'/>"
    )
    return header + "".join(svg.parts) + "</svg>\n"
