"""Supervisor: limits, per-key serialization, timeouts, cancel, orphans, recovery, supervision.

Real actors (Supervisor, Spawners, SnapshotManager, Reaper, Watcher) on a
MemoryEngine with a FakeClock. Containers run until the test ends them.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pykka
import pytest
from actor_kit import KIT_INSTANCE, Collector
from yard_kit import Yard, eventually, yard_settings

from actors.engine.base import ContainerMissing, EngineUnavailable
from actors.labels import (
    LABEL_INSTANCE,
    LABEL_JOB_ID,
    LABEL_MANAGED,
    LABEL_PROJECT,
    LABEL_WORK_ITEM,
    MANAGED_FILTER,
)
from actors.messages import (
    Cancel,
    ContainerExited,
    Finish,
    Finished,
    GetJob,
    GetStatus,
    ListJobs,
    ListSnapshots,
    PruneJobs,
    Reconcile,
    Started,
    SupervisorStatus,
    SweepOrphans,
)
from actors.model import InvalidJob, Job, JobState, SnapshotKey, validate_spec
from actors.settings import AgentTypeSettings, ProjectSettings
from actors.spawner import Spawner
from actors.store import new_job_id
from actors.supervisor import SupervisorStopped, job_timeout
from actors.wiring import spawner_factory, start_root, start_snapshots


@pytest.fixture(autouse=True)
def _stop_actors() -> Iterator[None]:
    yield
    pykka.ActorRegistry.stop_all()


def finish_all(yard: Yard, expected_total: int, max_running: int) -> None:
    """Exit running containers batch by batch until ``expected_total`` have run,
    asserting the engine never shows more than ``max_running`` at once."""
    remaining = expected_total
    while remaining:
        want = min(max_running, remaining)
        batch = eventually(yard.running, lambda cs, want=want: len(cs) >= want, f"{want} running")
        assert len(batch) <= max_running
        for container in batch:
            yard.engine.exit_container(container.id, 0)
        remaining -= len(batch)


# --- intake and limits ------------------------------------------------------


def test_submit_persists_queued_before_replying(tmp_path: Path) -> None:
    yard = Yard(tmp_path, yard_settings(max_workers=1)).start()
    first = yard.submit(work_item="a")
    second = yard.submit(work_item="b")
    assert second.state is JobState.QUEUED
    stored = yard.store.get(second.id)
    assert stored is not None
    assert stored.state is JobState.QUEUED  # still waiting: one worker, busy
    assert yard.store.history(first.id)[0][0] is JobState.QUEUED


def test_unknown_project_is_refused_when_configured(tmp_path: Path) -> None:
    settings = yard_settings(allow_unknown_projects=False).replace(
        projects={"known": ProjectSettings()}
    )
    yard = Yard(tmp_path, settings).start()
    with pytest.raises(InvalidJob, match=r"unknown project 'nope'.*\[projects\.nope\]"):
        yard.submit(project="nope")
    assert yard.submit(project="known").state is JobState.QUEUED
    assert yard.store.list(project="nope") == []


def test_max_workers_never_overshoots_under_concurrent_submits(tmp_path: Path) -> None:
    yard = Yard(tmp_path, yard_settings(max_workers=3, spawners=4)).start()
    observed: list[int] = []

    def count_running() -> None:
        observed.append(len(yard.running()) + 1)  # the one about to start

    yard.engine.before("start_container", count_running, once=False)
    jobs: list[Job] = []
    lock = threading.Lock()

    def submit_many(thread: int) -> None:
        for i in range(8):
            job = yard.submit(project=f"p{thread}", work_item=f"w{i}")
            with lock:
                jobs.append(job)

    threads = [threading.Thread(target=submit_many, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(jobs) == 32
    finish_all(yard, 32, max_running=3)
    done = eventually(
        lambda: yard.sup.ask(ListJobs(state="succeeded", limit=100), timeout=10),
        lambda js: len(js) == 32,
        "32 succeeded jobs",
    )
    assert {j.id for j in done} == {j.id for j in jobs}
    assert max(observed) <= 3
    assert max(observed) == 3  # and the limit is actually used


def test_one_job_per_work_item_and_the_next_starts_from_its_snapshot(tmp_path: Path) -> None:
    yard = Yard(tmp_path, yard_settings(spawners=1)).start()  # one Spawner: creation order is FIFO
    a1 = yard.submit(work_item="A")
    a2 = yard.submit(work_item="A")
    a3 = yard.submit(work_item="A")
    b1 = yard.submit(work_item="B")
    running = eventually(yard.running, lambda cs: len(cs) == 2, "A1 and B1 running")
    assert {yard.running_job(a1.id).container_id, yard.running_job(b1.id).container_id} == {
        c.id for c in running
    }
    assert yard.job(a2.id).state is JobState.QUEUED
    assert yard.job(a3.id).state is JobState.QUEUED

    yard.engine.exit_container(yard.running_job(a1.id).container_id or "", 0)
    first = yard.wait_state(a1.id, JobState.SUCCEEDED)
    assert first.snapshot_committed
    second = yard.running_job(a2.id)
    # A2 started only after A1's commit was registered: it reuses the snapshot.
    assert second.from_snapshot
    assert yard.job(a3.id).state is JobState.QUEUED
    yard.engine.exit_container(second.container_id or "", 0)
    third = yard.running_job(a3.id)
    assert third.from_snapshot
    assert yard.created_for() == [a1.id, b1.id, a2.id, a3.id]


def test_fifo_and_a_blocked_job_does_not_block_unrelated_ones(tmp_path: Path) -> None:
    yard = Yard(tmp_path, yard_settings(max_workers=2, spawners=1)).start()
    jobs = [yard.submit(work_item=item) for item in ("x", "x", "y", "z", "w")]
    # x1 and y run; x2 waits for its key; z and w wait for capacity, in order.
    eventually(yard.running, lambda cs: len(cs) == 2, "two running")
    assert yard.created_for() == [jobs[0].id, jobs[2].id]
    yard.engine.exit_container(yard.running_job(jobs[2].id).container_id or "", 0)
    yard.running_job(jobs[3].id)  # z, not x2 (its key is still busy)
    yard.engine.exit_container(yard.running_job(jobs[0].id).container_id or "", 0)
    yard.running_job(jobs[1].id)  # x2, before w: FIFO once its key is free
    assert yard.created_for() == [jobs[0].id, jobs[2].id, jobs[3].id, jobs[1].id]
    assert yard.job(jobs[4].id).state is JobState.QUEUED


def test_per_project_and_per_agent_type_caps(tmp_path: Path) -> None:
    settings = yard_settings(max_workers=10).replace(
        projects={"capped": ProjectSettings(max_concurrent=1)},
        agent_types={"review": AgentTypeSettings(max_concurrent=2)},
    )
    yard = Yard(tmp_path, settings).start()
    capped = [yard.submit(project="capped", work_item=f"c{i}") for i in range(3)]
    reviews = [
        yard.submit(project="free", work_item=f"r{i}", agent_type="review") for i in range(3)
    ]
    other = yard.submit(project="free", work_item="o")
    eventually(yard.running, lambda cs: len(cs) == 4, "4 running")
    yard.running_job(capped[0].id)
    yard.running_job(reviews[0].id)
    yard.running_job(reviews[1].id)
    yard.running_job(other.id)
    assert yard.job(capped[1].id).state is JobState.QUEUED
    assert yard.job(reviews[2].id).state is JobState.QUEUED
    yard.engine.exit_container(yard.running_job(capped[0].id).container_id or "", 0)
    yard.running_job(capped[1].id)
    assert yard.job(capped[2].id).state is JobState.QUEUED


def test_jobs_wait_for_capacity_instead_of_failing(tmp_path: Path) -> None:
    yard = Yard(tmp_path, yard_settings(max_workers=1, default_timeout_s=10.0**6)).start()
    jobs = [yard.submit(work_item=f"w{i}") for i in range(5)]
    yard.tick(3600 * 24)  # a day passes: waiting is not a timeout
    assert [yard.job(j.id).state for j in jobs[1:]] == [JobState.QUEUED] * 4
    finish_all(yard, 5, max_running=1)
    for job in jobs:
        assert yard.wait_state(job.id, JobState.SUCCEEDED).exit_code == 0


# --- outcomes -----------------------------------------------------------------


def test_non_zero_exit_fails_without_commit_and_oom_says_so(tmp_path: Path) -> None:
    yard = Yard(tmp_path).start()
    failing = yard.submit(work_item="a")
    oom = yard.submit(work_item="b")
    yard.engine.append_logs(yard.running_job(failing.id).container_id or "", stdout="boom\n")
    yard.engine.exit_container(yard.running_job(failing.id).container_id or "", 3)
    yard.engine.exit_container(yard.running_job(oom.id).container_id or "", 137, oom=True)
    failed = yard.wait_state(failing.id, JobState.FAILED)
    assert failed.exit_code == 3
    assert failed.error is not None
    assert "exited with code 3" in failed.error
    assert "boom" in failed.logs_tail
    assert not failed.snapshot_committed
    killed = yard.wait_state(oom.id, JobState.FAILED)
    assert killed.error is not None
    assert "out of memory" in killed.error
    assert yard.engine.calls_of("commit_container") == []


def test_exits_of_unknown_containers_are_ignored(tmp_path: Path) -> None:
    yard = Yard(tmp_path).start()
    job = yard.running_job(yard.submit().id)
    yard.sup.ask(ContainerExited("f" * 64, 0), timeout=10)
    assert yard.job(job.id).state is JobState.RUNNING


def test_deadline_follows_job_then_watchdog_then_agent_then_default(tmp_path: Path) -> None:
    settings = yard_settings(default_timeout_s=100.0, watchdog_buffer_s=5.0).replace(
        projects={"wd": ProjectSettings(watchdog_s=50.0)},
        agent_types={"slow": AgentTypeSettings(timeout_s=70.0)},
    )
    assert job_timeout(settings, validate_spec("wd", "w", timeout_s=9)) == 9
    assert job_timeout(settings, validate_spec("wd", "w", agent_type="slow")) == 55
    assert job_timeout(settings, validate_spec("p", "w", agent_type="slow")) == 70
    assert job_timeout(settings, validate_spec("p", "w")) == 100
    yard = Yard(tmp_path, settings).start()
    job = yard.running_job(yard.submit(project="wd").id)
    assert job.started_at is not None
    assert job.deadline == job.started_at + 55


# --- timeouts and cancel ------------------------------------------------------


def test_timeout_sigterm_then_sigkill_ends_timed_out_without_commit(tmp_path: Path) -> None:
    yard = Yard(tmp_path).start()
    job = yard.running_job(yard.submit(timeout_s=30).id)
    cid = job.container_id or ""
    yard.engine.ignore_sigterm(cid)
    yard.tick(29)
    assert yard.job(job.id).state is JobState.RUNNING
    yard.tick(2)
    done = yard.wait_state(job.id, JobState.TIMED_OUT)
    assert done.exit_code == 137  # SIGKILL after the grace
    assert done.error == "timed out after 30s"
    assert not done.snapshot_committed
    assert yard.engine.calls_of("stop_container") == [(cid, 10.0)]
    assert 10.0 in yard.clock.slept  # the grace went through the clock
    assert yard.engine.calls_of("commit_container") == []
    assert not yard.exists(cid)
    # A kill wins over the exit it caused, for good.
    yard.sup.ask(ContainerExited(cid, 1), timeout=10)
    yard.sup.ask(Reconcile(), timeout=10)
    yard.tick(100)
    assert yard.job(job.id).state is JobState.TIMED_OUT
    assert yard.snapshots.ask(ListSnapshots(), timeout=10) == []


def test_a_stop_that_failed_is_sent_again_on_a_later_tick(tmp_path: Path) -> None:
    yard = Yard(tmp_path).start()
    job = yard.running_job(yard.submit(timeout_s=30).id)
    yard.engine.fail_next("stop_container", times=3)  # the Spawner's whole retry budget
    listings = len(yard.engine.calls_of("list_containers"))
    yard.tick(31)
    # Terminated (after three failed stops) makes the Supervisor look at the engine.
    eventually(
        lambda: len(yard.engine.calls_of("list_containers")),
        lambda n: n > listings,
        "the listing that follows Terminated",
    )
    assert len(yard.engine.calls_of("stop_container")) == 3
    yard.tick(1)
    assert yard.job(job.id).state is JobState.RUNNING  # not yet: a grace period first
    yard.tick(10)
    done = yard.wait_state(job.id, JobState.TIMED_OUT)
    assert not done.snapshot_committed
    assert len(yard.engine.calls_of("stop_container")) == 4


def test_timeout_frees_the_key_for_the_next_job(tmp_path: Path) -> None:
    yard = Yard(tmp_path).start()
    first = yard.running_job(yard.submit(timeout_s=5).id)
    second = yard.submit()
    yard.tick(6)
    yard.wait_state(first.id, JobState.TIMED_OUT)
    assert not yard.running_job(second.id).from_snapshot


def test_cancel_queued_never_starts(tmp_path: Path) -> None:
    yard = Yard(tmp_path, yard_settings(max_workers=1)).start()
    running = yard.running_job(yard.submit(work_item="a").id)
    queued = yard.submit(work_item="b")
    cancelled = yard.sup.ask(Cancel(queued.id), timeout=10)
    assert cancelled.state is JobState.CANCELLED
    yard.engine.exit_container(running.container_id or "", 0)
    yard.wait_state(running.id, JobState.SUCCEEDED)
    assert yard.job(queued.id).state is JobState.CANCELLED
    assert queued.id not in yard.created_for()
    assert yard.sup.ask(Cancel("j-unknown"), timeout=10) is None


def test_cancel_running_terminates_without_commit(tmp_path: Path) -> None:
    yard = Yard(tmp_path).start()
    job = yard.running_job(yard.submit().id)
    cid = job.container_id or ""
    reply = yard.sup.ask(Cancel(job.id), timeout=10)
    assert reply.state is JobState.CANCELLED
    eventually(lambda: yard.exists(cid), lambda e: not e, "the container removed")
    done = yard.wait_state(job.id, JobState.CANCELLED)
    assert done.exit_code == 143  # SIGTERM was enough
    assert not done.snapshot_committed
    assert yard.engine.calls_of("commit_container") == []
    # The slot is free again, and the cancel of a finished job changes nothing.
    next_job = yard.running_job(yard.submit().id)
    assert not next_job.from_snapshot
    assert yard.sup.ask(Cancel(job.id), timeout=10).state is JobState.CANCELLED


# --- orphans ------------------------------------------------------------------


def test_orphan_sweep_removes_only_ours_and_only_after_grace(tmp_path: Path) -> None:
    """Ours: managed and labelled with this instance. Another instance's
    workers and unlabelled ones of no job of ours (made before the instance
    label) may be another Snapyard's: never removed (issue 11 item 1)."""
    yard = Yard(tmp_path, yard_settings(orphan_grace_s=300.0)).start()
    job = yard.running_job(yard.submit().id)
    ours = {**MANAGED_FILTER, LABEL_INSTANCE: KIT_INSTANCE}
    ours_running = yard.foreign_container({**ours, LABEL_JOB_ID: "j-gone"})
    ours_exited = yard.foreign_container(dict(ours))
    yard.engine.exit_container(ours_exited, 0)
    not_ours = yard.foreign_container({"com.example": "x"})
    not_ours_exited = yard.foreign_container({LABEL_MANAGED: "false"})
    yard.engine.exit_container(not_ours_exited, 1)
    other_instance = yard.foreign_container(
        {**MANAGED_FILTER, LABEL_INSTANCE: "other", LABEL_JOB_ID: "j-theirs"}
    )
    unlabelled = yard.foreign_container({**MANAGED_FILTER, LABEL_JOB_ID: "j-unknown"})
    spared = (not_ours, not_ours_exited, other_instance, unlabelled)

    yard.clock.advance(299)
    yard.sup.tell(SweepOrphans(yard.clock.now()))
    yard.reconcile_rounds()
    assert all(yard.exists(c) for c in (ours_running, ours_exited, *spared))

    yard.clock.advance(2)
    yard.sup.tell(SweepOrphans(yard.clock.now()))
    eventually(
        lambda: (yard.exists(ours_running), yard.exists(ours_exited)),
        lambda e: e == (False, False),
        "both orphans removed",
    )
    yard.reconcile_rounds()
    assert all(yard.exists(c) for c in spared)
    assert yard.exists(job.container_id or "")
    assert yard.job(job.id).state is JobState.RUNNING


