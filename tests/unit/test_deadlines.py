"""The Tick and the status read one rule for when a job is due: a table of cases."""

from __future__ import annotations

import dataclasses

import pytest

from actors.deadlines import due_times, next_due, tick_action
from actors.flight import Flight, Kill, Phase
from actors.model import Job, JobSpec, JobState

GRACE = 5.0
JOB = Job(id="j-1", spec=JobSpec("p", "w"), state=JobState.RUNNING, created_at=0.0)


def flight(phase: Phase = "running", **fields: object) -> Flight:
    return dataclasses.replace(Flight(JOB, phase), **fields)  # type: ignore[arg-type]


KILLED = Kill(JobState.TIMED_OUT, "timed out")


@pytest.mark.parametrize(
    ("case", "now", "action", "due"),
    [
        (flight(deadline=100.0), 99.0, None, 100.0),
        (flight(deadline=100.0), 100.0, "time_out", 100.0),
        (flight(deadline=None), 1e9, None, None),  # no timeout: never due by itself
        (flight(kill=KILLED, stop_pending=True), 200.0, None, None),  # a stop is on its way
        (flight(kill=KILLED, stopped_at=100.0), 105.0, None, 105.0),  # within the grace
        (flight(kill=KILLED, stopped_at=100.0), 105.5, "stop_again", 105.0),
        (flight("starting", deadline=1.0), 50.0, None, None),  # a Spawner owes a reply
    ],
)
def test_the_tick_acts_exactly_when_the_status_says_it_is_due(
    case: Flight, now: float, action: str | None, due: float | None
) -> None:
    assert tick_action(case, now, GRACE) == action
    assert next_due(case, now, GRACE, relisting=False) == due
    if action is not None:
        assert due is not None
        assert due <= now  # never acted on before it was due


def test_a_recovering_job_is_due_at_the_next_listing_only_when_one_is_asked_for() -> None:
    recovering = flight("recovering")
    assert next_due(recovering, 7.0, GRACE, relisting=True) == 7.0
    assert next_due(recovering, 7.0, GRACE, relisting=False) is None


def test_only_queued_jobs_still_backing_off_are_due() -> None:
    waiting = dataclasses.replace(JOB, id="j-2", state=JobState.QUEUED, retry_at=30.0)
    over = dataclasses.replace(JOB, id="j-3", state=JobState.QUEUED, retry_at=10.0)
    running = flight(deadline=100.0)
    assert due_times([running], [waiting, over], 20.0, GRACE, False) == (
        ("j-1", 100.0),
        ("j-2", 30.0),
    )
