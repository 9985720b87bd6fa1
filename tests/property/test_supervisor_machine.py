"""Issue 6: no interleaving of image deletions, worker failures, engine outages
and supervisor restarts leaves a job stuck, a container leaked, a snapshot
wrong, a secret shown or a job lost.

A hypothesis state machine drives a real Supervisor (real SnapshotManager,
Spawners, Reaper, Watcher, SQLite store, the timers of ``actors.timers``) on
a ChaosEngine with a FakeClock. After every step the actors are settled by
waiting on futures (``Rig.settle``), then the invariants are checked; at the
end the rig drains all work and checks what must be true of a quiet system.

The drain has no budget of its own (issue 16): it moves the clock from one of
the system's own deadlines to the next, so a slow history is never called
stuck. A job is stuck when it is unfinished with no deadline left to reach;
the invariants catch that after every step, not only at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import pytest
from budget import budget
from hypothesis import currently_in_test_context, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from machine_kit import BASE_TAG, HANG, OOM, Key, Rig, add_base, outcome_command

from actors.engine.base import EngineError
from actors.messages import (
    Cancel,
    ListJobs,
    Submit,
    SweepOrphans,
    SweepSnapshots,
    Tick,
)
from actors.model import Job, JobState, SnapshotKey, validate_spec
from actors.settings import LogSettings, SentrySettings
from actors.supervisor import job_timeout
from actors.telemetry import (
    RecordingTransport,
    Secrets,
    close_sentry,
    flush_sentry,
    setup_logging,
    setup_sentry,
)

# One key drawn more often, so jobs queue behind each other and reuse snapshots.
KEYS: tuple[Key, ...] = (("p1", "w1"), ("p1", "w1"), ("p1", "w2"), ("p2", "w1"))
SECRET_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=4)
OUTCOMES: tuple[int | str, ...] = (0, 0, 1, 3, HANG, OOM)
# The steps of a job's run where a snapshot deletion hurts most.
DELETE_AT = ("create", "start", "commit", "register")
# Deadlines in a row the drain may reach with no job changing. Reaching a due
# makes the Supervisor act on that Tick, or on the next one when its rule is
# "more than" (a retried stop) or when the act is a re-listing that re-adopts
# a job unchanged; a sweep may find an orphan still in its grace and take it
# on the next sweep. So a live system changes a job within three; more means
# it keeps re-arming a deadline without ever acting: a livelock, not slowness.
QUIET_DUES = 3


@dataclass
class Expect:
    key: Key
    outcome: int | str
    secret: str
    cancelled: bool = False
    # The base image was gone at some point while the job was unfinished:
    # failing with "base image missing" is then the right answer.
    base_outage: bool = False


class Capture:
    """Every log line (as formatted for operators) and every Sentry event."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.transport = RecordingTransport()
        # What the log handler and Sentry scrub with; every Rig remembers env values here.
        self.secrets = Secrets()

    def reset(self) -> None:
        self.stream.seek(0)
        self.stream.truncate()
        with self.transport._lock:
            self.transport.events.clear()
            self.transport.raw.clear()

    def text(self) -> str:
        flush_sentry(2.0)
        with self.transport._lock:
            raw = b"".join(self.transport.raw).decode("utf-8", "replace")
            events = json.dumps(self.transport.events, default=str, ensure_ascii=False)
        return self.stream.getvalue() + raw + events


CAPTURE: Capture | None = None