def test_another_instances_workers_do_not_count_against_max_workers(tmp_path: Path) -> None:
    """Regression (issue 11, item 1): a (re)started instance counted the
    running workers of another instance on the engine as its own leftovers,
    so with ``max_workers = 1`` nothing ever started (and their keys blocked)."""
    yard = Yard(tmp_path, yard_settings(max_workers=1))
    theirs = yard.foreign_container(
        {
            **MANAGED_FILTER,
            LABEL_INSTANCE: "other",
            LABEL_JOB_ID: "j-theirs",
            LABEL_PROJECT: "p",
            LABEL_WORK_ITEM: "w",
        }
    )
    yard.start()
    job = yard.running_job(yard.submit(project="p", work_item="w").id)
    assert job.container_id != theirs
    assert yard.exists(theirs)


def test_the_retention_timer_deletes_finished_jobs_past_retention_s(tmp_path: Path) -> None:
    """Retention (issue 11): finished jobs with their history went nowhere, ever."""
    yard = Yard(tmp_path, yard_settings(retention_s=100.0)).start()
    done = yard.running_job(yard.submit(work_item="done").id)
    yard.engine.exit_container(done.container_id or "", 0)
    yard.wait_state(done.id, JobState.SUCCEEDED)
    queued_behind = yard.submit(work_item="busy", timeout_s=10.0**6)
    yard.clock.advance(99)
    assert yard.sup.ask(PruneJobs(), timeout=10.0) == 0  # not old enough yet
    yard.clock.advance(2)
    yard.actors.scheduler.run_due()
    assert yard.sup.ask(GetJob(done.id), timeout=10.0) is None
    assert yard.store.history(done.id) == []
    assert yard.sup.ask(GetJob(queued_behind.id), timeout=10.0) is not None


