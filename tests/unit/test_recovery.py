"""Recovery as a table: unfinished jobs + a container listing -> one decision each.

No actors and no threads: ``actors.recovery`` is pure, so every case of a
restart (or of a Spawner that died mid-start) is one row here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import pytest

from actors.engine.base import ContainerState, ContainerStatus
from actors.labels import (
    LABEL_ATTEMPT,
    LABEL_JOB_ID,
    LABEL_MANAGED,
    LABEL_PROJECT,
    LABEL_WORK_ITEM,
)
from actors.messages import ContainerExited
from actors.model import Job, JobSpec, JobState, Snapshot, SnapshotKey
from actors.recovery import (
    NOT_STARTED_NOTE,
    Adopt,
    AwaitListing,
    Decision,
    Ended,
    Requeue,
    Vanished,
    committed_before_restart,
    exit_of,
    orphans,
    plan,
    superseded,
    unowned_running,
)

KEY = SnapshotKey("p", "w")


def job(state: JobState, *, container_id: str | None = None, job_id: str = "j-1") -> Job:
    return Job(job_id, JobSpec("p", "w"), state, 100.0, container_id=container_id, started_at=150.0)


def container(
    cid: str,
    status: ContainerStatus = "running",
    *,
    job_id: str | None = "j-1",
    created_at: float = 200.0,
    labels: Mapping[str, str] | None = None,
    exit_code: int | None = None,
) -> ContainerState:
    base = {LABEL_MANAGED: "true", LABEL_PROJECT: "p", LABEL_WORK_ITEM: "w"}
    if job_id is not None:
        base[LABEL_JOB_ID] = job_id
    return ContainerState(
        cid, status, "sha256:img", {**base, **(labels or {})}, exit_code, False, created_at
    )


QUEUED = job(JobState.QUEUED)
STARTING = job(JobState.STARTING)
RUNNING = job(JobState.RUNNING, container_id="c-run")
CANCELLED = job(JobState.CANCELLED, container_id="c-run")
RUN_C = container("c-run")
NEW_C = container("c-new", "created")
LATER_C = container("c-later", created_at=300.0)


@pytest.mark.parametrize(
    ("jobs", "containers", "expected"),
    [
        pytest.param([QUEUED], [], [], id="queued: the store hands it out, nothing to do"),
        pytest.param([STARTING], [], [Requeue(STARTING, NOT_STARTED_NOTE)], id="starting, none"),
        pytest.param(
            [STARTING],
            [NEW_C],
            [Requeue(STARTING, NOT_STARTED_NOTE, remove="c-new")],
            id="starting, created never started: removed and re-queued",
        ),
        pytest.param([STARTING], [RUN_C], [Adopt(STARTING, RUN_C)], id="starting, running"),
        pytest.param(
            [STARTING],
            [RUN_C, LATER_C],
            [Adopt(STARTING, LATER_C)],
            id="starting, two labelled: the newest",
        ),
        pytest.param([RUNNING], [RUN_C], [Adopt(RUNNING, RUN_C)], id="running, container there"),
        pytest.param([RUNNING], [LATER_C], [Vanished(RUNNING)], id="running, by ID only"),
        pytest.param([RUNNING], [], [Vanished(RUNNING)], id="running, container gone"),
        pytest.param([CANCELLED], [RUN_C], [Ended(CANCELLED, "c-run")], id="ended, stop it"),
        pytest.param([CANCELLED], [], [Ended(CANCELLED, None)], id="ended, nothing left"),
        pytest.param([STARTING], None, [AwaitListing(STARTING)], id="engine down: wait"),
        pytest.param([RUNNING], None, [AwaitListing(RUNNING)], id="engine down: running waits"),
        # Regression: ending it released its key while its container still ran, and
        # the next job of the key started beside it (make test failed ~1 in 8 under load).
        pytest.param([CANCELLED], None, [AwaitListing(CANCELLED)], id="engine down: ended waits"),
    ],
)
def test_plan(
    jobs: list[Job], containers: list[ContainerState] | None, expected: list[Decision]
) -> None:
    assert plan(jobs, containers) == expected


def test_a_note_says_why_a_job_is_requeued() -> None:
    notes = {"j-1": "retrying: spawner-1 crashed"}
    assert plan([STARTING], [], notes) == [Requeue(STARTING, "retrying: spawner-1 crashed")]


@pytest.mark.parametrize(
    ("snapshot_at", "key", "committed"),
    [
        (160.0, KEY, True),  # made after it started: its own commit
        (150.0, KEY, True),
        (140.0, KEY, False),  # older: a previous job's
        (160.0, SnapshotKey("p", "other"), False),
    ],
)
def test_a_vanished_job_committed_if_a_newer_snapshot_of_its_key_exists(
    snapshot_at: float, key: SnapshotKey, committed: bool
) -> None:
    snap = Snapshot(key, "sha256:s", "tag", "sha256:b", snapshot_at, snapshot_at, 1, 1)
    assert committed_before_restart(RUNNING, [snap]) is committed


def test_unowned_running_containers_hold_their_keys() -> None:
    listing = [
        container("c-owned"),
        container("c-starting", job_id="j-starting"),
        container("c-left", job_id="j-old"),
        container("c-unlabelled-job", job_id=None),
        container("c-exited", "exited", job_id="j-x"),
        container("c-foreign", labels={LABEL_MANAGED: "false"}),
    ]
    found = unowned_running(listing, owned={"c-owned"}, in_flight={"j-starting"})
    assert found == {"c-left": (KEY, "j-old"), "c-unlabelled-job": (KEY, None)}


def test_orphans_are_old_enough_unowned_managed_containers() -> None:
    listing = [
        container("c-owned", created_at=0.0),
        container("c-young", created_at=95.0, job_id="j-y"),
        container("c-old", created_at=10.0, job_id="j-o"),
        container("c-starting", created_at=10.0, job_id="j-s"),
        container("c-foreign", created_at=10.0, labels={LABEL_MANAGED: "false"}),
    ]
    assert orphans(listing, {"c-owned"}, {"j-s"}, now=100.0, grace_s=30.0) == [("c-old", "j-o")]


def test_an_unknown_exit_code_is_never_success() -> None:
    assert exit_of(container("c", "dead", exit_code=None)) == ContainerExited("c", -1, False)
    assert exit_of(container("c", "exited", exit_code=0)) == ContainerExited("c", 0, False)


@pytest.mark.parametrize(
    ("host", "attempt", "label", "expected"),
    [
        ("host-a", 0, "0", False),  # still this host's attempt
        (None, 0, "0", False),  # queued again, same attempt: recovery's to judge
        ("host-b", 1, "0", True),  # rescued by another host
        ("host-b", 0, None, True),  # no attempt label: judged by host alone
        (None, 1, "0", True),  # queued again as a new attempt (after a fence)
        ("host-a", 2, "1", True),  # this host's again, but a newer attempt
        ("host-a", 0, None, False),
    ],
)
def test_a_container_is_superseded_when_its_job_is_another_hosts_or_attempts(
    host: str | None, attempt: int, label: str | None, expected: bool
) -> None:
    stored = dataclasses.replace(job(JobState.RUNNING), host=host, attempt=attempt)
    labels = {} if label is None else {LABEL_ATTEMPT: label}
    assert superseded(container("c1", labels=labels), stored, "host-a") is expected
    assert superseded(container("c1", labels=labels), stored, None) is (
        expected and label is not None and int(label) != attempt
    )