class SupervisorMachine(RuleBasedStateMachine):
    # Examples run in this process, so a run can report how many it checked.
    runs: ClassVar[int] = 0

    def __init__(self) -> None:
        super().__init__()
        SupervisorMachine.runs += 1
        assert CAPTURE is not None
        CAPTURE.reset()
        CAPTURE.secrets.clear()
        self.rig = Rig(secrets=CAPTURE.secrets)
        self.rig.start()
        self.jobs: dict[str, Expect] = {}
        self.base_present = True
        self.latest: dict[Key, tuple[str, float]] = {}
        self.clean = True

    # --- rules ---------------------------------------------------------------

    @rule(
        key=st.sampled_from(KEYS),
        outcome=st.sampled_from(OUTCOMES),
        secret=SECRET_TEXT,
        timeout=st.sampled_from([None, 20.0, 90.0]),
    )
    def submit(self, key: Key, outcome: int | str, secret: str, timeout: float | None) -> None:
        self.clean = False
        self._submit(key, outcome, secret, timeout)
        self.settle()

    @rule(
        key=st.sampled_from(KEYS),
        outcome=st.sampled_from([0, 0, 0, 1, HANG]),
        secret=SECRET_TEXT,
        delete_at=st.sampled_from(DELETE_AT),
    )
    def submit_racing_a_deletion(
        self, key: Key, outcome: int | str, secret: str, delete_at: str
    ) -> None:
        """Queue a job and delete its key's snapshot at one step of its spawn or finish."""
        self.clean = False
        self._arm_delete(key, delete_at)
        self._submit(key, outcome, secret, None)
        self.settle()

    def _submit(self, key: Key, outcome: int | str, secret: str, timeout: float | None) -> None:
        value = "s3cret-" + secret
        spec = validate_spec(
            key[0],
            key[1],
            command=list(outcome_command(outcome)),
            env={"API_TOKEN": value},
            timeout_s=timeout,
        )
        job = self.rig.ask_sup(Submit(spec))
        self.jobs[job.id] = Expect(key, outcome, value, base_outage=not self.base_present)

    @rule(seconds=st.sampled_from([1.0, 5.0, 30.0, 120.0, 700.0]))
    def advance_clock(self, seconds: float) -> None:
        self.clean = False
        self.rig.advance(seconds)
        self.settle()

    @rule(
        key=st.sampled_from(KEYS),
        when=st.sampled_from(["now", *DELETE_AT]),
    )
    def delete_snapshot(self, key: Key, when: str) -> None:
        self.clean = False
        self._arm_delete(key, when)
        self.settle()

    def _arm_delete(self, key: Key, when: str) -> None:
        engine = self.rig.engine

        def delete() -> None:
            engine.delete_key_snapshots(key)

        match when:
            case "now":
                delete()
            case "create" | "start" | "commit":
                engine.before_key(f"{when}_container", key, delete)
            case _:  # after the commit, before its Register: the inspect that follows it
                engine.before_key(
                    "commit_container",
                    key,
                    lambda: engine.before_key("inspect_image", key, delete),
                )

    @rule(action=st.sampled_from(["rmi", "retag", "rebuild"]))
    def base_image(self, action: str) -> None:
        """An operator removes the base image (or moves its tag away), or rebuilds it."""
        self.clean = False
        engine = self.rig.engine
        if action == "rebuild":
            add_base(engine)
        elif self.base_present:
            if action == "retag":
                base_id = engine.base_id()
                assert base_id is not None
                engine.tag_behind_back(base_id, "snapyard-worker:previous")
            with contextlib.suppress(EngineError):
                engine.delete_image_behind_back(BASE_TAG)
        self.base_present = engine.base_id() is not None
        if not self.base_present:
            self._mark_base_outage()
        self.settle()

    @rule()
    def engine_outage(self) -> None:
        """The daemon goes away, or comes back."""
        self.clean = False
        self.rig.set_available(not self.rig.available)
        self.settle()

    @precondition(lambda self: bool(self.jobs))
    @rule(index=st.integers(min_value=0, max_value=64))
    def cancel(self, index: int) -> None:
        self.clean = False
        job_ids = sorted(self.jobs)
        job_id = job_ids[index % len(job_ids)]
        job = self.rig.ask_sup(Cancel(job_id))
        if job is not None and job.state is JobState.CANCELLED:
            self.jobs[job_id].cancelled = True
        self.settle()

    @rule(graceful=st.booleans())
    def restart(self, graceful: bool) -> None:
        self.clean = False
        self.rig.restart(graceful)
        self.settle()

    @rule()
    def sweep(self) -> None:
        self.clean = False
        assert self.rig.snapshots is not None
        self.rig.snapshots.ask(SweepSnapshots(), timeout=10)
        self.settle()
        if self.rig.available:
            self._check_registry_exists()

    # --- invariants ----------------------------------------------------------

    @invariant()
    def nothing_lost_and_one_terminal_state(self) -> None:
        self.clean = False
        assert self.rig.store.job_ids() == set(self.jobs)
        for job_id in self.jobs:
            terminal = [s for s, _, _ in self.rig.store.history(job_id) if s.terminal]
            if terminal:
                assert terminal[0] == terminal[-1], (job_id, self.rig.store.history(job_id))
                last = self.rig.store.history(job_id)[-1][0]
                assert last == terminal[0], (job_id, self.rig.store.history(job_id))
        self.clean = True

    @invariant()
    def limits_and_snapshot_choice_hold(self) -> None:
        self.clean = False
        engine = self.rig.engine
        assert engine.violations == []
        running = [c for c in engine.managed_containers() if c.status == "running"]
        assert len(running) <= self.rig.settings.supervisor.max_workers
        self.clean = True

    @invariant()
    def every_running_job_has_an_armed_deadline(self) -> None:
        """A running job the Supervisor holds no deadline for would run forever: stuck.

        The bound is the job's own timeout plus the stop grace, measured from
        when it started. The one slack: once that deadline has passed, the
        Supervisor can only act on a Tick and through the engine, so the next
        act on a job being stopped (a retried stop, a re-listing while the
        engine is away) is armed at most a grace after now.
        """
        self.clean = False
        rig = self.rig
        status = rig.status()
        due = dict(status.due)
        now = rig.clock.now()
        grace = rig.settings.supervisor.stop_grace_s
        for job in rig.store.list(state=JobState.RUNNING, limit=10_000):
            assert job.id in due, f"running job {job.id} has no armed deadline: {status}"
            assert job.started_at is not None, job
            own = job.started_at + job_timeout(rig.settings, job.spec)
            assert due[job.id] <= max(own, now) + grace, (
                f"job {job.id} started at {job.started_at} with a deadline of {own}, "
                f"armed for {due[job.id]} (now {now}, grace {grace})"
            )
        self.clean = True

    @invariant()
    def no_job_waits_while_its_key_and_a_place_are_free(self) -> None:
        """The oldest queued job of a free key starts as soon as a worker place is free.

        Only its backoff may hold it back (a start the engine refused waits
        out its delay), read from the Supervisor's own due times; later jobs
        of the key wait behind it, so a key's jobs run in submission order.
        """
        self.clean = False
        rig = self.rig
        status = rig.status()
        if status.dispatching:
            places = rig.settings.supervisor.max_workers - status.in_flight - status.leftovers
            backing_off = dict(status.due)  # a queued job is due only at its backoff's end
            for key, job in _oldest_queued_by_key(rig.store.unfinished()).items():
                # The machine sets no project or agent caps; with caps this would count them.
                assert rig.settings.project(key.project).max_concurrent is None
                assert rig.settings.agent_type(job.spec.agent_type).max_concurrent is None
                if places > 0 and key not in status.busy_keys:
                    assert job.id in backing_off, (
                        f"job {job.id} of {key} waits with its key free and {places} "
                        f"place(s) free, not backing off: {status}"
                    )
        self.clean = True

    @invariant()
    def registry_never_goes_back_in_time(self) -> None:
        self.clean = False
        for entry in self.rig.registry():
            key = (entry.key.project, entry.key.work_item)
            previous = self.latest.get(key)
            if previous is not None and previous[0] != entry.image_id:
                assert entry.created_at >= previous[1], (key, previous, entry)
            self.latest[key] = (entry.image_id, entry.created_at)
        self.clean = True

    # --- helpers -------------------------------------------------------------

    def settle(self) -> None:
        self.rig.settle()
        self.clean = True

    def _mark_base_outage(self) -> None:
        for job_id, expect in self.jobs.items():
            job = self.rig.store.get(job_id)
            if job is not None and not job.state.terminal:
                expect.base_outage = True

    def _check_registry_exists(self) -> None:
        for entry in self.rig.registry():
            assert self.rig.engine.has_image(entry.image_id), f"registry points at gone {entry}"

    def teardown(self) -> None:
        try:
            if self.clean:
                self._drain_and_check()
        finally:
            self.rig.close()

    def _drain_and_check(self) -> None:
        rig = self.rig
        rig.set_available(True)
        if not self.base_present:
            add_base(rig.engine)
            self.base_present = True
        self._drain()
        self._sweep_orphans()
        assert rig.snapshots is not None
        rig.snapshots.ask(SweepSnapshots(), timeout=10)
        rig.settle()
        self._check_final()

    def _drain(self) -> None:
        """Move the clock from one of the system's own deadlines to the next until all is done.

        Each round goes to the earliest time the Supervisor says it will act
        on a job (a run's timeout, a retried stop, a backoff's end, a
        re-listing), or to the orphan sweep while leftover containers hold
        keys; the Tick that delivers it is read from the scheduler. It fails
        on a job left unfinished with no deadline to reach, on a deadline the
        Supervisor passed without acting, and on one re-armed without end.
        """
        rig = self.rig
        status = rig.settle()
        quiet = 0
        while True:
            unfinished = rig.store.unfinished()
            # A job cancelled while running is final, but holds its slot until stopped.
            if not unfinished and status.in_flight == 0:
                return
            dues = [at for _, at in status.due]
            if status.leftovers:
                dues.append(rig.timer_due(SweepOrphans, rig.clock.now()))
            if not dues:
                raise AssertionError(f"jobs stuck, no deadline left: {_describe(unfinished)}")
            tick = rig.timer_due(Tick, min(dues))
            before = (_describe(unfinished), status.in_flight, status.leftovers)
            rig.advance_to(tick)
            passed = {job_id: at for job_id, at in status.due if at < tick}
            status = rig.settle()
            ignored = [(job_id, at) for job_id, at in status.due if passed.get(job_id) == at]
            assert not ignored, f"deadlines passed at {tick} without action: {ignored}"
            after = (_describe(rig.store.unfinished()), status.in_flight, status.leftovers)
            quiet = quiet + 1 if after == before else 0
            assert quiet <= QUIET_DUES, f"deadlines re-armed without end: {status}; {after}"

    def _sweep_orphans(self) -> None:
        """Reach the orphan sweep that finds every container left past its grace, and run it."""
        rig = self.rig
        left = rig.engine.managed_containers()
        if not left:
            return
        grace = rig.settings.supervisor.orphan_grace_s
        rig.advance_to(rig.timer_due(SweepOrphans, max(c.created_at for c in left) + grace))
        rig.settle()

    def _check_final(self) -> None:
        rig, engine = self.rig, self.rig.engine
        jobs = {j.id: j for j in rig.ask_sup(ListJobs(limit=10_000))}
        assert set(jobs) == set(self.jobs)
        for job_id, expect in self.jobs.items():
            job = jobs[job_id]
            assert job.state.terminal, job
            if expect.outcome == 0 and not expect.cancelled:
                if expect.base_outage and job.state is JobState.FAILED:
                    assert "base image" in (job.error or ""), job
                else:
                    assert job.state is JobState.SUCCEEDED, (job, expect, rig.store.history(job_id))
            if expect.outcome != 0 and job.state is JobState.SUCCEEDED:
                raise AssertionError(f"a worker that did not exit 0 succeeded: {job}")
        leaked = [(c.id, c.status, c.labels) for c in engine.managed_containers()]
        assert leaked == [], f"containers left after drain: {leaked}"
        registry = rig.registry()
        registered = {s.image_id for s in registry}
        unowned = [i.id for i in engine.snapshot_images() if i.id not in registered]
        assert unowned == [], f"snapshot images not in the registry: {unowned}"
        self._check_registry_exists()
        snaps = rig.settings.snapshots
        assert len(registry) <= snaps.max_count
        assert sum(s.charged_bytes for s in registry) <= snaps.max_total_bytes
        self._check_no_secret_shown()
        if currently_in_test_context():  # not when a plain test drives the rules
            states = sorted({j.state.value for j in jobs.values()})
            event(f"final states: {states}")
            event(f"snapshot starts: {min(len(engine.snapshot_starts), 3)}+")

    def _check_no_secret_shown(self) -> None:
        assert CAPTURE is not None
        shown = CAPTURE.text()
        configs = json.dumps(
            [
                {"env": i.env, "container_env": i.container_env, "labels": i.labels, "cmd": i.cmd}
                for i in self.rig.engine.all_images()
            ],
            ensure_ascii=False,
        )
        for job_id, expect in self.jobs.items():
            assert expect.secret not in shown, f"job {job_id}'s env value in a log or event"
            assert expect.secret not in configs, f"job {job_id}'s env value in an image"