# --- restart recovery -----------------------------------------------------------


def restart(yard: Yard, tmp_path: Path, **overrides: object) -> Yard:
    yard.stop()
    return Yard(
        tmp_path,
        yard.settings,
        clock=yard.clock,
        engine=yard.engine,
        store=yard.store,
        **overrides,  # type: ignore[arg-type]
    ).start()


def test_restart_readopts_a_running_container_and_still_sees_its_exit(tmp_path: Path) -> None:
    yard = Yard(tmp_path).start()
    job = yard.running_job(yard.submit().id)
    yard2 = restart(yard, tmp_path)
    adopted = yard2.running_job(job.id)
    assert adopted.container_id == job.container_id
    assert adopted.deadline == job.deadline
    status: SupervisorStatus = yard2.sup.ask(GetStatus(), timeout=10)
    assert status.running == 1
    yard2.engine.exit_container(job.container_id or "", 0)
    done = yard2.wait_state(job.id, JobState.SUCCEEDED)
    assert done.snapshot_committed
    assert yard2.created_for() == [job.id]  # nothing ran twice


def test_restart_readopted_job_still_times_out(tmp_path: Path) -> None:
    yard = Yard(tmp_path).start()
    job = yard.running_job(yard.submit(timeout_s=60).id)
    yard2 = restart(yard, tmp_path)
    yard2.running_job(job.id)
    yard2.tick(61)
    assert yard2.wait_state(job.id, JobState.TIMED_OUT).error == "timed out after 60s"


