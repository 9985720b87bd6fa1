"""The supervisor as a real process on the real engine: SIGKILL, restart, re-adopt.

Each test runs ``run_forever`` in a subprocess (settings from SNAPYARD_* env, a
temporary data dir) and talks to it only through the durable job store, the
way a restart would: jobs are written to the store as ``queued`` before the
process starts, and the test polls the store (bounded, failing loudly) for
their state. Every container and image is labelled with the test session's
ID and removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from session_labels import SNAPSHOT_REPOSITORY, TEST_LABELS

from actors.engine.base import ContainerMissing, Engine, EngineError
from actors.labels import LABEL_PROJECT, LABEL_ROLE
from actors.model import Job, JobState, validate_spec
from actors.store import SqliteStore, new_job_id

pytestmark = [pytest.mark.docker, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 90.0
SCRIPT = (
    "import sys\n"
    "from actors.run import run_forever\n"
    "from actors.settings import load_settings\n"
    f"sys.exit(run_forever(load_settings(), container_labels={TEST_LABELS!r}))\n"
)


def poll(query: Callable[[], Job | None], done: Callable[[Job], bool], what: str) -> Job:
    """Poll the store until ``done``; fail loudly with the last state after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    last: Job | None = None
    while time.monotonic() < deadline:
        last = query()
        if last is not None and done(last):
            return last
        time.sleep(0.1)  # polling another process's writes: there is no future to wait on
    raise AssertionError(f"timed out after {WAIT_S}s waiting for {what}; last: {last!r}")


class Process:
    """One ``snapyard run``-like supervisor process."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SCRIPT],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=WAIT_S)
        self._log.close()

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=WAIT_S)
        self._log.close()
        return code

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture
def project(docker_engine: Engine) -> Iterator[str]:
    name = f"it-sup-{uuid.uuid4().hex[:10]}"
    yield name
    for container in docker_engine.list_containers({LABEL_PROJECT: name}):
        with contextlib.suppress(EngineError):
            docker_engine.remove_container(container.id, force=True)
    for image in docker_engine.list_images({LABEL_PROJECT: name}):
        with contextlib.suppress(EngineError):
            docker_engine.remove_image(image.id, force=True)


@pytest.fixture
def yard_env(tmp_path: Path, base_image: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPYARD_")}
    env.update(
        {
            "SNAPYARD_DATA_DIR": str(tmp_path / "data"),
            "SNAPYARD_WORKER__IMAGE": base_image,
            "SNAPYARD_WORKER__SETUP_SECONDS": "0.2",
            "SNAPYARD_SNAPSHOTS__REPOSITORY": SNAPSHOT_REPOSITORY,
            "SNAPYARD_SUPERVISOR__TICK_INTERVAL_S": "0.1",
            "SNAPYARD_SUPERVISOR__STOP_GRACE_S": "1",
            "SNAPYARD_SUPERVISOR__SHUTDOWN_TIMEOUT_S": "20",
            # Other tests' containers share this engine: never sweep them here.
            "SNAPYARD_SUPERVISOR__ORPHAN_GRACE_S": "86400",
            "SNAPYARD_LOG__FORMAT": "text",
            "PYTHONPATH": str(REPO),
        }
    )
    return env


def queue_job(data_dir: Path, project: str, command: list[str], timeout_s: float) -> str:
    job = Job(
        new_job_id(),
        validate_spec(project, "w1", command=command, timeout_s=timeout_s),
        JobState.QUEUED,
        time.time(),
    )
    with SqliteStore(data_dir / "snapyard.db") as store:
        store.add(job, note="queued by the test")
    return job.id


def test_sigkilled_supervisor_restarts_readopts_the_container_and_commits(
    docker_engine: Engine, project: str, yard_env: dict[str, str], tmp_path: Path
) -> None:
    data_dir = Path(yard_env["SNAPYARD_DATA_DIR"])
    job_id = queue_job(data_dir, project, ["sh", "-c", "sleep 4; echo worked"], timeout_s=120)
    store = SqliteStore(data_dir / "snapyard.db")
    first = Process(yard_env, tmp_path / "first.log")
    try:
        running = poll(lambda: store.get(job_id), lambda j: j.state is JobState.RUNNING, "running")
    except AssertionError:
        first.kill()
        raise AssertionError(first.output()) from None
    first.kill()  # no shutdown at all: the container is left as it is
    assert running.container_id is not None
    assert docker_engine.inspect_container(running.container_id).running

    second = Process(yard_env, tmp_path / "second.log")
    try:
        done = poll(lambda: store.get(job_id), lambda j: j.state.terminal, "the job to end")
    finally:
        code = second.terminate()
    assert done.state is JobState.SUCCEEDED, second.output()
    assert done.container_id == running.container_id  # re-adopted, not run again
    assert done.snapshot_committed
    assert "worked" in done.logs_tail
    states = [state for state, _, _ in store.history(job_id)]
    assert states.count(JobState.STARTING) == 1
    snapshots = docker_engine.list_images({LABEL_PROJECT: project})
    assert [i.labels.get(LABEL_ROLE) for i in snapshots] == ["snapshot"]
    with pytest.raises(ContainerMissing):
        docker_engine.inspect_container(running.container_id)
    assert code == 0, second.output()
    store.close()


def test_worker_past_its_timeout_is_timed_out_and_its_container_gone(
    docker_engine: Engine, project: str, yard_env: dict[str, str], tmp_path: Path
) -> None:
    data_dir = Path(yard_env["SNAPYARD_DATA_DIR"])
    job_id = queue_job(data_dir, project, ["sh", "-c", "sleep 300"], timeout_s=2)
    store = SqliteStore(data_dir / "snapyard.db")
    proc = Process(yard_env, tmp_path / "run.log")
    try:
        done = poll(lambda: store.get(job_id), lambda j: j.state.terminal, "the job to end")
    finally:
        code = proc.terminate()
    assert done.state is JobState.TIMED_OUT, proc.output()
    assert done.error == "timed out after 2s"
    assert not done.snapshot_committed
    assert done.container_id is not None
    with pytest.raises(ContainerMissing):
        docker_engine.inspect_container(done.container_id)
    assert docker_engine.list_images({LABEL_PROJECT: project}) == []
    assert code == 0, proc.output()
    store.close()
