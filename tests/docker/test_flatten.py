"""One work item run 300 times on the real engine: its workspace survives every flatten.

Regression (issue 11, item 2): at ``snapshots.max_layers`` the next run started
from the base image, so ``/workspace`` was empty again every ~60 runs. Each
job here checks that the line the previous run appended is the last one in
``/workspace/runs`` before appending its own; a cap of 4 layers above the base
makes a flatten every third run, so 300 runs cross about 100 of them.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator

import pytest
from app_kit import real_app
from session_labels import TEST_LABELS

from actors.app import Snapyard
from actors.engine.base import ContainerSpec, EngineError, ImageConfig
from actors.engine.docker import DockerEngine
from actors.model import JobState, validate_spec

pytestmark = [pytest.mark.docker, pytest.mark.slow]

RUNS = 300
MAX_LAYERS = 4
JOB_S = 60.0
# Fails the job unless the previous run's line is the last one there, then adds its own.
APPEND_AFTER_PREVIOUS = [
    "sh",
    "-c",
    "n=$(cat /workspace/runs 2>/dev/null | wc -l); last=$(tail -n 1 /workspace/runs 2>/dev/null); "
    'if [ "$n" -ne "$RUN" ]; then echo "run $RUN found $n lines"; exit 3; fi; '
    'if [ "$RUN" -gt 0 ] && [ "$last" != "run $((RUN - 1))" ]; then '
    'echo "run $RUN found last line [$last]"; exit 4; fi; '
    'echo "run $RUN" >> /workspace/runs',
]


@pytest.fixture
def app(
    docker_engine: DockerEngine, base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Snapyard]:
    data_dir = tmp_path_factory.mktemp("flatten")
    with real_app(docker_engine, base_image, data_dir, "flatten", max_layers=MAX_LAYERS) as app:
        yield app


def test_300_runs_of_one_work_item_keep_the_workspace_and_stay_under_the_cap(
    app: Snapyard, docker_engine: DockerEngine, base_image: str
) -> None:
    base_layers = docker_engine.inspect_image(base_image).layers
    depths: list[int] = []
    began = time.monotonic()
    for run in range(RUNS):
        spec = validate_spec(
            "flatten", "item", command=APPEND_AFTER_PREVIOUS, env={"RUN": str(run)}
        )
        job = app.wait(app.submit(spec).id, JOB_S)
        assert job.state is JobState.SUCCEEDED, (run, job.error, job.logs_tail)
        assert job.snapshot_committed, (run, job.error)
        assert job.from_snapshot is (run > 0), run
        (snapshot,) = app.snapshots()
        depth = docker_engine.inspect_image(snapshot.image_id).layers - base_layers
        assert 1 <= depth < MAX_LAYERS, (run, depth)
        depths.append(depth)
    elapsed = time.monotonic() - began
    print(f"\n{RUNS} runs in {elapsed:.1f}s ({elapsed / RUNS * 1000:.0f} ms a run)")
    # The chain really grew and was flattened, again and again.
    assert depths[:4] == [1, 2, 3, 1]
    assert depths.count(1) >= RUNS // (MAX_LAYERS - 1)
    (snapshot,) = app.snapshots()
    assert snapshot.own_bytes is not None
    assert 0 < snapshot.own_bytes < snapshot.size_bytes


def test_a_flattened_image_keeps_deletions_of_base_files_on_the_real_engine(
    docker_engine: DockerEngine, base_image: str
) -> None:
    """Whiteouts in the merged layer must still hide the base's files: the memory
    engine has no base files to delete, so this one runs on Docker only."""
    repository = f"snapyard-test-flatten-{uuid.uuid4().hex[:8]}"
    base_id = docker_engine.inspect_image(base_image).id
    scripts = [
        "rm /bin/vi; mkdir -p /opt/old; echo o > /opt/old/o; echo 1 > /workspace/f",
        "rm -r /opt; mkdir -p /opt/new; rm -r /tmp; mkdir -m 1777 /tmp; echo 2 >> /workspace/f",
    ]
    show = "ls /bin/vi /opt/old 2>&1; ls /opt; ls /tmp | wc -l; ls -ld /tmp; cat /workspace/f"
    made: list[str] = []

    def run(image: str, script: str) -> str:
        spec = ContainerSpec(image=image, command=["sh", "-c", script], labels=TEST_LABELS)
        container = docker_engine.create_container(spec)
        docker_engine.start_container(container)
        assert docker_engine.wait_container(container, timeout_s=JOB_S) == 0
        return container

    try:
        image = base_id
        for script in scripts:
            container = run(image, script)
            image = docker_engine.commit_container(container, repository, "deep", ImageConfig())
            made.append(image)
            docker_engine.remove_container(container)
        made.append(docker_engine.flatten_image(image, base_id, repository, "flat"))
        container = run(made[-1], show)
        lines = docker_engine.container_logs(container).lines()
        docker_engine.remove_container(container)
        assert "ls: /bin/vi: No such file or directory" in lines
        assert "ls: /opt/old: No such file or directory" in lines
        # /opt holds only what the last run made; /tmp is re-created, empty, sticky.
        assert lines[-5:-3] == ["new", "0"]
        assert lines[-3].startswith("drwxrwxrwt")
        assert lines[-2:] == ["1", "2"]
    finally:
        for leftover in reversed(made):  # children before parents
            with contextlib.suppress(EngineError):
                docker_engine.remove_image(leftover, force=True)
