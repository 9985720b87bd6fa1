"""Extra dockerds as stand-in hosts, and snapshots moving between daemons by digest.

Real engines only: the main daemon, a throwaway registry and an extra
``dockerd`` under a temp dir. The main daemon must come out untouched.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import registry_kit
from session_labels import TEST_LABELS

from actors.engine.base import ContainerSpec, EngineUnavailable, ImageConfig
from actors.engine.docker import DockerEngine
from actors.localcluster.dockerd import LocalDockerd
from actors.localcluster.registry import LocalRegistry

local_registry = registry_kit.local_registry

JOB_FILE = "/workspace/job-file"
SETUP_ENV = {"SNAPYARD_SETUP_SECONDS": "0"}


@pytest.fixture(scope="module")
def host(docker_engine: DockerEngine, base_image: str) -> Iterator[LocalDockerd]:
    """One extra daemon with the base image loaded, for the tests that only use it."""
    with LocalDockerd("h1") as daemon:
        daemon.load_image(docker_engine, base_image)
        yield daemon


def run(engine: DockerEngine, image: str, script: str) -> tuple[str, int]:
    spec = ContainerSpec(
        image=image, command=("sh", "-c", script), env=SETUP_ENV, labels=TEST_LABELS
    )
    container_id = engine.create_container(spec)
    engine.start_container(container_id)
    return container_id, engine.wait_container(container_id, timeout_s=60)


def snapshot(engine: DockerEngine, image: str, content: str, tag: str) -> str:
    """A committed image holding ``content`` in the job file, as a Spawner commits one."""
    container_id, code = run(engine, image, f"echo {content} > {JOB_FILE}")
    assert code == 0, engine.container_logs(container_id).text
    own = engine.inspect_image(image)
    config = ImageConfig(labels=dict(TEST_LABELS), entrypoint=own.entrypoint or (), cmd=own.cmd)
    image_id = engine.commit_container(container_id, "snapyard-test-hosts", tag, config)
    engine.remove_container(container_id)
    return image_id


def mounts_under(directory: Path) -> list[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line.split()[4] for line in lines if line.split()[4].startswith(str(directory))]


def processes_naming(directory: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if str(directory).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def container_processes(container_id: str) -> set[int]:
    """The PIDs in a container's cgroup (the cgroupfs driver's layout, v1 or v2)."""
    for root in ("/sys/fs/cgroup/pids/docker", "/sys/fs/cgroup/docker"):
        procs = Path(root) / container_id / "cgroup.procs"
        if procs.exists():
            try:
                return {int(pid) for pid in procs.read_text().split()}
            except OSError:
                return set()  # the cgroup went as we read it
    return set()


def test_an_extra_daemon_runs_beside_the_main_one_and_leaves_nothing_behind(
    docker_engine: DockerEngine, base_image: str
) -> None:
    main_pid_before = Path("/var/run/docker.pid").read_text()
    daemon = LocalDockerd("h0")
    with daemon:
        assert len(str(daemon.exec_root / "containerd" / "containerd.sock")) < 100
        engine = daemon.engine()
        engine.ping()
        # Its own image store: the base is not there until loaded, then with the same ID.
        assert not engine.list_images(TEST_LABELS)
        loaded = daemon.load_image(docker_engine, base_image)
        assert loaded == docker_engine.inspect_image(base_image).id
        _, code = run(engine, base_image, "true")
        assert code == 0
        assert engine.list_containers(TEST_LABELS)
        assert not [c for c in engine.list_containers(TEST_LABELS) if c.running]
    assert not daemon.directory.exists()
    assert mounts_under(daemon.directory) == []
    assert processes_naming(daemon.directory) == []
    # The main daemon is the same process and answers.
    assert Path("/var/run/docker.pid").read_text() == main_pid_before
    docker_engine.ping()


def test_a_snapshot_pushed_from_the_main_daemon_is_pulled_by_digest_elsewhere(
    docker_engine: DockerEngine,
    base_image: str,
    local_registry: LocalRegistry,
    host: LocalDockerd,
    caplog: pytest.LogCaptureFixture,
) -> None:
    repository = local_registry.repository("snapyard-test/hosts")
    first = snapshot(docker_engine, base_image, "first-run", "first")
    docker_engine.push_image(first, repository)
    second = snapshot(docker_engine, first, "second-run", "second")
    with caplog.at_level(logging.INFO, logger="actors.engine._docker_registry"):
        reference = docker_engine.push_image(second, repository)
    # The push stream's own account: the child's layer went, the rest was there.
    assert "1 layer(s) uploaded" in caplog.text, caplog.text

    other = host.engine()
    assert other.pull_image(reference) == second
    assert other.inspect_image(second).id == second
    container_id, code = run(other, reference, f"cat {JOB_FILE}")
    assert code == 0
    logs = other.container_logs(container_id).lines()
    assert "second-run" in logs
    # The worker found the snapshot's marker: setup was done on the other daemon.
    assert any("setup skipped" in line for line in logs), logs


def test_a_killed_daemon_takes_its_containers_along_and_comes_back_with_its_images(
    docker_engine: DockerEngine, base_image: str
) -> None:
    daemon = LocalDockerd("h2")
    with daemon:
        daemon.load_image(docker_engine, base_image)
        engine = daemon.engine()
        spec = ContainerSpec(
            image=base_image, command=("sh", "-c", "sleep 300"), env=SETUP_ENV, labels=TEST_LABELS
        )
        container_id = engine.create_container(spec)
        engine.start_container(container_id)
        assert engine.inspect_container(container_id).running
        assert container_processes(container_id), "the worker runs in its cgroup"
        daemon.kill()
        assert container_processes(container_id) == set()
        assert not daemon.running
        with pytest.raises(EngineUnavailable):
            DockerEngine(daemon.url, timeout_s=2.0).ping()
        assert processes_naming(daemon.directory) == []
        assert mounts_under(daemon.directory) == []
        daemon.start()
        engine = daemon.engine()
        assert engine.inspect_image(base_image).id == docker_engine.inspect_image(base_image).id
        # The container did not survive its host: it is not running.
        assert not engine.inspect_container(container_id).running
    assert not daemon.directory.exists()
