"""Scenarios 4 and 5 on the real engine: what a snapshot saves, what a stale one costs.

Stale snapshots come two ways. The 404 path: the image is deleted with the
event hidden from the Watcher (``BlindfoldEngine``), as while it reconnects,
so the create 404s and the Spawner falls back to the base image. The event
path: the image is deleted 1 s before the job, the Watcher hears it and the
registry drops the entry first, so the job starts from the base with no 404.
The naive script has no Watcher: both paths are its 404 path.
"""

from __future__ import annotations

import contextlib
import time
import uuid

from actors.model import validate_spec
from bench.model import Figure, ScenarioResult, median
from bench.peers.naive import JudgedScript
from bench.peers.raw import api_client
from bench.rigs import (
    BENCH_BASE_TAG,
    BENCH_LABELS,
    BENCH_REPOSITORY,
    RUN_LABEL,
    BenchError,
    BlindfoldEngine,
    DockerRig,
    Progress,
    base_settings,
    docker_engine,
    docker_rig,
    engine_url,
    ensure_bench_base,
    run_job,
    sweep_docker,
    to_finished,
)

__all__ = ["snapshot_value", "stale_snapshot"]


# --- 4. snapshot value ------------------------------------------------------------


def snapshot_value(quick: bool) -> ScenarioResult:
    """Submit->finished of a base start (setup paid) vs a snapshot hit (setup skipped).

    Pairs are interleaved (base on a fresh work item, then a hit on it) so
    drift on a shared engine hits both sides alike; one unmeasured warm-up pair.
    """
    reps = 1 if quick else 8
    setup_s = 1.0 if quick else 2.0
    engine = docker_engine()
    base: list[float] = []
    hit: list[float] = []
    misses = 0
    with docker_rig(engine, worker={"setup_seconds": setup_s}) as rig:
        progress = Progress("pairs", reps + 1)
        for i in range(-1, reps):
            spec = validate_spec(rig.project, f"item-{i + 1}")
            first = run_job(rig.app, spec)
            second = run_job(rig.app, spec)
            if first.from_snapshot or not first.snapshot_committed:
                raise BenchError(f"base run {first.id} did not start from base and commit")
            if not second.from_snapshot:
                misses += 1
            if i >= 0:
                base.append(to_finished(first))
                hit.append(to_finished(second))
            progress()
    base_s, hit_s = median(base), median(hit)
    notes = [f"{misses} of {reps + 1} hit runs did not start from a snapshot"] if misses else []
    return ScenarioResult(
        name="snapshot_value",
        title=f"4. Snapshot value: hit vs base start (real engine, setup {setup_s:g} s)",
        figures=[
            Figure("base_median_s", base_s, "s", "lower", note="submit->finished, base image"),
            Figure("hit_median_s", hit_s, "s", "lower", note="submit->finished, snapshot hit"),
            Figure("saved_s", base_s - hit_s, "s", "higher", note="median base - median hit"),
            Figure("ratio", hit_s / base_s, "ratio", "lower", True, "hit / base; target <= 0.35"),
        ],
        samples={"base_s": base, "hit_s": hit},
        params={"repetitions": reps, "setup_seconds": setup_s, "warmup_pairs": 1},
        notes=notes,
        targets={"ratio": ("<=", 0.35)},
    )


# --- 5. stale snapshot ------------------------------------------------------------


def _fallbacks(rig: DockerRig) -> float:
    return rig.app.metrics.value("snapyard_stale_snapshot_fallbacks_total")


def _snapyard_pair(
    rig: DockerRig, engine: BlindfoldEngine, i: int, event_path: bool
) -> tuple[float, float, bool]:
    """(plain base run, stale run, went through a 404) for one repetition."""
    path = "event" if event_path else "404"
    spec = validate_spec(rig.project, f"stale-{path}-{i}")
    prime = run_job(rig.app, spec)
    entry = next((s for s in rig.app.snapshots() if s.key == spec.key), None)
    if entry is None:
        raise BenchError(f"base run {prime.id} registered no snapshot")
    fresh = validate_spec(rig.project, f"fresh-{path}-{i}")
    # The baseline runs before the deletion or after the stale run, in turn:
    # never in between, since every Register sweeps the registry (one list
    # call) and would drop the vanished snapshot first.
    plain = run_job(rig.app, fresh) if i % 2 else None
    deleted_at = time.monotonic()
    if not event_path:
        engine.hidden.add(entry.image_id)
    engine.remove_image(entry.image_id, force=True)
    listed = any(s.image_id == entry.image_id for s in rig.app.snapshots())
    if event_path:
        deadline = time.monotonic() + 5.0
        while listed and time.monotonic() < deadline:
            time.sleep(0.01)
            listed = any(s.image_id == entry.image_id for s in rig.app.snapshots())
        if listed:
            raise BenchError("the Watcher did not drop the deleted snapshot within 5 s")
        time.sleep(max(0.0, 1.0 - (time.monotonic() - deleted_at)))  # deleted 1 s before
    elif not listed:
        raise BenchError("the registry dropped the hidden deletion: nothing stale to hit")
    before = _fallbacks(rig)
    second = run_job(rig.app, spec)
    hit_404 = _fallbacks(rig) > before
    if plain is None:
        plain = run_job(rig.app, fresh)
    if second.from_snapshot or plain.from_snapshot:
        raise BenchError(f"job {second.id} or {plain.id} ran from a snapshot")
    return to_finished(plain), to_finished(second), hit_404