def test_restart_finishes_a_container_that_exited_while_down_with_commit(tmp_path: Path) -> None:
    yard = Yard(tmp_path).start()
    job = yard.running_job(yard.submit(work_item="item").id)
    yard.stop()
    yard.engine.exit_container(job.container_id or "", 0)
    yard2 = Yard(
        tmp_path, yard.settings, clock=yard.clock, engine=yard.engine, store=yard.store
    ).start()
    done = yard2.wait_state(job.id, JobState.SUCCEEDED)
    assert done.snapshot_committed
    keys = [s.key for s in yard2.snapshots.ask(ListSnapshots(), timeout=10)]
    assert keys == [SnapshotKey("p", "item")]
    assert not yard2.exists(job.container_id or "")


def test_restart_exited_past_deadline_is_timed_out_not_committed(tmp_path: Path) -> None:
    yard = Yard(tmp_path).start()
    job = yard.running_job(yard.submit(timeout_s=10).id)
    yard.stop()
    yard.clock.advance(20)
    yard.engine.exit_container(job.container_id or "", 0)
    yard2 = Yard(
        tmp_path, yard.settings, clock=yard.clock, engine=yard.engine, store=yard.store
    ).start()
    done = yard2.wait_state(job.id, JobState.TIMED_OUT)
    assert not done.snapshot_committed
    assert yard2.engine.calls_of("commit_container") == []


