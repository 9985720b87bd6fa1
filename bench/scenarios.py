"""The scenario registry: issue 15's scenarios by number, and where the next one goes.

Each scenario is a function ``(quick) -> ScenarioResult``. ``own_process``
runs it in a fresh interpreter (its process figures start clean);
``docker`` says it needs the real engine (the runner holds
``/tmp/snapyard-docker.lock`` around it when asked to).

Scenario 9, the cluster (throughput with 1, 2 and 3 hosts, the claim cost
with 1k and 100k queued, the affinity hit rate), is added here by the
cluster work: a module ``bench/s_cluster.py`` with ``cluster(quick)`` and one
line ``register(Scenario("cluster", 9, ...))`` below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench.model import ScenarioResult

__all__ = ["SCENARIOS", "Scenario", "register"]


@dataclass(frozen=True)
class Scenario:
    name: str
    number: int
    run: Callable[[bool], ScenarioResult]
    own_process: bool = False
    docker: bool = True
    in_quick: bool = True  # part of a --quick run (make test) when none is named


SCENARIOS: dict[str, Scenario] = {}


def register(scenario: Scenario) -> Scenario:
    if scenario.name in SCENARIOS:
        raise ValueError(f"scenario {scenario.name!r} is registered twice")
    SCENARIOS[scenario.name] = scenario
    return scenario


def _register_all() -> None:
    from bench.flatten import flatten_vs_commit
    from bench.s_cluster import cluster
    from bench.s_engine import dispatch, exit_detection, throughput
    from bench.s_faults import faults
    from bench.s_memory import actor_cost, growth
    from bench.s_snapshots import snapshot_value, stale_snapshot

    for scenario in (
        Scenario("dispatch", 1, dispatch),
        Scenario("throughput", 2, throughput),
        Scenario("actor_cost", 3, actor_cost, own_process=True, docker=False),
        Scenario("snapshot_value", 4, snapshot_value),
        Scenario("stale_snapshot", 5, stale_snapshot),
        Scenario("exit_detection", 6, exit_detection),
        Scenario("growth", 7, growth, own_process=True, docker=False),
        Scenario("faults", 8, faults),
        Scenario("cluster", 9, cluster, docker=False),
        # Not in the list: what one flatten costs against one commit.
        Scenario("flatten_vs_commit", 10, flatten_vs_commit, in_quick=False),
    ):
        register(scenario)


_register_all()
