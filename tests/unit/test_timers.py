"""Scheduler: periodic tells driven by the injected clock."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pykka
import pytest
from actor_kit import SYNC, Collector, drain

from actors.clock import FakeClock, SystemClock
from actors.timers import Scheduler


@pytest.fixture(autouse=True)
def _stop_actors() -> Iterator[None]:
    yield
    pykka.ActorRegistry.stop_all()


@dataclass(frozen=True)
class Ping:
    now: float


def received(ref: pykka.ActorRef[Any], box: queue.Queue[Any]) -> list[Any]:
    """Everything told to ``ref`` so far: an ask after the tells is the sync point."""
    ref.ask(SYNC, timeout=10)
    return drain(box)


def test_every_fires_after_each_interval_with_the_clock_time() -> None:
    clock = FakeClock()
    box: queue.Queue[Any] = queue.Queue()
    ref = Collector.start(box)
    scheduler = Scheduler(clock)
    scheduler.every(10.0, ref, Ping)
    assert scheduler.run_due() == 0
    clock.advance(9.9)
    assert scheduler.run_due() == 0
    now = clock.advance(0.1)
    assert scheduler.run_due() == 1
    assert received(ref, box) == [Ping(now)]
    clock.advance(10)
    scheduler.run_due()
    clock.advance(10)
    scheduler.run_due()
    assert len(received(ref, box)) == 2


def test_first_after_delays_only_the_first_message() -> None:
    clock = FakeClock()
    box: queue.Queue[Any] = queue.Queue()
    ref = Collector.start(box)
    scheduler = Scheduler(clock)
    scheduler.every(60.0, ref, Ping, first_after_s=300.0)
    clock.advance(299)
    assert scheduler.run_due() == 0
    clock.advance(1)
    assert scheduler.run_due() == 1
    clock.advance(60)
    assert scheduler.run_due() == 1


def test_a_late_run_sends_once_not_a_burst() -> None:
    clock = FakeClock()
    box: queue.Queue[Any] = queue.Queue()
    ref = Collector.start(box)
    scheduler = Scheduler(clock)
    scheduler.every(1.0, ref, Ping)
    clock.advance(100)
    assert scheduler.run_due() == 1
    clock.advance(0.5)
    assert scheduler.run_due() == 0
    clock.advance(0.5)
    assert scheduler.run_due() == 1


def test_run_due_with_an_explicit_now() -> None:
    clock = FakeClock()
    box: queue.Queue[Any] = queue.Queue()
    ref = Collector.start(box)
    scheduler = Scheduler(clock)
    scheduler.every(5.0, ref, Ping)
    start = clock.now()
    assert scheduler.run_due(start + 5) == 1
    assert received(ref, box) == [Ping(start + 5)]


def test_a_dead_target_cancels_only_its_own_timer() -> None:
    clock = FakeClock()
    box: queue.Queue[Any] = queue.Queue()
    alive = Collector.start(box)
    dead = Collector.start(queue.Queue())
    dead.stop()
    scheduler = Scheduler(clock)
    scheduler.every(1.0, dead, Ping)
    scheduler.every(1.0, alive, Ping)
    clock.advance(1)
    assert scheduler.run_due() == 1
    assert len(scheduler.timers) == 1
    clock.advance(1)
    assert scheduler.run_due() == 1
    assert len(received(alive, box)) == 2


def test_a_failing_factory_does_not_stop_the_others() -> None:
    clock = FakeClock()
    box: queue.Queue[Any] = queue.Queue()
    ref = Collector.start(box)
    scheduler = Scheduler(clock)

    def broken(_now: float) -> object:
        raise ValueError("bad factory")

    scheduler.every(1.0, ref, broken)
    scheduler.every(1.0, ref, Ping)
    clock.advance(1)
    assert scheduler.run_due() == 1


def test_cancel_and_stop() -> None:
    clock = FakeClock()
    ref = Collector.start(queue.Queue())
    scheduler = Scheduler(clock)
    timer = scheduler.every(1.0, ref, Ping)
    timer.cancel()
    clock.advance(5)
    assert scheduler.run_due() == 0
    scheduler.every(1.0, ref, Ping)
    scheduler.stop()
    clock.advance(5)
    assert scheduler.run_due() == 0


def test_interval_must_be_positive() -> None:
    scheduler = Scheduler(FakeClock())
    with pytest.raises(ValueError, match="interval_s"):
        scheduler.every(0, Collector.start(queue.Queue()), Ping)


def test_the_thread_runs_timers_on_real_time() -> None:
    box: queue.Queue[Any] = queue.Queue()
    ref = Collector.start(box)
    scheduler = Scheduler(SystemClock())
    scheduler.every(0.01, ref, Ping)
    scheduler.start(granularity_s=0.01)
    try:
        # Blocking on the inbox, as on a future: no sleep.
        first = box.get(timeout=10)
        second = box.get(timeout=10)
    finally:
        scheduler.stop()
    assert isinstance(first, Ping)
    assert isinstance(second, Ping)
    assert second.now >= first.now