def test_restart_after_the_deadline_of_a_job_that_exited_in_time_is_succeeded(
    tmp_path: Path,
) -> None:
    """From review: the deadline was compared with the restart time, not the exit time."""
    yard = Yard(tmp_path).start()
    job = yard.running_job(yard.submit(timeout_s=10).id)
    yard.stop()
    yard.clock.advance(5)
    yard.engine.exit_container(job.container_id or "", 0)  # in time
    yard.clock.advance(20)  # Snapyard comes back past the deadline
    yard2 = Yard(
        tmp_path, yard.settings, clock=yard.clock, engine=yard.engine, store=yard.store
    ).start()
    done = yard2.wait_state(job.id, JobState.SUCCEEDED, JobState.TIMED_OUT)
    assert done.state is JobState.SUCCEEDED
    assert done.snapshot_committed


def test_restart_starting_without_container_goes_back_to_queued(tmp_path: Path) -> None:
    yard = Yard(tmp_path)
    job = Job(new_job_id(), validate_spec("p", "w"), JobState.STARTING, yard.clock.now())
    yard.store.add(job)
    yard.start()
    yard.running_job(job.id)
    states = [state for state, _, _ in yard.store.history(job.id)]
    assert states == [JobState.STARTING, JobState.QUEUED, JobState.STARTING, JobState.RUNNING]
    assert yard.created_for() == [job.id]


def test_restart_starting_with_a_running_container_adopts_it(tmp_path: Path) -> None:
    yard = Yard(tmp_path)
    job = Job(new_job_id(), validate_spec("p", "w"), JobState.STARTING, yard.clock.now())
    yard.store.add(job)
    cid = yard.foreign_container({**MANAGED_FILTER, LABEL_JOB_ID: job.id})
    yard.start()
    assert yard.running_job(job.id).container_id == cid
    assert yard.created_for() == [job.id]  # only the one made above: not started twice


def test_restart_after_a_commit_whose_outcome_was_not_recorded_is_succeeded(
    tmp_path: Path,
) -> None:
    yard = Yard(tmp_path).start()
    job = yard.running_job(yard.submit(work_item="item").id)
    container_id = job.container_id or ""
    # The process dies right after its Spawner committed the clean exit and
    # removed the container, before the Supervisor stored the outcome.
    yard.stop()
    yard.engine.exit_container(container_id, 0)
    inbox: queue.Queue[Any] = queue.Queue()
    root = start_root(yard.settings, yard.clock, None)
    manager = start_snapshots(yard.engine, yard.settings, yard.clock, root)
    spawner = spawner_factory(yard.engine, manager, yard.settings, yard.clock)("spawner-x", root)
    collector = Collector.start(inbox)
    spawner.tell(Finish(job.id, job.spec, container_id, 0, True, collector))
    finished = inbox.get(timeout=10)
    assert isinstance(finished, Finished)
    assert finished.snapshot_image_id is not None
    for ref in (spawner, manager, collector, root):
        ref.stop()
    assert not yard.exists(container_id)

    yard2 = Yard(
        tmp_path, yard.settings, clock=yard.clock, engine=yard.engine, store=yard.store
    ).start()
    done = yard2.wait_state(job.id, JobState.SUCCEEDED, JobState.FAILED)
    assert done.state is JobState.SUCCEEDED, done.error
    assert done.snapshot_committed
    assert done.exit_code == 0
    assert yard2.created_for() == [job.id]  # recorded, not run again


def test_cancel_while_the_engine_is_down_then_restart_never_runs_two_jobs_of_one_key(
    tmp_path: Path,
) -> None:
    """Found by the property machine: the cancelled job's stop never reached the
    engine, the restarted supervisor did not know its container still ran, and
    started the next job of the same work item beside it."""
    yard = Yard(tmp_path).start()
    first = yard.running_job(yard.submit(work_item="w").id)
    first_container = first.container_id or ""
    yard.engine.set_unavailable(True)
    cancelled: Job = yard.sup.ask(Cancel(first.id), timeout=10)
    assert cancelled.state is JobState.CANCELLED
    second = yard.submit(work_item="w")
    yard2 = restart(yard, tmp_path)

    first_running_at_create: list[bool] = []

    def note_first() -> None:
        try:
            status = yard2.engine.container(first_container).status
        except ContainerMissing:
            status = "removed"
        first_running_at_create.append(status == "running")

    yard2.engine.before("create_container", note_first, once=False)
    yard2.engine.set_unavailable(False)
    yard2.engine_back.set()
    yard2.reconcile_rounds()
    for _ in range(20):
        yard2.tick(30)
        if yard2.job(second.id).state is JobState.RUNNING:
            break
    yard2.running_job(second.id)
    assert first_running_at_create == [False]
    assert not yard2.exists(first_container)
    assert yard2.job(first.id).state is JobState.CANCELLED