def _describe(jobs: list[Job]) -> list[tuple[str, str, tuple[str, ...] | None, str | None]]:
    return [(j.id, j.state.value, j.spec.command, j.error) for j in jobs]


def _oldest_queued_by_key(jobs: list[Job]) -> dict[SnapshotKey, Job]:
    """Each key's first queued job in the Supervisor's order, (created_at, id)."""
    heads: dict[SnapshotKey, Job] = {}
    for job in sorted(jobs, key=lambda j: (j.created_at, j.id)):
        if job.state is JobState.QUEUED:
            heads.setdefault(job.key, job)
    return heads


@pytest.fixture
def capture() -> Iterator[Capture]:
    global CAPTURE
    CAPTURE = Capture()
    setup_logging(
        LogSettings(level="DEBUG", format="json"), stream=CAPTURE.stream, secrets=CAPTURE.secrets
    )
    setup_sentry(
        SentrySettings(dsn="https://public@127.0.0.1/1"),
        transport=CAPTURE.transport,
        secrets=CAPTURE.secrets,
    )
    try:
        yield CAPTURE
    finally:
        close_sentry()  # the root logger is restored by tests/conftest.py
        CAPTURE = None


@pytest.mark.slow
def test_supervisor_survives_any_interleaving(capture: Capture) -> None:
    before = SupervisorMachine.runs
    run_state_machine_as_test(
        SupervisorMachine,
        settings=settings(
            max_examples=budget().machine_examples,
            stateful_step_count=budget().machine_steps,
        ),
    )
    # Shown with -rP: the one place a run says how many examples it checked.
    print(f"state machine: {SupervisorMachine.runs - before} examples run")


