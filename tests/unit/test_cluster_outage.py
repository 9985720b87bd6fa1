"""The cluster's database away, as the logs tell it: once when it starts, once when it ends.

An outage is expected and handled (the lease fences, the Supervisor keeps its
replies, the API answers 503), so it is a WARNING without a traceback, not an
ERROR a second from every actor; a real bug stays an ERROR.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest
from cluster_kit import ASK_S, REGISTRY, Host, shared_base

from actors.clock import FakeClock
from actors.engine.memory import MemoryRegistry
from actors.messages import ListJobs
from actors.outage import StoreOutage
from actors.store import StoreUnavailable

MakeHost = Callable[..., Host]


@pytest.fixture
def make_host(postgres_url: str) -> Iterator[MakeHost]:
    clock = FakeClock()
    registry = MemoryRegistry(REGISTRY)
    base = shared_base(clock, registry)
    hosts: list[Host] = []

    def make(name: str) -> Host:
        host = Host(name, postgres_url, clock, registry, base)
        hosts.append(host)
        return host.start()

    yield make
    for host in hosts:
        host.close()


def lines(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == level and text in r.getMessage()]


def test_an_outage_is_one_warning_when_it_starts_and_one_info_when_it_ends(
    make_host: MakeHost, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    a = make_host("host-a")
    a.submit("w")  # a snapshot-less job: the shipper has nothing to index yet
    a.cable.cut()
    for _ in range(5):  # five seconds of Ticks, ShipSnapshots and API asks
        a.clock.advance(1.0)
        a.tick()
        a.ship()
        with pytest.raises(StoreUnavailable):
            a.sup.ask(ListJobs(None, None, 10), timeout=ASK_S)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # Nor pykka's INFO traceback for each ask: the asker reports it.
    assert not [r for r in caplog.records if r.name.startswith("pykka") and r.exc_info]
    warned = lines(caplog, logging.WARNING, "supervisor: the job store is unavailable")
    assert len(warned) == 1
    assert warned[0].exc_info is None
    assert "cannot be reached" in warned[0].getMessage()  # the store's own message
    assert lines(caplog, logging.INFO, "answers again") == []

    a.cable.mend()
    a.tick()
    a.tick()
    assert len(lines(caplog, logging.INFO, "supervisor: the job store answers again")) == 1
    assert len(lines(caplog, logging.WARNING, "supervisor: the job store is unavailable")) == 1


def test_any_other_exception_is_not_an_outage_and_stays_the_callers_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outage = StoreOutage("supervisor", logging.getLogger("actors.supervisor"))
    assert outage.lost(RuntimeError("a bug")) is False  # the caller logs ERROR + Sentry
    assert not outage.away
    assert caplog.records == []
