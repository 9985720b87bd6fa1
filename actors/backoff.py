"""One backoff policy, built from tenacity's wait strategies.

The Spawner's start retries, the Supervisor's requeue and the Watcher's
reconnect all wait by it: exponential from ``retry.backoff_initial_s``,
capped at ``retry.backoff_max_s``, plus up to ``backoff_initial_s`` of jitter
so that jobs refused together do not all come back at the same instant.
"""

from __future__ import annotations

from tenacity import RetryCallState, Retrying, wait_exponential_jitter
from tenacity.wait import wait_base

from actors.settings import RetrySettings

__all__ = ["backoff", "delay_after"]

# 2 ** 64 times the initial wait is past any cap; a bigger exponent only costs
# time (tenacity computes it exactly before it caps it).
_MAX_EXPONENT = 64


def backoff(retry: RetrySettings) -> wait_base:
    """The wait strategy: use it as ``Retrying(wait=...)`` or through ``delay_after``."""
    return wait_exponential_jitter(
        multiplier=retry.backoff_initial_s,
        max=retry.backoff_max_s,
        jitter=retry.backoff_initial_s,
    )


def delay_after(wait: wait_base, failures: int) -> float:
    """The wait after ``failures`` failures in a row, for loops tenacity does not drive.

    A requeue and a reconnect are not one call retried in place: they are
    counted by their owner, who asks here how long the next wait is.
    """
    state = RetryCallState(Retrying(), None, (), {})
    state.attempt_number = max(1, min(failures, _MAX_EXPONENT))
    return float(wait(state))
