"""The Snapyard facade: wiring, start/stop order, restart re-adoption, drain, health."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pykka
import pytest
from actor_kit import kit_settings
from yard_kit import new_engine

from actors.app import Snapyard, SnapyardError
from actors.clock import FakeClock
from actors.engine.memory import MemoryEngine
from actors.model import JobState, SnapshotKey, validate_spec
from actors.settings import Settings
from actors.store import SqliteStore
from actors.supervisor import SupervisorStopped
from actors.telemetry import REDACTED

WAIT_S = 10.0


@pytest.fixture(autouse=True)
def _stop_actors() -> Iterator[None]:
    yield
    pykka.ActorRegistry.stop_all()


def app_settings(tmp_path: Path, **supervisor: object) -> Settings:
    return kit_settings(
        retry={"attempts": 2, "backoff_initial_s": 0.1, "backoff_max_s": 0.5},
        supervisor={"data_dir": str(tmp_path / "data"), "tick_interval_s": 0.05, **supervisor},
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def engine(clock: FakeClock) -> MemoryEngine:
    return new_engine(clock)


def test_a_job_runs_commits_and_the_next_reuses_the_snapshot(
    tmp_path: Path, engine: MemoryEngine, clock: FakeClock
) -> None:
    engine.exit_policy = lambda _c: 0
    with Snapyard(app_settings(tmp_path), engine=engine, clock=clock) as app:
        assert app.health() == (True, "ok: 0 running, 0 in flight, 0 queued")
        first = app.wait(app.submit(validate_spec("p", "w")).id, WAIT_S)
        assert first.state is JobState.SUCCEEDED
        assert first.snapshot_committed
        assert [s.key for s in app.snapshots()] == [SnapshotKey("p", "w")]
        second = app.wait(app.submit(validate_spec("p", "w")).id, WAIT_S)
        assert second.from_snapshot
        assert [j.id for j in app.jobs(state=JobState.SUCCEEDED)] == [second.id, first.id]
        assert app.remove_snapshot(SnapshotKey("p", "w"))
        assert app.snapshots() == []
        assert app.cancel("j-nope") is None
        assert app.get("j-nope") is None


def test_stop_detaches_and_the_next_start_readopts(
    tmp_path: Path, engine: MemoryEngine, clock: FakeClock
) -> None:
    settings = app_settings(tmp_path)
    app = Snapyard(settings, engine=engine, clock=clock).start()
    job = app.submit(validate_spec("p", "w"))
    cid = _running_container(app, job.id)
    app.stop()
    assert engine.inspect_container(cid).running  # stopping never kills a worker
    with pytest.raises(SupervisorStopped):
        app.submit(validate_spec("p", "x"))
    # Regression: a stopped app said "no job with id ..." (a 404, exit 1) to a
    # client following that job; it is "stopped" (503, exit 3) like the rest.
    with pytest.raises(SupervisorStopped):
        app.get(job.id)

    app2 = Snapyard(settings, engine=engine, clock=clock).start()
    adopted = app2.get(job.id)
    assert adopted is not None
    assert adopted.state is JobState.RUNNING
    assert adopted.container_id == cid
    engine.exit_container(cid, 0)
    assert app2.wait(job.id, WAIT_S).state is JobState.SUCCEEDED
    app2.stop()


def test_stop_with_drain_waits_for_running_jobs(
    tmp_path: Path, engine: MemoryEngine, clock: FakeClock
) -> None:
    app = Snapyard(app_settings(tmp_path), engine=engine, clock=clock).start()
    job = app.submit(validate_spec("p", "w", timeout_s=5))
    _running_container(app, job.id)
    clock.advance(6)  # the job's deadline passes; the timers keep running while draining
    app.stop(drain=True, timeout_s=WAIT_S)
    with SqliteStore(tmp_path / "data" / "snapyard.db") as store:
        final = store.get(job.id)
    assert final is not None
    assert final.state is JobState.TIMED_OUT


def test_engine_down_at_start_is_a_clear_error(
    tmp_path: Path, engine: MemoryEngine, clock: FakeClock
) -> None:
    engine.set_unavailable(True)
    with pytest.raises(SnapyardError, match=r"cannot reach the container engine at memory://"):
        Snapyard(app_settings(tmp_path), engine=engine, clock=clock).start()


def test_health_reports_a_supervisor_that_gave_up(
    tmp_path: Path, engine: MemoryEngine, clock: FakeClock
) -> None:
    app = Snapyard(
        app_settings(tmp_path, restart_max=1, spawners=1), engine=engine, clock=clock
    ).start()

    def boom() -> None:
        raise RuntimeError("always broken")

    engine.before("create_container", boom, once=False)
    app.submit(validate_spec("p", "a"))
    app.submit(validate_spec("p", "b"))
    assert app.failed.wait(WAIT_S)
    ok, reason = app.health()
    assert not ok
    assert "supervisor stopped: Spawners crashed 2 times" in reason
    with pytest.raises(SupervisorStopped):
        app.submit(validate_spec("p", "c"))
    app.stop()


def test_the_app_scrubs_a_jobs_env_until_the_job_ends(
    tmp_path: Path, engine: MemoryEngine, clock: FakeClock
) -> None:
    token = "tok-" + "z" * 16
    with Snapyard(app_settings(tmp_path), engine=engine, clock=clock) as app:
        job = app.submit(validate_spec("p", "w", env={"API_TOKEN": token}))
        cid = _running_container(app, job.id)
        assert app.secrets.scrub(f"worker said {token}") == f"worker said {REDACTED}"
        engine.exit_container(cid, 0)
        assert app.wait(job.id, WAIT_S).state is JobState.SUCCEEDED
        assert app.secrets.scrub(token) == token


def _running_container(app: Snapyard, job_id: str) -> str:
    """Wait (bounded) until the job runs; return its container."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        job = app.get(job_id)
        if job is not None and job.state is JobState.RUNNING and job.container_id:
            return job.container_id
        time.sleep(0.005)
    raise AssertionError(f"job {job_id} never ran: {app.get(job_id)!r}")


