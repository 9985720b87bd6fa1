"""HostLease: renewals, rescue, and self-fencing before the lease runs out.

The decisions are pure functions (tables below); the actor runs on a FakeClock
with a small in-memory stand-in for the store's two lease calls, whose
failures the test switches on and off (a partition). The PostgreSQL store
itself is exercised in test_cluster_hosts.py.
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Iterator
from typing import Any

import pykka
import pytest
from actor_kit import Collector
from waiting import eventually

from actors.clock import FakeClock
from actors.cluster.lease import (
    HostLease,
    LeaseStatus,
    fence_deadline,
    lease_action,
    should_fence,
)
from actors.messages import Beat, Fence, GetLease, ReportTo, Unfence, WorkAvailable
from actors.model import Job, JobState, validate_spec
from actors.wire import iso_time

LEASE_S, BEAT_S = 10.0, 2.0


@pytest.fixture(autouse=True)
def _stop_actors() -> Iterator[None]:
    yield
    pykka.ActorRegistry.stop_all()


# --- decisions ---------------------------------------------------------------


def test_the_fence_falls_one_heartbeat_before_the_lease_ends() -> None:
    assert fence_deadline(100.0, LEASE_S, BEAT_S) == 108.0
    assert not should_fence(100.0, 107.999, LEASE_S, BEAT_S)
    assert should_fence(100.0, 108.0, LEASE_S, BEAT_S)


@pytest.mark.parametrize(
    ("fenced", "last_renewal", "now", "expected"),
    [
        (False, 100.0, 101.0, None),  # renewed recently
        (False, 100.0, 108.0, "fence"),  # past the margin: stop before the rescue
        (True, 100.0, 109.0, None),  # still cut off: already fenced
        (True, 108.5, 109.0, "unfence"),  # a renewal got through
        (True, 100.0, 120.0, None),
        (False, 100.0, 100.0, None),
    ],
)
def test_lease_action(fenced: bool, last_renewal: float, now: float, expected: str | None) -> None:
    assert lease_action(fenced, last_renewal, now, LEASE_S, BEAT_S) == expected


# --- the actor -----------------------------------------------------------------


class LeaseCalls:
    """The store's lease calls: heartbeats recorded, failing while ``cut`` is set."""

    host_id = "host-a"

    def __init__(self) -> None:
        self.cut = threading.Event()
        self.beats: list[float] = []
        self.to_rescue: list[Job] = []
        self.hang = threading.Event()
        self.release = threading.Event()

    def heartbeat(
        self, now: float, lease_s: float, *, api: str, max_workers: int, running: int
    ) -> None:
        if self.hang.is_set():
            self.release.wait(10.0)
        if self.cut.is_set():
            raise ConnectionError("connection to the database lost")
        self.beats.append(now)

    def rescue_expired(self, now: float) -> list[Job]:
        rescued, self.to_rescue = self.to_rescue, []
        return rescued


class Rig:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.store = LeaseCalls()
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.lease = HostLease.start(self.store, self.clock, LEASE_S, BEAT_S)  # type: ignore[arg-type]
        self.lease.tell(ReportTo(Collector.start(self.inbox)))

    def status(self) -> LeaseStatus:
        status = self.lease.ask(GetLease(), timeout=10.0)
        assert isinstance(status, LeaseStatus)
        return status

    def beat(self, advance_s: float) -> float:
        """Advance the clock and beat; return once the renewal it started has ended."""
        now = self.clock.advance(advance_s)
        before = self.status()
        self.lease.ask(Beat(now), timeout=10.0)
        eventually(
            self.status,
            lambda s: s.renewals + s.failures > before.renewals + before.failures,
            "the renewal to end",
        )
        return now

    def told(self) -> list[Any]:
        items = []
        while not self.inbox.empty():
            items.append(self.inbox.get_nowait())
        return items


def test_start_renews_at_once_and_each_beat_renews_again() -> None:
    rig = Rig()
    start = rig.clock.now()
    assert rig.store.beats == [start]
    now = rig.beat(BEAT_S)
    assert rig.store.beats == [start, now]
    status = rig.status()
    assert (status.last_renewal, status.lease_until, status.fenced) == (now, now + LEASE_S, False)


def test_rescued_jobs_wake_the_supervisor() -> None:
    rig = Rig()
    job = Job("j-1", validate_spec("p", "w"), JobState.QUEUED, rig.clock.now())
    rig.store.to_rescue = [job]
    rig.beat(BEAT_S)
    eventually(rig.told, lambda told: WorkAvailable() in told, "a WorkAvailable")


def test_a_cut_off_host_fences_before_its_lease_ends_and_unfences_on_renewal() -> None:
    rig = Rig()
    renewed = rig.status().last_renewal
    rig.store.cut.set()
    rig.beat(BEAT_S)
    rig.beat(BEAT_S)
    rig.beat(BEAT_S)
    assert not rig.status().fenced  # 6 s: within lease - heartbeat
    rig.beat(BEAT_S)  # 8 s = lease_s - heartbeat_s after the last renewal
    status = rig.status()
    assert status.fenced
    assert status.failures == 4
    assert rig.clock.now() < renewed + LEASE_S  # before anyone may rescue its jobs
    fences = eventually(rig.told, lambda told: len(told) == 1, "one Fence")
    assert isinstance(fences[0], Fence)
    rig.beat(BEAT_S)
    assert rig.told() == []  # told once, not every beat
    rig.store.cut.clear()
    rig.beat(BEAT_S)
    assert not rig.status().fenced
    eventually(rig.told, lambda told: told == [Unfence()], "an Unfence")


def test_a_hanging_database_call_does_not_delay_the_fence() -> None:
    """Regression guard: renewals run off the actor's thread; the Beat alone judges."""
    rig = Rig()
    rig.store.hang.set()
    now = rig.clock.advance(BEAT_S)
    rig.lease.ask(Beat(now), timeout=10.0)  # its renewal now hangs
    now = rig.clock.advance(LEASE_S - BEAT_S)
    rig.lease.ask(Beat(now), timeout=10.0)
    assert rig.status().fenced
    eventually(rig.told, lambda told: any(isinstance(m, Fence) for m in told), "a Fence")
    rig.store.hang.clear()
    rig.store.release.set()


def test_heartbeat_must_be_shorter_than_the_lease() -> None:
    with pytest.raises(ValueError, match=r"shorter than cluster\.lease_s"):
        HostLease(LeaseCalls(), FakeClock(), 2.0, 2.0)  # type: ignore[arg-type]


def test_lease_log_lines_give_iso_times_and_durations_not_epoch_numbers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression: "lease renewal at 1796054163.792 failed", "no lease renewal since
    1796054162.790 (lease until ...)": numbers a person cannot read."""
    rig = Rig()
    renewed = rig.status().last_renewal
    rig.store.cut.set()
    for _ in range(4):
        failed_at = rig.beat(BEAT_S)
    fence = eventually(rig.told, lambda told: len(told) == 1, "one Fence")[0]
    assert isinstance(fence, Fence)
    assert fence.reason.startswith(
        f"no lease renewal since {iso_time(renewed)} (8.0 s ago; "
        f"the lease ends at {iso_time(renewed + LEASE_S)}; last error: "
    )
    said = [r.getMessage() for r in caplog.records]
    assert any(line.startswith(f"lease renewal at {iso_time(failed_at)} failed") for line in said)
    epoch = re.compile(r"\b\d{9,}\.\d+\b")  # seconds since 1970, as the old lines had them
    assert [line for line in said if epoch.search(line)] == []
