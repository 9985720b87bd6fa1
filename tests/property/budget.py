"""How much work each hypothesis profile buys, in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass

from hypothesis import HealthCheck, settings

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")


@dataclass(frozen=True)
class Budget:
    machine_examples: int
    machine_steps: int
    bad_input_examples: int
    # The two-host cluster machine: each example starts two hosts on PostgreSQL.
    cluster_examples: int = 15
    cluster_steps: int = 20


BUDGETS = {
    "ci": Budget(machine_examples=200, machine_steps=30, bad_input_examples=200),
    "thorough": Budget(
        machine_examples=2000,
        machine_steps=40,
        bad_input_examples=2000,
        cluster_examples=300,
        cluster_steps=40,
    ),
}


def budget() -> Budget:
    return BUDGETS.get(PROFILE, BUDGETS["ci"])


def register_profiles() -> None:
    # Real actor threads make timing vary: no deadline, and a slow data
    # generator is not a failure.
    common = {
        "deadline": None,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    }
    settings.register_profile("ci", **common)
    settings.register_profile("thorough", max_examples=2000, **common)
