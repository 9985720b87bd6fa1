"""Fixtures shared by every test: actor clean-up, the real engine, the base image.

Everything a test creates on Docker carries ``TEST_LABELS`` (with this
session's ID); a sweep at the end of the session removes what a test of this
session left behind, so a failing test never leaks containers or images into
the next run, and a concurrent session's objects are never touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator

import pykka
import pytest
from session_labels import TEST_LABELS

from actors.clock import FakeClock
from actors.engine.base import Engine, EngineError, EngineUnavailable
from actors.engine.docker import DockerEngine
from actors.engine.memory import MemoryEngine
from actors.localcluster import LocalPostgres
from actors.settings import load_settings
from actors.worker_image import content_tag, ensure_base_image

_DOCKER_FIXTURES = {"docker_engine", "base_image"}
_SWEEP_PASSES = 5


def pytest_configure(config: pytest.Config) -> None:
    """Real-engine tests run on a base image tagged by the digest of its inputs.

    The engine is shared: a checkout with another entrypoint (another branch,
    an older clone) would rebuild a shared ``snapyard-worker:latest`` under a
    running session, which would then test the wrong image by chance. One tag
    per content lets every session keep its own; the ``snapyard run``
    processes the tests start inherit it through the environment.
    """
    os.environ.setdefault("SNAPYARD_WORKER__IMAGE", content_tag("test"))


@pytest.fixture(autouse=True)
def _stop_actors() -> Iterator[None]:
    """A test that fails mid-way must not leave actor threads to haunt the next one."""
    yield
    pykka.ActorRegistry.stop_all()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Code under test may configure logging for its process (the CLI, the demo,
    setup_logging); every later test gets the root logger back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def test_label() -> dict[str, str]:
    """The labels every test object on Docker carries (and the sweep looks for)."""
    return dict(TEST_LABELS)


def _sweep(engine: Engine, since: float) -> None:
    """Remove test containers, then test images, newest (children) first."""
    for container in engine.list_containers(TEST_LABELS):
        if container.created_at >= since:
            # Already gone (auto-remove) or being removed: nothing to do.
            with contextlib.suppress(EngineError):
                engine.remove_container(container.id, force=True)
    # A parent cannot go before its children; each pass removes one generation.
    for _ in range(_SWEEP_PASSES):
        images = [i for i in engine.list_images(TEST_LABELS) if i.created_at >= since]
        if not images:
            return
        for image in sorted(images, key=lambda i: i.created_at, reverse=True):
            # A child still in the way: the next pass gets it.
            with contextlib.suppress(EngineError):
                engine.remove_image(image.id, force=True)


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """The real engine; a missing daemon fails the run, it never skips it."""
    settings = load_settings(env=os.environ)
    engine = DockerEngine(settings.engine.url, timeout_s=settings.engine.timeout_s)
    try:
        engine.ping()
    except EngineUnavailable as exc:
        pytest.fail(f"these tests need a Docker engine: {exc}", pytrace=False)
    # Only what this session made: a concurrent session's objects are not ours.
    started = time.time() - 1.0
    yield engine
    _sweep(engine, started)


@pytest.fixture(scope="session")
def base_image(docker_engine: DockerEngine) -> str:
    """The base worker image's tag, built if actors/worker changed."""
    tag = load_settings(env=os.environ).worker.image
    ensure_base_image(docker_engine, tag)
    return tag


@pytest.fixture(params=["memory", "docker"])
def engine(request: pytest.FixtureRequest) -> Engine:
    """Both engines, for the contract suite that keeps the fake honest."""
    if request.param == "docker":
        docker: Engine = request.getfixturevalue("docker_engine")
        return docker
    return MemoryEngine(clock=FakeClock())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that touches Docker, so ``-m docker`` / ``-m 'not docker'`` split them."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        on_docker = callspec is not None and callspec.params.get("engine") == "docker"
        if on_docker or names & _DOCKER_FIXTURES:
            item.add_marker(pytest.mark.docker)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say how many tests ran against the real engine: a green run must show they did."""
    counts = {
        outcome: sum(
            1
            for r in terminalreporter.stats.get(outcome, [])
            if "docker" in getattr(r, "keywords", {})
        )
        for outcome in ("passed", "failed", "skipped", "error")
    }
    ran = counts["passed"] + counts["failed"] + counts["error"]
    if ran or counts["skipped"]:
        terminalreporter.write_line(
            f"real Docker engine: {ran} tests ran ({counts['passed']} passed, "
            f"{counts['failed'] + counts['error']} failed, {counts['skipped']} skipped)"
        )


# --- a throwaway PostgreSQL for the cluster store's tests -----------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[LocalPostgres]:
    """One server for the session (about 1 s to start), migrated once; tests that
    restart it leave it running."""
    from actors.store.postgres import PostgresStore

    with LocalPostgres() as server:
        PostgresStore(server.url, "migrate").close()
        yield server


@pytest.fixture
def postgres_url(postgres_server: LocalPostgres) -> str:
    """The session server's database, emptied for this test (faster than a new schema)."""
    import psycopg

    postgres_server.start()  # a test that stopped it and failed before its start()
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        conn.execute(
            "TRUNCATE jobs, job_history, hosts, snapshots, snapshot_usage RESTART IDENTITY"
        )
    return postgres_server.url