def test_restart_running_job_whose_container_vanished_fails_clearly(tmp_path: Path) -> None:
    yard = Yard(tmp_path)
    job = Job(
        new_job_id(),
        validate_spec("p", "w"),
        JobState.RUNNING,
        yard.clock.now(),
        container_id="e" * 64,
        started_at=yard.clock.now(),
    )
    yard.store.add(job)
    yard.start()
    failed = yard.wait_state(job.id, JobState.FAILED)
    assert failed.error is not None
    assert "disappeared" in failed.error


def test_restart_brings_queued_jobs_back_in_fifo_order(tmp_path: Path) -> None:
    yard = Yard(tmp_path, yard_settings(max_workers=1))
    jobs = []
    for item in ("a", "b", "c"):
        job = Job(new_job_id(), validate_spec("p", item), JobState.QUEUED, yard.clock.now())
        yard.clock.advance(1)
        jobs.append(job)
    for job in reversed(jobs):  # insertion order must not matter, creation order does
        yard.store.add(job)
    yard.start()
    finish_all(yard, 3, max_running=1)
    for job in jobs:
        yard.wait_state(job.id, JobState.SUCCEEDED)
    assert yard.created_for() == [j.id for j in jobs]


# --- engine outage --------------------------------------------------------------


def test_a_start_the_daemon_keeps_refusing_fails_the_job_instead_of_holding_it(
    tmp_path: Path,
) -> None:
    """From review: any 5xx counted as 'engine down', so a start the daemon
    refuses every time (an OCI error) re-queued the job forever."""
    yard = Yard(tmp_path).start()
    refusal = EngineUnavailable("OCI runtime start failed: init was OOM-killed", status_code=500)
    yard.engine.fail_next("start_container", times=10_000, error=refusal)
    job = yard.submit()
    for _ in range(200):
        state = eventually(
            lambda: yard.job(job.id).state,
            lambda s: s is not JobState.STARTING,
            "the spawn attempt to end",
        )
        if state is JobState.FAILED:
            break
        yard.tick(60)
    failed = yard.job(job.id)
    assert failed.state is JobState.FAILED
    assert failed.error is not None
    assert "refused to start it 11 times" in failed.error
    assert "OOM-killed" in failed.error
    assert yard.running() == []


def test_an_outage_longer_than_the_refusal_budget_never_fails_a_job(tmp_path: Path) -> None:
    """From review: the refusal budget counted every retry, so a long outage
    followed by one refused spawn while the daemon came back failed the job."""
    yard = Yard(tmp_path).start()  # 3 attempts a spawn: 60 failures are 20 re-queues
    unreachable = EngineUnavailable("connection refused")  # no status: not answered
    refusal = EngineUnavailable("daemon starting up", status_code=503)
    yard.engine.fail_next("create_container", times=60, error=unreachable)
    yard.engine.fail_next("start_container", times=3, error=refusal)  # one refused spawn
    job = yard.submit()
    for _ in range(200):
        state = eventually(
            lambda: yard.job(job.id).state,
            lambda s: s is not JobState.STARTING,
            "the spawn attempt to end",
        )
        if state is not JobState.QUEUED:
            break
        yard.tick(60)
    assert yard.job(job.id).state is JobState.RUNNING
    assert len(yard.engine.calls_of("create_container")) > 60


def test_engine_outage_jobs_wait_then_run(tmp_path: Path) -> None:
    yard = Yard(tmp_path).start()
    assert yard.watcher is not None
    eventually(yard.watcher.connected.is_set, bool, "watcher connected")  # type: ignore[union-attr]
    yard.engine_back.clear()  # hold the Watcher's reconnect backoff until the engine is back
    yard.engine.set_unavailable(True)
    job = yard.submit()
    eventually(
        lambda: [note for _, _, note in yard.store.history(job.id)],
        lambda notes: any(n and n.startswith("will retry") for n in notes),
        "a retryable spawn failure",
    )
    assert yard.job(job.id).state is JobState.QUEUED
    yard.tick(10)  # retried while still down: waits again, never failed
    eventually(
        lambda: [note for _, _, note in yard.store.history(job.id)],
        lambda notes: sum(1 for n in notes if n and n.startswith("will retry")) >= 2,
        "a second retryable failure",
    )
    assert yard.job(job.id).state is JobState.QUEUED
    assert yard.sup.is_alive()

    yard.engine.set_unavailable(False)
    yard.engine_back.set()
    yard.tick(60)
    running = yard.running_job(job.id)
    yard.engine.exit_container(running.container_id or "", 0)
    assert yard.wait_state(job.id, JobState.SUCCEEDED).snapshot_committed


def test_status_says_when_a_refused_start_and_a_running_job_are_due(tmp_path: Path) -> None:
    """A drain waits for the Supervisor's own deadlines: its status must tell them."""
    # No Watcher: one left reconnecting to a down engine would log into later tests.
    yard = Yard(tmp_path, watcher=False).start()
    running = yard.running_job(yard.submit(work_item="a", timeout_s=60).id)
    yard.engine.set_unavailable(True)
    refused = yard.submit(work_item="b")
    eventually(
        lambda: [note for _, _, note in yard.store.history(refused.id)],
        lambda notes: any(n and n.startswith("will retry") for n in notes),
        "a retryable spawn failure",
    )
    assert yard.sup.ask(GetStatus(), timeout=10).due == ()  # a health probe's ask: cheap
    status: SupervisorStatus = yard.sup.ask(GetStatus(deadlines=True), timeout=10)
    due = dict(status.due)
    assert due[running.id] == running.deadline
    assert due[refused.id] > yard.clock.now()  # its backoff, not a guess
    assert status.busy_keys == {SnapshotKey("p", "a")}