# The hanging jobs of issue 16, in submission order: seven hang, the rest exit 0.
_ISSUE_16_OUTCOMES: tuple[int | str, ...] = (
    *(0, 0, 0, 0, 0, 0, HANG, 0, 0, HANG, 0, 0, 0, 0, 0, HANG, HANG),
    *(0, 0, 0, 0, HANG, HANG, 0, 0, HANG),
)


def test_seven_serial_hangs_of_one_key_are_slow_not_stuck(capture: Capture) -> None:
    """Issue 16: a legal slow history was called "jobs stuck after draining".

    Minimal example (the shrunk failure, replayed from the example database)::

        state = SupervisorMachine()
        state.submit_racing_a_deletion(delete_at='create', key=('p1', 'w1'), outcome=0, secret='0000')
        ... 26 submits of ('p1', 'w1'), each racing a deletion at create;
        ... outcomes 0 except 'hang' at submits 7, 10, 16, 17, 22, 23, 26
        state.teardown()

    One key runs its jobs one after another, so the seven hangs wait out their
    300 s timeout in series: about 2,100 s of clock. A drain with a fixed
    budget (40 x 50 s) stopped short and called the last hang stuck.
    """
    state = SupervisorMachine()
    began = state.rig.clock.now()
    try:
        _check_invariants(state)
        for outcome in _ISSUE_16_OUTCOMES:
            state.submit_racing_a_deletion(
                delete_at="create", key=("p1", "w1"), outcome=outcome, secret="0000"
            )
            _check_invariants(state)
    finally:
        state.teardown()
    # The drain really waited the hangs out, one after another.
    timeout = state.rig.settings.supervisor.default_timeout_s
    assert state.rig.clock.now() - began >= _ISSUE_16_OUTCOMES.count(HANG) * timeout


def _check_invariants(state: SupervisorMachine) -> None:
    """What hypothesis checks after every step, for tests that drive the rules by hand."""
    state.nothing_lost_and_one_terminal_state()
    state.limits_and_snapshot_choice_hold()
    state.every_running_job_has_an_armed_deadline()
    state.no_job_waits_while_its_key_and_a_place_are_free()
    state.registry_never_goes_back_in_time()
