"""Run scenarios, write results, compare them with ``bench/baselines.json``.

    python -m bench [--scenario NAME ...] [--quick] [--out bench/results] [--check]
                    [--lock /tmp/snapyard-docker.lock]

Writes ``<out>/<UTC timestamp>-<mode>.json``, ``latest.json``, ``latest.md``
and the PNG plots (``bench.plot``). Each figure is shown with its target (met
or missed) and its change against the baseline is printed with its change against the baseline
of the same mode (full or ``--quick``: they run different sizes). With
``--check`` the exit code is 1 when a checked figure (a ratio) is worse than
its baseline by more than the tolerance; without it, regressions are only
reported. ``--update-baselines`` stores this run's figures as the new baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.model import ScenarioResult
from bench.report import compare, console_rows, markdown, missed, with_summary
from bench.rigs import remove_bench_base
from bench.scenarios import SCENARIOS

__all__ = ["main"]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results"
DEFAULT_BASELINES = REPO / "bench" / "baselines.json"
# A checked ratio may be this much worse than its baseline (0.5: 50%) before --check fails.
DEFAULT_TOLERANCE = 0.5
_CHILD_MARK = "BENCH-RESULT "


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


def _run_isolated(name: str, quick: bool) -> ScenarioResult:
    """Run one scenario in a fresh interpreter, so its process figures start clean.

    Its stderr is ours: the scenario's progress shows as it goes.
    """
    argv = [
        sys.executable,
        "-m",
        "bench",
        "--isolated-child",
        name,
        *(["--quick"] if quick else []),
    ]
    done = subprocess.run(argv, cwd=REPO, stdout=subprocess.PIPE, text=True, check=False)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(_CHILD_MARK):
            return ScenarioResult.from_json(json.loads(line[len(_CHILD_MARK) :]))
    raise RuntimeError(f"{name} (own process) exited {done.returncode}; its stderr is above")


@contextlib.contextmanager
def _held(lock: Path | None) -> Iterator[None]:
    """The shared Docker lock, for one scenario: other sessions' tests wait, not collide."""
    if lock is None:
        yield
        return
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(name: str, quick: bool, isolate: bool, lock: Path | None) -> ScenarioResult:
    scenario = SCENARIOS[name]
    with _held(lock if scenario.docker else None):
        began = time.perf_counter()
        if scenario.own_process and isolate:
            result = _run_isolated(name, quick)
        else:
            result = scenario.run(quick)
        result.seconds = time.perf_counter() - began
    return result


def _git(*args: str) -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    return "unknown"


def _code_under_test() -> dict[str, Any]:
    """Which ``actors`` ran: the working tree may hold someone's uncommitted edit."""
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
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
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
    parser.add_argument(
        "--lock", type=Path, help="hold this flock around each real-engine scenario"
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--readme", type=Path, help="put the summary table into this README (between markers)"
    )
    parser.add_argument("--verbose", action="store_true", help="show the supervisor's warnings")
    parser.add_argument("--isolated-child", help=argparse.SUPPRESS)
    return parser


def _meta(mode: str, created: dt.datetime) -> dict[str, Any]:
    return {
        "created": created.isoformat(timespec="seconds"),
        "mode": mode,
        # An exported tree has no .git: the exporter names its commit.
        "git": os.environ.get("BENCH_GIT_COMMIT") or _git("rev-parse", "--short", "HEAD"),
        "code": _code_under_test(),
        "numbers": {name: s.number for name, s in SCENARIOS.items()},
        "host": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_before": round(os.getloadavg()[0], 2),
        },
    }


def _write(
    out: Path,
    stamp: str,
    document: dict[str, Any],
    results: list[ScenarioResult],
    text: str,
    plots: bool,
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    body = json.dumps(document, indent=2) + "\n"
    written = [out / f"{stamp}-{document['mode']}.json", out / "latest.json", out / "latest.md"]
    written[0].write_text(body)
    written[1].write_text(body)
    written[2].write_text(text)
    if plots:
        from bench.plot import render_pngs  # matplotlib: the `bench` extra

        written += render_pngs(
            results, out, f"{document['created']} · {document['mode']} · commit {document['git']}"
        )
    return written


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The scenarios provoke warnings on purpose (stale snapshots); --verbose shows them.
    logging.getLogger("actors").setLevel(logging.WARNING if args.verbose else logging.ERROR)
    if args.isolated_child:
        result = SCENARIOS[args.isolated_child].run(args.quick)
        print(_CHILD_MARK + json.dumps(result.to_json()), flush=True)
        return 0

    mode = "quick" if args.quick else "full"
    names = args.scenario or [n for n, s in SCENARIOS.items() if s.in_quick or not args.quick]
    created = dt.datetime.now(dt.UTC)
    meta = _meta(mode, created)
    results: list[ScenarioResult] = []
    failures: dict[str, str] = {}
    for count, name in enumerate(names, 1):
        print(f"== [{count}/{len(names)}] {name} ({mode})", flush=True)
        try:
            result = _run(name, args.quick, not args.no_isolate, args.lock)
        except Exception:
            failures[name] = traceback.format_exc()
            print(f"   FAILED:\n{failures[name]}", file=sys.stderr, flush=True)
            continue
        results.append(result)
        print(f"   {result.seconds:.1f} s", flush=True)
    meta["host"]["load_after"] = round(os.getloadavg()[0], 2)
    if any(SCENARIOS[name].docker for name in names):
        with _held(args.lock):
            remove_bench_base()

    baselines = _load_baselines(args.baselines, mode)
    comparisons = compare(results, baselines, args.tolerance)
    print()
    print(console_rows(results, comparisons))
    for note in missed(results):
        print(f"MISSED: {note}")
    document = {
        **meta,
        "tolerance": args.tolerance,
        "scenarios": [r.to_json() for r in results],
        "comparison": [
            {"figure": c.key, "value": c.figure.value, "baseline": c.baseline, "status": c.status}
            for c in comparisons
        ],
        "missed": missed(results),
        "failures": failures,
    }
    stamp = created.strftime("%Y%m%dT%H%M%SZ")
    text = markdown(results, comparisons, failures, meta)
    written = _write(args.out, stamp, document, results, text, not args.no_plots)
    print(f"\nwrote {', '.join(str(p) for p in written)}")

    if args.readme is not None:
        args.readme.write_text(with_summary(args.readme.read_text(), text))
        print(f"updated the table in {args.readme}")
    if args.update_baselines and not failures:
        _save_baselines(args.baselines, mode, results, meta)
        print(f"updated {args.baselines} ({mode})")
    regressed = [c.key for c in comparisons if c.regressed]
    if regressed:
        print(f"regressed past {args.tolerance:.0%}: {', '.join(regressed)}", file=sys.stderr)
    if failures:
        return 2
    return 1 if args.check and regressed else 0