def test_cancelling_a_job_backing_off_starts_the_next_of_its_key_at_once(tmp_path: Path) -> None:
    """Issue 16's queue invariant found a job waiting with its key and a place free.

    Minimal example: the engine refuses A's start, so A backs off and B (same
    key) waits behind it; the engine is back; A is cancelled. B must start
    then, not at the next Tick (this Yard sends none).
    """
    yard = Yard(tmp_path, watcher=False).start()
    yard.engine.set_unavailable(True)
    first = yard.submit()
    eventually(
        lambda: [note for _, _, note in yard.store.history(first.id)],
        lambda notes: any(n and n.startswith("will retry") for n in notes),
        "a retryable spawn failure",
    )
    second = yard.submit()
    yard.engine.set_unavailable(False)
    assert yard.job(second.id).state is JobState.QUEUED  # behind the first's backoff
    assert yard.sup.ask(Cancel(first.id), timeout=10).state is JobState.CANCELLED
    yard.running_job(second.id)


def test_reconcile_sees_an_exit_the_events_missed(tmp_path: Path) -> None:
    yard = Yard(tmp_path, watcher=False).start()
    job = yard.running_job(yard.submit().id)
    yard.engine.exit_container(job.container_id or "", 0)  # nobody listening
    yard.tick(5)
    assert yard.job(job.id).state is JobState.RUNNING
    yard.sup.tell(Reconcile())
    assert yard.wait_state(job.id, JobState.SUCCEEDED).snapshot_committed


def test_an_exit_seen_before_started_is_not_lost(tmp_path: Path) -> None:
    clock_yard = Yard(tmp_path)
    clock_yard.engine.exit_policy = lambda _c: 0  # exits the moment it starts
    yard = clock_yard.start()
    job = yard.submit()
    assert yard.wait_state(job.id, JobState.SUCCEEDED).snapshot_committed


# --- supervision ----------------------------------------------------------------


def test_spawner_crash_mid_job_restarts_it_and_retries_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured: list[BaseException] = []
    monkeypatch.setattr("actors.reconcile.capture_error", lambda exc, **_kw: captured.append(exc))
    yard = Yard(tmp_path, yard_settings(spawners=1)).start()

    def boom() -> None:
        raise RuntimeError("injected spawner bug")

    yard.engine.before("create_container", boom, once=True)
    job = yard.submit()
    running = yard.running_job(job.id)
    notes = [note or "" for _, _, note in yard.store.history(job.id)]
    assert any("spawner-1 crashed" in n and "injected spawner bug" in n for n in notes)
    assert any("injected spawner bug" in str(exc) for exc in captured)
    yard.engine.exit_container(running.container_id or "", 0)
    assert yard.wait_state(job.id, JobState.SUCCEEDED).attempts >= 1
    status: SupervisorStatus = yard.sup.ask(GetStatus(), timeout=10)
    assert status.spawners == 1


def test_spawner_crash_after_start_adopts_the_container_instead_of_running_the_job_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Spawner._tell
    crashed = threading.Event()

    def tell(self: Spawner, ref: pykka.ActorRef[Any], message: object) -> None:
        if isinstance(message, Started) and not crashed.is_set():
            crashed.set()
            raise RuntimeError("injected crash after start")
        original(self, ref, message)

    monkeypatch.setattr(Spawner, "_tell", tell)
    yard = Yard(tmp_path, yard_settings(spawners=1)).start()
    job = yard.submit()
    running = yard.running_job(job.id)
    assert crashed.is_set()
    # The container the crashed Spawner had started is the job's: adopted, not run again.
    assert yard.created_for() == [job.id]
    assert [c.id for c in yard.running()] == [running.container_id]
    yard.engine.exit_container(running.container_id or "", 0)
    assert yard.wait_state(job.id, JobState.SUCCEEDED).snapshot_committed


