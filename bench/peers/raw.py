"""Raw Docker: create, start, wait, remove from a thread pool, nothing else.

The container is the one a Spawner creates for a base run (same image, env,
limits and flags, see ``actors/worker_spec.py``), spelled out here with
literal values so no Snapyard code runs on this side of the comparison.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import docker

__all__ = ["RawRun", "api_client", "container_kwargs", "run_raw"]

_MIB = 1024 * 1024


def api_client(url: str, timeout_s: float = 120.0, pool: int = 16) -> Any:
    """A docker-py low-level client with a connection pool big enough for ``pool`` threads."""
    return docker.APIClient(base_url=url, timeout=timeout_s, max_pool_size=pool)


def container_kwargs(
    api: Any,
    image: str,
    job_id: str,
    labels: Mapping[str, str],
    setup_seconds: float = 0.0,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """``create_container`` arguments for a worker as Snapyard's defaults make it."""
    host_config = api.create_host_config(
        mem_limit=512 * _MIB,
        memswap_limit=512 * _MIB,
        pids_limit=256,
        network_mode="none",
        init=True,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
    )
    return {
        "image": image,
        "command": command,
        "environment": {
            "SNAPYARD_JOB_ID": job_id,
            "SNAPYARD_SNAPSHOT_REUSE": "0",
            "SNAPYARD_SETUP_SECONDS": f"{setup_seconds:g}",
        },
        "labels": dict(labels),
        "host_config": host_config,
    }


@dataclass
class RawRun:
    """Per container: create+start seconds, whole cycle seconds; and the run's span."""

    create_start_s: list[float]
    cycle_s: list[float]
    span_s: float
    failed: int

    @property
    def jobs_per_s(self) -> float:
        return len(self.cycle_s) / self.span_s if self.span_s > 0 else 0.0


def run_raw(
    api: Any,
    image: str,
    labels: Mapping[str, str],
    jobs: int,
    concurrency: int,
    setup_seconds: float = 0.0,
    on_done: Any = None,
) -> RawRun:
    """``jobs`` containers through ``concurrency`` threads; failures counted, not raised."""
    starts: list[float] = []
    cycles: list[float] = []
    failed = 0

    def one(index: int) -> tuple[float, float] | None:
        began = time.perf_counter()
        try:
            cid = api.create_container(
                **container_kwargs(api, image, f"raw-{index}", labels, setup_seconds)
            )["Id"]
            try:
                api.start(cid)
                started = time.perf_counter()
                code = api.wait(cid)["StatusCode"]
            finally:
                api.remove_container(cid, force=True)
        except Exception:  # counted, not raised: the peer's errors are a figure
            return None
        ended = time.perf_counter()
        return (started - began, ended - began) if code == 0 else None

    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency, thread_name_prefix="raw") as pool:
        for result in pool.map(one, range(jobs)):
            if result is None:
                failed += 1
            else:
                starts.append(result[0])
                cycles.append(result[1])
            if on_done is not None:
                on_done()
    return RawRun(starts, cycles, time.perf_counter() - began, failed)
