"""Scenario 9's judge of affinity (``bench.s_cluster.affinity_hits``), with no timing.

The scenario itself runs in ``python -m bench --quick`` (``make test``).
"""

from __future__ import annotations

from actors.model import Job, JobSpec, JobState
from bench.s_cluster import affinity_hits


def _job(item: str, started: float, host: str, *, local: bool, committed: bool = True) -> Job:
    return Job(
        f"{item}-{started:g}",
        JobSpec("p", item),
        JobState.SUCCEEDED,
        created_at=0.0,
        from_snapshot=local,
        snapshot_committed=committed,
        started_at=started,
        host=host,
    )


def test_a_job_counts_when_its_keys_previous_job_left_a_snapshot() -> None:
    jobs = [
        _job("a", 1.0, "h1", local=False),  # the key's first: nothing to hit
        _job("a", 2.0, "h1", local=True),  # hit
        _job("a", 3.0, "h2", local=True),  # moved host (pulled): a miss
        _job("b", 1.5, "h2", local=False, committed=False),
        _job("b", 2.5, "h2", local=False),  # no snapshot before it: not counted
        _job("b", 3.5, "h2", local=False),  # one to start from, started from base: a miss
    ]
    assert affinity_hits(jobs) == (3, 1)


def test_jobs_are_taken_in_start_order_not_listing_order() -> None:
    later = _job("a", 2.0, "h1", local=True)
    first = _job("a", 1.0, "h1", local=False)
    assert affinity_hits([later, first]) == (1, 1)