def test_a_job_cancelled_while_starting_stays_cancelled_when_its_spawner_crashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From review: recovery after the crash rewrote CANCELLED as FAILED/SUCCEEDED."""
    original = Spawner._tell

    def tell(self: Spawner, ref: pykka.ActorRef[Any], message: object) -> None:
        if isinstance(message, Started):
            raise RuntimeError("injected crash after start")
        original(self, ref, message)

    monkeypatch.setattr(Spawner, "_tell", tell)
    yard = Yard(tmp_path, yard_settings(spawners=1))
    cancelled: list[Job] = []
    submitted: list[str] = []
    known = threading.Event()

    def cancel_it() -> None:
        # Runs in the Spawner: the submit may not have returned to the test yet.
        known.wait(10)
        cancelled.append(yard.sup.ask(Cancel(submitted[0]), timeout=10))

    yard.engine.before("start_container", cancel_it)
    yard.start()
    job_id = yard.submit().id
    submitted.append(job_id)
    known.set()
    final = eventually(
        lambda: yard.job(job_id), lambda j: j.finished_at is not None, "the job to be settled"
    )
    yard.reconcile_rounds()
    eventually(yard.running, lambda running: running == [], "its container to go")
    assert cancelled[0].state is JobState.CANCELLED
    assert final.state is JobState.CANCELLED
    assert yard.job(job_id).state is JobState.CANCELLED


def test_one_spawner_crash_is_handled_once_when_a_dispatch_also_finds_it_dead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From review: pykka marks an actor dead before on_failure runs; a Spawn sent
    in that window reported the crash a second time, restarting twice (and
    stopping the healthy replacement) and charging an innocent job."""
    captured: list[str] = []
    monkeypatch.setattr(
        "actors.reconcile.capture_error", lambda exc, **_kw: captured.append(str(exc))
    )
    gate = threading.Event()
    original = Spawner.on_failure

    def late_failure(self: Spawner, *args: Any) -> None:
        gate.wait(10)  # hold open the window between "dead" and the crash report
        original(self, *args)

    monkeypatch.setattr(Spawner, "on_failure", late_failure)

    def boom() -> None:
        raise RuntimeError("injected spawner bug")

    yard = Yard(tmp_path, yard_settings(spawners=1))
    yard.engine.before("create_container", boom, once=True)
    yard.start()
    # Its first reply comes after on_start, which starts the pool (pykka runs
    # on_start on the actor's thread, after start() has returned).
    yard.sup.ask(GetStatus(), timeout=10)
    (spawner,) = pykka.ActorRegistry.get_by_class(Spawner)
    first = yard.submit(work_item="a")
    eventually(spawner.is_alive, lambda alive: not alive, "the spawner to die")
    second = yard.submit(work_item="b")  # dispatched to the dead spawner
    gate.set()
    yard.running_job(first.id)
    yard.running_job(second.id)
    assert len([c for c in captured if "spawner-1 crashed" in c]) == 1
    status: SupervisorStatus = yard.sup.ask(GetStatus(), timeout=10)
    assert status.spawners == 1


def test_a_job_that_keeps_crashing_its_spawner_fails_with_the_reason(tmp_path: Path) -> None:
    yard = Yard(tmp_path).start()

    def boom() -> None:
        raise RuntimeError("poison job")

    yard.engine.before("create_container", boom, once=False)
    job = yard.submit()
    failed = yard.wait_state(job.id, JobState.FAILED)
    assert failed.error is not None
    assert "crashed" in failed.error
    assert "poison job" in failed.error
    assert yard.sup.is_alive()
    assert yard.fatal == []


def test_restart_intensity_exceeded_stops_the_supervisor_with_a_clear_error(
    tmp_path: Path,
) -> None:
    yard = Yard(tmp_path, yard_settings(restart_max=2, restart_window_s=60.0)).start()

    def boom() -> None:
        raise RuntimeError("always broken")

    yard.engine.before("create_container", boom, once=False)
    yard.submit(work_item="a")
    yard.submit(work_item="b")
    eventually(yard.sup.is_alive, lambda alive: not alive, "the supervisor to stop")
    assert len(yard.fatal) == 1
    assert "crashed 3 times within 60s (restart_max = 2)" in yard.fatal[0]
    assert "always broken" in yard.fatal[0]
    with pytest.raises((pykka.ActorDeadError, SupervisorStopped)):
        yard.submit()


def test_crashes_spread_over_time_do_not_exceed_the_intensity(tmp_path: Path) -> None:
    yard = Yard(tmp_path, yard_settings(restart_max=1, restart_window_s=60.0)).start()
    for item in ("a", "b", "c"):

        def boom() -> None:
            raise RuntimeError("flaky")

        yard.engine.before("create_container", boom, once=True)
        job = yard.running_job(yard.submit(work_item=item).id)
        yard.engine.exit_container(job.container_id or "", 0)
        yard.wait_state(job.id, JobState.SUCCEEDED)
        yard.tick(61)
    assert yard.fatal == []
    assert yard.sup.is_alive()


def test_metrics_count_jobs_by_state_and_running_workers(tmp_path: Path) -> None:
    yard = Yard(tmp_path, yard_settings(max_workers=1)).start()
    first = yard.running_job(yard.submit(work_item="a").id)
    yard.submit(work_item="b")
    yard.tick()
    assert yard.metrics.value("snapyard_running_workers") == 1
    assert yard.metrics.value("snapyard_jobs", state="running") == 1
    assert yard.metrics.value("snapyard_jobs", state="queued") == 1
    assert yard.metrics.value("snapyard_spawn_seconds_count") == 1  # the queued one waits
    yard.engine.exit_container(first.container_id or "", 0)
    yard.wait_state(first.id, JobState.SUCCEEDED)
    yard.tick()
    assert yard.metrics.value("snapyard_jobs", state="succeeded") == 1


def test_container_removed_behind_our_back_fails_the_job_clearly(tmp_path: Path) -> None:
    yard = Yard(tmp_path, watcher=False).start()
    job = yard.running_job(yard.submit().id)
    yard.engine.remove_container(job.container_id or "", force=True)  # someone's docker rm -f
    yard.sup.tell(Reconcile())
    done = yard.wait_state(job.id, JobState.FAILED)
    assert done.error is not None
    assert "disappeared" in done.error
    with pytest.raises(ContainerMissing):
        yard.engine.inspect_container(job.container_id or "")
