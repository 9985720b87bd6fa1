"""Watcher: engine events -> ContainerExited / ImageDeleted, reconnect -> Reconcile."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pykka
import pytest
from actor_kit import SYNC, Collector, drain
from yard_kit import BASE_TAG, Yard, eventually, new_engine

from actors.clock import FakeClock
from actors.engine.base import ContainerSpec, EngineError
from actors.engine.memory import MemoryEngine
from actors.labels import MANAGED_FILTER
from actors.messages import ContainerExited, ImageDeleted, Reconcile
from actors.model import JobState
from actors.watcher import Watcher

WAIT_S = 10.0


@pytest.fixture(autouse=True)
def _stop_actors() -> Iterator[None]:
    yield
    pykka.ActorRegistry.stop_all()


class WatcherRig:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.engine: MemoryEngine = new_engine(self.clock)
        self.sup_box: queue.Queue[Any] = queue.Queue()
        self.snap_box: queue.Queue[Any] = queue.Queue()
        self.sup = Collector.start(self.sup_box)
        self.snaps = Collector.start(self.snap_box)
        self.gate = threading.Event()
        self.gate.set()
        self.sleeps: list[float] = []

        def sleep(seconds: float) -> None:
            self.sleeps.append(seconds)
            self.gate.wait(WAIT_S)

        self.watcher = Watcher(
            self.engine, self.sup, self.snaps, self.clock, since=self.clock.now(), sleep=sleep
        )

    def container(self, labels: dict[str, str]) -> str:
        cid = self.engine.create_container(ContainerSpec(image=BASE_TAG, labels=labels))
        self.engine.start_container(cid)
        return cid

    def next_for_supervisor(self) -> Any:
        return self.sup_box.get(timeout=WAIT_S)

    def snapshot_messages(self) -> list[Any]:
        self.snaps.ask(SYNC, timeout=WAIT_S)
        return drain(self.snap_box)


@pytest.fixture
def rig() -> Iterator[WatcherRig]:
    rig = WatcherRig()
    yield rig
    rig.gate.set()
    rig.watcher.stop()


def test_exits_of_managed_containers_and_oom_marks(rig: WatcherRig) -> None:
    ours = rig.container(dict(MANAGED_FILTER))
    theirs = rig.container({"com.example": "x"})
    oom = rig.container(dict(MANAGED_FILTER))
    rig.engine.exit_container(theirs, 0)
    rig.engine.exit_container(ours, 3)
    rig.engine.exit_container(oom, 137, oom=True)
    rig.watcher.start()
    assert rig.next_for_supervisor() == ContainerExited(ours, 3, False)
    assert rig.next_for_supervisor() == ContainerExited(oom, 137, True)
    later = rig.container(dict(MANAGED_FILTER))
    rig.engine.exit_container(later, 0)
    # The OOM mark was consumed by its exit: the next exit is a plain one.
    assert rig.next_for_supervisor() == ContainerExited(later, 0, False)


def test_image_deleted_is_forwarded_but_untagged_is_not(rig: WatcherRig) -> None:
    image_id = rig.engine.add_image("snapyard-snapshot/p.w:k1")
    rig.engine.tag_image(image_id, "snapyard-snapshot/p.w", "k2")
    rig.engine.remove_image("snapyard-snapshot/p.w:k2")  # only an untag
    moved = rig.engine.add_image("other:1")
    rig.engine.remove_image("other:1")  # untag + delete
    marker = rig.container(dict(MANAGED_FILTER))
    rig.engine.exit_container(marker, 0)
    rig.watcher.start()
    assert rig.next_for_supervisor() == ContainerExited(marker, 0, False)
    assert rig.snapshot_messages() == [ImageDeleted(moved)]
    assert rig.engine.inspect_image(image_id).id == image_id


def test_reconnect_after_a_break_tells_reconcile_and_replays_the_missed_exit(
    rig: WatcherRig,
) -> None:
    cid = rig.container(dict(MANAGED_FILTER))
    rig.watcher.start()
    eventually(rig.watcher.connected.is_set, bool, "the watcher connected")
    rig.gate.clear()
    rig.engine.set_unavailable(True)
    eventually(lambda: len(rig.sleeps), lambda n: n >= 1, "the watcher backing off")
    rig.clock.advance(1)
    rig.engine.exit_container(cid, 0)  # while nobody is connected
    rig.engine.set_unavailable(False)
    rig.gate.set()
    assert rig.next_for_supervisor() == Reconcile()
    assert rig.next_for_supervisor() == ContainerExited(cid, 0, False)
    assert 0.5 <= rig.sleeps[0] <= 1.0  # the backoff policy: 0.5s plus up to 0.5s of jitter
    assert rig.watcher.reconnects >= 1


def test_backoff_grows_while_the_engine_stays_down(rig: WatcherRig) -> None:
    rig.watcher.start()
    eventually(rig.watcher.connected.is_set, bool, "the watcher connected")
    rig.gate.clear()
    rig.engine.set_unavailable(True)
    for expected in (0.5, 1.0, 2.0):  # doubling, plus up to 0.5s of jitter
        eventually(
            lambda: len(rig.sleeps),
            lambda n, e=expected: n >= 1 and rig.sleeps[-1] >= e,
            f"a {expected}s backoff",
        )  # type: ignore[misc]
        assert expected <= rig.sleeps[-1] <= expected + 0.5
        rig.gate.set()
        rig.gate.clear()
    rig.engine.set_unavailable(False)
    rig.gate.set()
    assert rig.next_for_supervisor() == Reconcile()


def test_an_unexpected_stream_error_also_reconnects(rig: WatcherRig) -> None:
    rig.engine.fail_next("events", error=EngineError("garbled event"))
    rig.watcher.start()
    assert rig.next_for_supervisor() == Reconcile()
    eventually(rig.watcher.connected.is_set, bool, "the watcher connected")


def test_stop_closes_the_stream_and_joins(rig: WatcherRig) -> None:
    rig.watcher.start()
    eventually(rig.watcher.connected.is_set, bool, "the watcher connected")
    assert rig.watcher.alive
    rig.watcher.stop()
    assert not rig.watcher.alive


def test_supervisor_sees_an_exit_missed_during_a_break(tmp_path: Path) -> None:
    yard = Yard(tmp_path).start()
    assert yard.watcher is not None
    job = yard.running_job(yard.submit().id)
    yard.engine_back.clear()
    yard.engine.set_unavailable(True)
    yard.engine.exit_container(job.container_id or "", 0)
    yard.engine.set_unavailable(False)
    yard.engine_back.set()
    done = yard.wait_state(job.id, JobState.SUCCEEDED)
    assert done.snapshot_committed


def test_an_outage_of_thousands_of_failures_does_not_kill_the_watcher(rig: WatcherRig) -> None:
    """Found by a warning in the suite: 2 ** (failures - 1) overflowed a float
    after ~1,000 failed reconnects (hours of daemon outage) and the thread died."""
    rig.engine.set_unavailable(True)
    rig.watcher.start()
    eventually(lambda: len(rig.sleeps), lambda n: n >= 1100, "1,100 failed reconnects")
    assert rig.watcher.alive
    assert max(rig.sleeps) == 30.0  # the cap, not an overflow
    rig.engine.set_unavailable(False)
    eventually(rig.watcher.connected.is_set, bool, "the watcher connected again")
    assert rig.next_for_supervisor() == Reconcile()
