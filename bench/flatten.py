"""What one flatten costs against one commit, on the real engine.

A snapshot chain grows a layer per run; the commit that reaches
``snapshots.max_layers`` is flattened. The flatten reads the whole image
(``docker save``, the base included), merges the layers above the base and
loads the result, so it costs more than a commit, which writes only the run's
changes: this scenario says how much more, per chain of ``DEPTH`` commits.
"""

from __future__ import annotations

import contextlib
import time
import uuid

from actors.engine.base import ContainerSpec, EngineError, ImageConfig
from actors.engine.docker import DockerEngine
from actors.worker_image import DEMO_REPOSITORY, build_context, ensure_base_image
from bench.model import Figure, ScenarioResult, median
from bench.rigs import (
    BENCH_LABELS,
    BENCH_REPOSITORY,
    JOB_WAIT_S,
    BenchError,
    docker_engine,
    sweep_docker,
)

__all__ = ["flatten_vs_commit"]

# The cap tests/docker/test_flatten.py uses: a flatten every third commit.
DEPTH = 3
PAYLOAD_BYTES = 256 * 1024


def _run_and_commit(engine: DockerEngine, image: str, tag: str, index: int) -> tuple[str, float]:
    """One run writing ``PAYLOAD_BYTES`` to the workspace, then its commit (timed alone)."""
    spec = ContainerSpec(
        image=image,
        command=["sh", "-c", f"head -c {PAYLOAD_BYTES} /dev/urandom > /workspace/run-{index}"],
        env={"SNAPYARD_SETUP_SECONDS": "0"},
        labels=dict(BENCH_LABELS),
    )
    container = engine.create_container(spec)
    try:
        engine.start_container(container)
        code = engine.wait_container(container, timeout_s=JOB_WAIT_S)
        if code != 0:
            raise BenchError(f"payload run exited {code}: {engine.container_logs(container).text}")
        began = time.perf_counter()
        committed = engine.commit_container(container, BENCH_REPOSITORY, tag, ImageConfig())
        return committed, time.perf_counter() - began
    finally:
        engine.remove_container(container, force=True)


def flatten_vs_commit(quick: bool) -> ScenarioResult:
    """Median commit and median flatten of a chain ``DEPTH`` commits deep; one warm-up chain."""
    chains = 2 if quick else 6
    engine = docker_engine()
    # A tag of its own, by content (as the tests do): a shared one may be rebuilt
    # by another checkout mid-run, and rebuilding it would disturb theirs.
    base_tag = f"{DEMO_REPOSITORY}:bench-{build_context().digest[:12]}"
    ensure_base_image(engine, base_tag)
    base_id = engine.inspect_image(base_tag).id
    since = time.time() - 1.0
    commits: list[float] = []
    flattens: list[float] = []
    try:
        for chain in range(-1, chains):
            tag = f"flatten-{uuid.uuid4().hex[:10]}"
            image = base_id
            timed: list[float] = []
            for index in range(DEPTH):
                image, seconds = _run_and_commit(engine, image, tag, index)
                timed.append(seconds)
            began = time.perf_counter()
            engine.flatten_image(image, base_id, BENCH_REPOSITORY, tag)
            flattened = time.perf_counter() - began
            if chain >= 0:
                commits.extend(timed)
                flattens.append(flattened)
    finally:
        sweep_docker(engine, since)
        with contextlib.suppress(EngineError):
            engine.remove_image(base_tag)  # only the tag, while another names the image
    commit_s, flatten_s = median(commits), median(flattens)
    return ScenarioResult(
        name="flatten_vs_commit",
        title=f"One flatten vs one commit (real engine, {DEPTH} layers of 256 KiB)",
        figures=[
            Figure("commit_median_ms", commit_s * 1000, "ms", "lower", note="one commit"),
            Figure("flatten_median_ms", flatten_s * 1000, "ms", "lower", note="one flatten"),
            Figure(
                "flatten_over_commit",
                flatten_s / commit_s,
                "ratio",
                "lower",
                True,
                "flatten / commit (medians)",
            ),
        ],
        samples={"commit_s": commits, "flatten_s": flattens},
        params={
            "chains": chains,
            "depth": DEPTH,
            "payload_bytes": PAYLOAD_BYTES,
            "base": base_tag,
            "warmup_chains": 1,
        },
    )
