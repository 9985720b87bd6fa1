"""The results as text: the console table and the Markdown document.

Every figure is shown with its target (the issue's, never loosened) and
whether it is met, and with its change against ``bench/baselines.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from bench.model import Figure, ScenarioResult

__all__ = [
    "Comparison",
    "compare",
    "console_rows",
    "markdown",
    "missed",
    "with_summary",
    "worse_by",
]

README_START = "<!-- bench-table -->"
README_END = "<!-- /bench-table -->"


@dataclass(frozen=True)
class Comparison:
    key: str
    figure: Figure
    baseline: float | None
    change: float | None  # relative, +0.10 = 10% higher than the baseline
    regressed: bool

    @property
    def status(self) -> str:
        if self.baseline is None:
            return "new"
        if self.regressed:
            return "REGRESSED"
        return "ok" if self.figure.checked else "-"


def worse_by(figure: Figure, baseline: float) -> float:
    """How much worse than the baseline, as a fraction (negative: better)."""
    if baseline == 0 or not math.isfinite(baseline) or not math.isfinite(figure.value):
        return 0.0
    if figure.better == "lower":
        return figure.value / baseline - 1.0
    return baseline / figure.value - 1.0 if figure.value > 0 else math.inf


def compare(
    results: list[ScenarioResult], baselines: dict[str, Any], tolerance: float
) -> list[Comparison]:
    out = []
    for result in results:
        for figure in result.figures:
            key = f"{result.name}.{figure.name}"
            entry = baselines.get(key)
            base = float(entry["value"]) if entry is not None else None
            change = None
            regressed = False
            if base is not None:
                change = (figure.value - base) / abs(base) if base else None
                regressed = figure.checked and worse_by(figure, base) > tolerance
            out.append(Comparison(key, figure, base, change, regressed))
    return out


def fmt(value: float | None, unit: str = "") -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    text = f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return f"{text}{'x' if unit == 'ratio' else ''}"


def _change(change: float | None) -> str:
    return "n/a" if change is None else f"{change * 100:+.0f}%"


def _target(result: ScenarioResult, figure: Figure) -> tuple[str, str]:
    """(the target as text, MET / MISSED / empty)."""
    if figure.name not in result.targets:
        return "", ""
    op, limit = result.targets[figure.name]
    met = result.verdicts()[figure.name]
    return f"{op} {fmt(limit, figure.unit)}", "met" if met else "MISSED"


def console_rows(results: list[ScenarioResult], comparisons: list[Comparison]) -> str:
    by_key = {c.key: c for c in comparisons}
    header = ["figure", "value", "unit", "target", "", "baseline", "change"]
    rows = [header]
    for result in results:
        for figure in result.figures:
            c = by_key[f"{result.name}.{figure.name}"]
            target, met = _target(result, figure)
            rows.append(
                [
                    c.key,
                    fmt(figure.value, figure.unit),
                    figure.unit,
                    target,
                    met,
                    fmt(c.baseline, figure.unit),
                    _change(c.change),
                ]
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    rows.insert(1, ["-" * w for w in widths])
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def missed(results: list[ScenarioResult]) -> list[str]:
    """Every missed target, with by how much."""
    out = []
    for result in results:
        for name, met in result.verdicts().items():
            if met:
                continue
            op, limit = result.targets[name]
            value = result.figure(name).value
            if not math.isfinite(value):
                out.append(f"{result.name}.{name}: no samples (target {op} {fmt(limit)})")
                continue
            by = f"{value / limit:.2f}x the limit" if limit else f"{fmt(value)} over"
            out.append(f"{result.name}.{name} = {fmt(value)} (target {op} {fmt(limit)}; {by})")
    return out


_SUMMARY_END = "<!-- end of summary -->"


def with_summary(readme: str, document: str) -> str:
    """``readme`` with the summary of a results document between its bench-table markers."""
    start, end = readme.index(README_START), readme.index(README_END)
    summary = document.split(_SUMMARY_END, 1)[0].split("\n", 2)[2].strip()  # past the H1
    link = "Every figure: [bench/results/latest.md](bench/results/latest.md)."
    return f"{readme[: start + len(README_START)]}\n{summary}\n\n{link}\n{readme[end:]}"


def markdown(
    results: list[ScenarioResult],
    comparisons: list[Comparison],
    failures: dict[str, str],
    meta: dict[str, Any],
) -> str:
    by_key = {c.key: c for c in comparisons}
    host = meta["host"]
    lines = [
        "# Snapyard benchmark results",
        "",
        f"Run {meta['created']} ({meta['mode']}), commit `{meta['git']}`, {host['cpus']} CPUs, "
        f"load average (1 min) {host['load_before']} before, {host['load_after']} after "
        "(a shared machine: the ratios, measured side by side, are what count).",
        "",
        "| # | scenario | figure | value | target | | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for figure in result.figures:
            target, met = _target(result, figure)
            if not (figure.checked or target):
                continue
            lines.append(
                f"| {meta['numbers'].get(result.name, '')} | {result.name} | {figure.name} | "
                f"{fmt(figure.value, figure.unit)} {'' if figure.unit == 'ratio' else figure.unit} | "
                f"{target} | {met} | {figure.note} |"
            )
    misses = missed(results)
    if misses:
        lines += ["", "Missed targets:", "", *[f"- {m}" for m in misses]]
    lines += ["", _SUMMARY_END, "", "## Every figure", ""]
    for result in results:
        lines += [
            f"### {result.title}",
            "",
            f"`{result.name}`, {result.seconds:.1f} s; "
            + ", ".join(
                f"{k}={v}"
                for k, v in result.params.items()
                if not isinstance(v, dict | list) or k in ("levels", "queues", "snapshot_counts")
            ),
            "",
            "| figure | value | unit | target | | baseline | change | note |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for figure in result.figures:
            c = by_key[f"{result.name}.{figure.name}"]
            target, met = _target(result, figure)
            lines.append(
                f"| {figure.name} | {fmt(figure.value, figure.unit)} | {figure.unit} | {target} | "
                f"{met} | {fmt(c.baseline, figure.unit)} | {_change(c.change)} | {figure.note} |"
            )
        if result.notes:
            lines += ["", "```", *result.notes, "```"]
        lines.append("")
    for name, error in failures.items():
        lines += [f"## {name}: FAILED", "", "```", error.strip(), "```", ""]
    return "\n".join(lines)