def test_drain_waits_for_running_jobs_past_the_shutdown_timeout(
    tmp_path: Path, engine: MemoryEngine, clock: FakeClock
) -> None:
    """From review: --drain gave up after shutdown_timeout_s like a plain stop."""
    import threading

    app = Snapyard(
        app_settings(tmp_path, shutdown_timeout_s=1.0), engine=engine, clock=clock
    ).start()
    job = app.submit(validate_spec("p", "w"))
    deadline = time.monotonic() + WAIT_S
    while app.get(job.id).state is not JobState.RUNNING:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.01)
    stopper = threading.Thread(target=app.stop, kwargs={"drain": True, "timeout_s": None})
    stopper.start()
    # Real time on purpose: this pins a timeout. Well past shutdown_timeout_s...
    assert not app.stopped.wait(2.5), "drain stopped before the running job ended"
    container = app.get(job.id).container_id  # type: ignore[union-attr]
    engine.exit_container(container or "", 0)
    stopper.join(WAIT_S)
    assert app.stopped.is_set()
    finished = SqliteStore(tmp_path / "data" / "snapyard.db").get(job.id)
    assert finished is not None
    assert finished.state is JobState.SUCCEEDED


def test_run_forever_hands_the_started_app_over_once(
    tmp_path: Path, engine: MemoryEngine, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second call gave the API server the facade twice; a second SIGTERM from
    a callback would even have exited the process (130)."""
    import signal

    import actors.run

    def on_memory(settings: Settings, container_labels: object = None) -> Snapyard:
        return Snapyard(settings, engine=engine, clock=clock)

    monkeypatch.setattr(actors.run, "Snapyard", on_memory)
    started: list[Snapyard] = []

    def on_started(app: Snapyard) -> None:
        started.append(app)
        if len(started) == 1:
            signal.raise_signal(signal.SIGTERM)  # the first signal stops gracefully

    assert actors.run.run_forever(app_settings(tmp_path), on_started=on_started) == 0
    assert len(started) == 1
