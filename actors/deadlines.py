"""When the Supervisor acts on a job by itself: one rule for the Tick and the status.

A Tick times out a running job at its deadline, and stops it again when the
last stop did not end it within the grace. The status reports those same
times, so a drain (or a person) can wait for them rather than guess. Both
read them here, so the two cannot drift apart. Pure functions of a Flight.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from actors.flight import Flight
from actors.model import Job, JobState

__all__ = ["TickAction", "due_times", "next_due", "tick_action"]

TickAction = Literal["time_out", "stop_again"]


def tick_action(flight: Flight, now: float, grace_s: float) -> TickAction | None:
    """What a Tick at ``now`` must do to this flight, if anything."""
    if flight.phase != "running":
        return None
    if flight.kill is None:
        deadline = flight.deadline
        return "time_out" if deadline is not None and deadline <= now else None
    if not flight.stop_pending and now - flight.stopped_at > grace_s:
        return "stop_again"  # the last stop did not end it
    return None


def next_due(flight: Flight, now: float, grace_s: float, relisting: bool) -> float | None:
    """When a Tick next acts on this flight by itself; None while it awaits a reply."""
    if flight.phase == "recovering" and relisting:
        return now  # the next Tick lists the containers again
    if flight.phase != "running" or flight.stop_pending:
        return None  # a Spawner or the Reaper owes a reply
    if flight.kill is None:
        return flight.deadline
    return flight.stopped_at + grace_s


def due_times(
    flights: Iterable[Flight],
    unfinished: Iterable[Job],
    now: float,
    grace_s: float,
    relisting: bool,
) -> tuple[tuple[str, float], ...]:
    """(job ID, when it is next due), sorted by job ID: queued jobs still backing
    off (a backoff that has ended delays nothing: the job waits for a place),
    then every flight's own next time."""
    due = {
        job.id: job.retry_at
        for job in unfinished
        if job.state is JobState.QUEUED and job.retry_at is not None and job.retry_at > now
    }
    for flight in flights:
        at = next_due(flight, now, grace_s, relisting)
        if at is not None:
            due[flight.job.id] = at
    return tuple(sorted(due.items()))
