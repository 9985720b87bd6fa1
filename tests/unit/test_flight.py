"""The exit -> commit decision and the run's outcome, as tables (``actors.flight``)."""

from __future__ import annotations

import pytest

from actors.backoff import backoff, delay_after
from actors.flight import Flight, Kill, on_exit, outcome
from actors.messages import ContainerExited
from actors.model import Job, JobSpec, JobState
from actors.settings import RetrySettings

CANCEL = Kill(JobState.CANCELLED, "cancelled while running")
TIMEOUT = Kill(JobState.TIMED_OUT, "timed out after 5s")


def flight(kill: Kill | None = None) -> Flight:
    return Flight(Job("j-1", JobSpec("p", "w"), JobState.RUNNING, 0.0), "running", kill=kill)


@pytest.mark.parametrize(
    ("kill", "code", "snapshots_on", "commit"),
    [
        (None, 0, True, True),  # the one case that becomes a snapshot
        (None, 0, False, False),
        (None, 1, True, False),
        (None, 137, True, False),
        (CANCEL, 0, True, False),  # a kill wins over the exit it causes
        (TIMEOUT, 0, True, False),
    ],
)
def test_commit_only_a_clean_exit_nobody_caused(
    kill: Kill | None, code: int, snapshots_on: bool, commit: bool
) -> None:
    f = flight(kill)
    assert on_exit(f, ContainerExited("c", code), snapshots_on) is commit
    assert f.phase == "finishing"


@pytest.mark.parametrize(
    ("kill", "oom", "code", "error", "expected"),
    [
        (None, False, 0, None, (JobState.SUCCEEDED, None)),
        (None, False, 0, "commit failed", (JobState.SUCCEEDED, "commit failed")),
        (None, False, 3, None, (JobState.FAILED, "exited with code 3")),
        (None, False, 3, "boom", (JobState.FAILED, "exited with code 3: boom")),
        (
            None,
            True,
            137,
            None,
            (JobState.FAILED, "exited with code 137 (out of memory: killed by the OOM killer)"),
        ),
        (CANCEL, False, 0, None, (JobState.CANCELLED, "cancelled while running")),
        (TIMEOUT, False, 137, "x", (JobState.TIMED_OUT, "timed out after 5s")),
    ],
)
def test_outcome(
    kill: Kill | None,
    oom: bool,
    code: int,
    error: str | None,
    expected: tuple[JobState, str | None],
) -> None:
    f = flight(kill)
    on_exit(f, ContainerExited("c", code, oom), snapshots_on=True)
    assert outcome(f, code, error) == expected


def test_an_oom_mark_survives_a_second_exit_report() -> None:
    f = flight()
    on_exit(f, ContainerExited("c", 137, oom=True), snapshots_on=True)
    on_exit(f, ContainerExited("c", 137, oom=False), snapshots_on=True)
    assert f.exit == ContainerExited("c", 137, oom=True)


def test_backoff_grows_to_its_cap_with_bounded_jitter() -> None:
    wait = backoff(RetrySettings(backoff_initial_s=0.5, backoff_max_s=30.0))
    for failures, low in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0)]:
        assert low <= delay_after(wait, failures) <= low + 0.5
    assert delay_after(wait, 10) == 30.0
    # Days of outage: a huge count must neither overflow nor take long.
    assert delay_after(wait, 10**9) == 30.0