def _naive_pairs(reps: int, progress: Progress) -> tuple[list[float], list[float], int]:
    """The naive script, serially: (plain base runs, stale runs, 404 fallbacks)."""
    engine = docker_engine()
    api = api_client(engine_url())
    labels = {**BENCH_LABELS, RUN_LABEL: f"naive-stale-{uuid.uuid4().hex[:8]}"}
    script = JudgedScript(api, BENCH_BASE_TAG, BENCH_REPOSITORY, labels, 1)
    since = time.time() - 1.0
    base: list[float] = []
    stale: list[float] = []
    try:
        for i in range(-1, reps):
            key = ("bench-naive", f"stale-{i}")
            script.run_job(key, f"prime-{i}", 0.0)
            began = time.perf_counter()
            script.run_job(("bench-naive", f"fresh-{i}"), f"fresh-{i}", 0.0)
            plain = time.perf_counter() - began
            api.remove_image(script.snapshots[key], force=True)
            began = time.perf_counter()
            script.run_job(key, f"stale-{i}", 0.0)
            if i >= 0:
                base.append(plain)
                stale.append(time.perf_counter() - began)
            progress()
    finally:
        script.close()
        with contextlib.suppress(Exception):
            sweep_docker(engine, since, labels)
    return base, stale, script.fallbacks


def stale_snapshot(quick: bool) -> ScenarioResult:
    """Stale-snapshot cost against a plain base run: the 404 path, the event path, the naive script.

    setup_seconds is 0 so the recovery is not drowned in the setup time.
    """
    reps = 1 if quick else 8
    settings = base_settings()
    engine = BlindfoldEngine(settings.engine.url, settings.engine.timeout_s)
    engine.ping()
    ensure_bench_base(engine)
    runs: dict[str, list[float]] = {
        k: [] for k in ("base_404", "stale_404", "base_event", "stale_event")
    }
    fallbacks = {"404": 0, "event": 0}
    progress = Progress("stale pairs", 3 * (reps + 1))
    with docker_rig(engine, worker={"setup_seconds": 0.0}) as rig:
        for i in range(-1, reps):
            for path in ("404", "event"):
                plain, stale, hit = _snapyard_pair(rig, engine, i, path == "event")
                if i >= 0:
                    runs[f"base_{path}"].append(plain)
                    runs[f"stale_{path}"].append(stale)
                    fallbacks[path] += int(hit)
                progress()
    naive_base, naive_stale, naive_404 = _naive_pairs(reps, progress)
    r404 = median(runs["stale_404"]) / median(runs["base_404"])
    revent = median(runs["stale_event"]) / median(runs["base_event"])
    rnaive = median(naive_stale) / median(naive_base)
    return ScenarioResult(
        name="stale_snapshot",
        title="5. Stale snapshot vs plain base run (real engine, setup 0 s)",
        figures=[
            Figure(
                "path404_ratio",
                r404,
                "ratio",
                "lower",
                True,
                "stale / base, 404 path; target <= 1.05",
            ),
            Figure(
                "path404_fallbacks",
                fallbacks["404"],
                "runs",
                "higher",
                note=f"of {reps} via the 404",
            ),
            Figure(
                "event_ratio", revent, "ratio", "lower", True, "deleted 1 s before; target <= 1.02"
            ),
            Figure("event_404s", fallbacks["event"], "runs", "lower", note="target 0"),
            Figure(
                "naive_ratio",
                rnaive,
                "ratio",
                "lower",
                note="naive stale / naive base (its 404 path)",
            ),
            Figure(
                "naive_404s", naive_404, "runs", "lower", note=f"of {reps + 1} (warm-up included)"
            ),
            Figure("base_median_ms", median(runs["base_404"]) * 1e3, "ms", "lower"),
            Figure("naive_base_median_ms", median(naive_base) * 1e3, "ms", "lower"),
        ],
        samples={
            **{f"{k}_s": v for k, v in runs.items()},
            "naive_base_s": naive_base,
            "naive_stale_s": naive_stale,
        },
        params={"repetitions": reps, "setup_seconds": 0.0, "warmup_pairs": 1},
        targets={
            "path404_ratio": ("<=", 1.05),
            "event_ratio": ("<=", 1.02),
            "event_404s": ("<=", 0),
        },
    )
