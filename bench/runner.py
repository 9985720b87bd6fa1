"""Run scenarios, write results, compare them with ``bench/baselines.json``.

    python -m bench [--scenario NAME ...] [--quick] [--out bench/results] [--check]

Writes ``<out>/<UTC timestamp>.json``, ``latest.json``, ``latest.md`` and
``latest.svg``. Each figure is printed with its change against the baseline
of the same mode (full or ``--quick``: they run different sizes). With
``--check`` the exit code is 1 when a checked figure (a ratio) is worse than
its baseline by more than the tolerance; without it, regressions are only
reported. ``--update-baselines`` stores this run's figures as the new baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.model import Figure, ScenarioResult
from bench.plot import render_svg
from bench.scenarios import SCENARIOS, remove_bench_base

__all__ = ["Comparison", "compare", "main"]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results"
DEFAULT_BASELINES = REPO / "bench" / "baselines.json"
# A checked ratio may be this much worse than its baseline (0.5: 50%) before --check fails.
DEFAULT_TOLERANCE = 0.5
_CHILD_MARK = "BENCH-RESULT "


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


def _worse_by(figure: Figure, baseline: float) -> float:
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
                regressed = figure.checked and _worse_by(figure, base) > tolerance
            out.append(Comparison(key, figure, base, change, regressed))
    return out


def _load_baselines(path: Path, mode: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    figures: dict[str, Any] = data.get("modes", {}).get(mode, {}).get("figures", {})
    return figures


def _save_baselines(
    path: Path, mode: str, results: list[ScenarioResult], meta: dict[str, Any]
) -> None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        data = {}
    data["tolerance"] = DEFAULT_TOLERANCE
    data["about"] = (
        "Reference figures from a committed run, per mode. `python -m bench --check` fails "
        "when a checked figure (a ratio against a same-process baseline) is worse than its "
        "value here by more than `tolerance` (0.5 = 50%). Refresh with --update-baselines."
    )
    modes = data.setdefault("modes", {})
    figures = modes.get(mode, {}).get("figures", {})
    for result in results:
        for figure in result.figures:
            figures[f"{result.name}.{figure.name}"] = {
                "value": round(figure.value, 6),
                "unit": figure.unit,
                "better": figure.better,
                "checked": figure.checked,
            }
    modes[mode] = {
        "created": meta["created"],
        "host": meta["host"],
        "figures": dict(sorted(figures.items())),
    }
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    text = f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return f"{text}{'x' if unit == 'ratio' else ''}"


def _fmt_change(change: float | None) -> str:
    return "n/a" if change is None else f"{change * 100:+.0f}%"


def _table(comparisons: list[Comparison]) -> list[list[str]]:
    return [
        [
            c.key,
            _fmt(c.figure.value, c.figure.unit),
            c.figure.unit,
            _fmt(c.baseline, c.figure.unit),
            _fmt_change(c.change),
            c.status,
        ]
        for c in comparisons
    ]


def _print_table(rows: list[list[str]]) -> None:
    header = ["figure", "value", "unit", "baseline", "change", "check"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


def _markdown(
    results: list[ScenarioResult],
    comparisons: list[Comparison],
    failures: dict[str, str],
    meta: dict[str, Any],
    tolerance: float,
) -> str:
    by_key = {c.key: c for c in comparisons}
    lines = [
        "# Snapyard benchmark results",
        "",
        f"Run {meta['created']} ({meta['mode']}), commit `{meta['git']}`, "
        f"{meta['host']['cpus']} CPUs, load {meta['host']['load_before']} -> {meta['host']['load_after']}.",
        "",
        f"Ratios are against a baseline measured in the same process; `check` compares "
        f"with `bench/baselines.json` ({meta['mode']}), tolerance {tolerance:.0%} on checked ratios.",
        "",
    ]
    for result in results:
        lines += [
            f"## {result.title}",
            "",
            f"`{result.name}` — {result.seconds:.1f} s; params: "
            + ", ".join(f"{k}={v}" for k, v in result.params.items()),
            "",
        ]
        lines += [
            "| figure | value | unit | baseline | change | check | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for figure in result.figures:
            c = by_key[f"{result.name}.{figure.name}"]
            lines.append(
                f"| {figure.name} | {_fmt(figure.value, figure.unit)} | {figure.unit} | "
                f"{_fmt(c.baseline, figure.unit)} | {_fmt_change(c.change)} | {c.status} | {figure.note} |"
            )
        lines += [f"- {note}" for note in result.notes]
        lines.append("")
    for name, error in failures.items():
        lines += [f"## {name}: FAILED", "", "```", error.strip(), "```", ""]
    return "\n".join(lines)


def _run_isolated(name: str, quick: bool) -> ScenarioResult:
    """Run one scenario in a fresh interpreter, so its process figures start clean."""
    argv = [
        sys.executable,
        "-m",
        "bench",
        "--isolated-child",
        name,
        *(["--quick"] if quick else []),
    ]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(_CHILD_MARK):
            return ScenarioResult.from_json(json.loads(line[len(_CHILD_MARK) :]))
    raise RuntimeError(f"{name} (own process) exited {done.returncode}:\n{done.stderr[-4000:]}")


def _run(name: str, quick: bool, isolate: bool) -> ScenarioResult:
    function, own_process = SCENARIOS[name]
    began = time.perf_counter()
    result = _run_isolated(name, quick) if own_process and isolate else function(quick)
    result.seconds = time.perf_counter() - began
    return result


def _git(*args: str) -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    return "unknown"


def _code_under_test() -> dict[str, Any]:
    """Which ``actors`` ran: the working tree may hold someone's uncommitted edit.

    To measure a commit exactly, export it with bench/ (``git archive HEAD
    actors config bench``), run ``python -m bench`` from that directory with
    ``--out``/``--baselines`` pointing back here, and BENCH_GIT_COMMIT set.
    """
    import actors

    path = Path(actors.__file__).resolve().parent
    info: dict[str, Any] = {"actors": str(path)}
    if path == REPO / "actors" and (REPO / ".git").exists():
        dirty = _git("status", "--porcelain", "--", "actors", "config")
        info["uncommitted_changes"] = dirty.splitlines() if dirty else []
    return info


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenario", action="append", choices=sorted(SCENARIOS), help="repeatable; default all"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller N: a smoke run under 2 minutes"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    parser.add_argument("--baselines", type=Path, default=DEFAULT_BASELINES)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when a checked ratio regressed"
    )
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="0.5 = 50%%")
    parser.add_argument(
        "--update-baselines", action="store_true", help="store these figures as the baseline"
    )
    parser.add_argument(
        "--no-isolate", action="store_true", help="run every scenario in this process"
    )
    parser.add_argument("--verbose", action="store_true", help="show the supervisor's warnings")
    parser.add_argument("--isolated-child", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The scenarios provoke warnings on purpose (stale snapshots); --verbose shows them.
    logging.getLogger("actors").setLevel(logging.WARNING if args.verbose else logging.ERROR)
    if args.isolated_child:
        function, _ = SCENARIOS[args.isolated_child]
        print(_CHILD_MARK + json.dumps(function(args.quick).to_json()), flush=True)
        return 0

    mode = "quick" if args.quick else "full"
    names = args.scenario or list(SCENARIOS)
    created = dt.datetime.now(dt.UTC)
    meta: dict[str, Any] = {
        "created": created.isoformat(timespec="seconds"),
        "mode": mode,
        # An exported tree has no .git: the exporter names its commit.
        "git": os.environ.get("BENCH_GIT_COMMIT") or _git("rev-parse", "--short", "HEAD"),
        "code": _code_under_test(),
        "host": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_before": round(os.getloadavg()[0], 2),
        },
    }
    results: list[ScenarioResult] = []
    failures: dict[str, str] = {}
    for name in names:
        print(f"== {name} ({mode})", flush=True)
        try:
            result = _run(name, args.quick, isolate=not args.no_isolate)
        except Exception:
            failures[name] = traceback.format_exc()
            print(f"   FAILED:\n{failures[name]}", file=sys.stderr, flush=True)
            continue
        results.append(result)
        print(f"   {result.seconds:.1f} s", flush=True)
        for note in result.notes:
            print(f"   note: {note}", flush=True)
    meta["host"]["load_after"] = round(os.getloadavg()[0], 2)
    if any(not SCENARIOS[name][1] for name in names):
        remove_bench_base()

    baselines = _load_baselines(args.baselines, mode)
    comparisons = compare(results, baselines, args.tolerance)
    print()
    _print_table(_table(comparisons))

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    document = {
        **meta,
        "tolerance": args.tolerance,
        "scenarios": [r.to_json() for r in results],
        "comparison": [
            {"figure": c.key, "value": c.figure.value, "baseline": c.baseline, "status": c.status}
            for c in comparisons
        ],
        "failures": failures,
    }
    text = json.dumps(document, indent=2) + "\n"
    stamp = created.strftime("%Y%m%dT%H%M%SZ")
    (out / f"{stamp}-{mode}.json").write_text(text)
    (out / "latest.json").write_text(text)
    (out / "latest.md").write_text(_markdown(results, comparisons, failures, meta, args.tolerance))
    baseline_values = {k: float(v["value"]) for k, v in baselines.items()}
    subtitle = f"{meta['created']} · {mode} · commit {meta['git']} · {meta['host']['cpus']} CPUs"
    (out / "latest.svg").write_text(render_svg(results, baseline_values, subtitle))
    print(f"\nwrote {out / f'{stamp}-{mode}.json'}, latest.json, latest.md, latest.svg")

    if args.update_baselines and not failures:
        _save_baselines(args.baselines, mode, results, meta)
        print(f"updated {args.baselines} ({mode})")
    regressed = [c.key for c in comparisons if c.regressed]
    if regressed:
        print(f"regressed past {args.tolerance:.0%}: {', '.join(regressed)}", file=sys.stderr)
    if failures:
        return 2
    return 1 if args.check and regressed else 0
