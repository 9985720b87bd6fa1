"""A cancel sent to a cluster host that does not run the job (real PostgreSQL).

Host A runs the job (``cluster_kit``'s wiring on a MemoryEngine); host B is
the whole application with its API, on its own MemoryEngine and the same
database. The operator's ``snapyard cancel`` reaches B: it must never answer
"running" with exit 0 while the job runs on to success on A.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from actor_kit import BASE_TAG
from cluster_kit import REGISTRY, Host, finished, shared_base
from waiting import eventually

from actors.api import ApiServer
from actors.app import Snapyard
from actors.cli import main
from actors.clock import FakeClock
from actors.engine.memory import MemoryEngine, MemoryRegistry
from actors.model import JobState
from actors.store.postgres import PostgresStore


@pytest.fixture
def two_hosts(postgres_url: str, tmp_path: Path) -> Iterator[tuple[Host, Snapyard, ApiServer]]:
    clock = FakeClock()
    registry = MemoryRegistry(REGISTRY)
    base = shared_base(clock, registry)
    a = Host("host-a", postgres_url, clock, registry, base).start()
    engine = MemoryEngine(clock=clock, registry=registry)
    engine.tag_image(engine.pull_image(base), *BASE_TAG.split(":"))
    settings = a.settings.replace(
        supervisor={"data_dir": str(tmp_path)},
        api={"host": "127.0.0.1", "port": 0, "token": ""},
    )
    store = PostgresStore(postgres_url, "host-b", clock, 30.0)
    b = Snapyard(settings, engine=engine, clock=clock, store=store).start()
    try:
        with ApiServer(b, settings.api) as server:
            yield a, b, server
    finally:
        b.stop(timeout_s=10.0)
        store.close()
        a.close()


def test_a_cancel_sent_to_a_host_not_running_the_job_is_handed_to_the_host_that_runs_it(
    two_hosts: tuple[Host, Snapyard, ApiServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _b, server = two_hosts
    job = a.submit("w")
    a.wait_running(job.id)
    eventually(lambda: a.job(job.id).state, lambda s: s is JobState.RUNNING, "running, recorded")
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setenv("SNAPYARD_API", f"127.0.0.1:{server.port}")
    code = main(["cancel", job.id], out=out, err=err)
    assert code == 0, err.getvalue()
    assert out.getvalue() == (
        f"job {job.id}: running on host host-a (its API at host-a:8750); "
        "the cancel was handed to it\n"
    )
    # A hears of it through the database alone (NOTIFY, else its next Tick) and
    # cancels it as a local cancel does: the job ends, its worker is stopped.
    done = finished(a.store, job.id)
    assert (done.state, done.host, done.attempt) == (JobState.CANCELLED, "host-a", 0)
    eventually(lambda: a.running(job.id), lambda cs: cs == [], "A's worker stopped")
    notes = [(state, note) for state, _at, note in a.store.history(job.id)]
    assert (JobState.CANCELLED, "cancel requested") in notes
