"""``snapyard run`` as its own process on the real engine, driven by the CLI.

This is what an operator does: start the supervisor in one terminal, submit
from another, look at jobs and snapshots, then stop it with SIGTERM. The
project name is unique to the test; its containers and images are removed
afterwards, and the snapshot repository is the tests' own.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from process_kit import Supervisor, cli, free_port, running_supervisor
from session_labels import SNAPSHOT_REPOSITORY

from actors.engine.base import Engine, EngineError, ImageMissing
from actors.labels import LABEL_PROJECT
from actors.wire import JOB_FIELDS, SNAPSHOT_FIELDS

pytestmark = pytest.mark.docker

TEST_REPOSITORY = SNAPSHOT_REPOSITORY
SECRET = "docker-cli-secret-" + uuid.uuid4().hex


@pytest.fixture
def supervisor(docker_engine: Engine, base_image: str, tmp_path: Path) -> Iterator[Supervisor]:
    project = f"it-cli-{uuid.uuid4().hex[:8]}"
    env = {
        "SNAPYARD_SNAPSHOTS__REPOSITORY": TEST_REPOSITORY,
        "SNAPYARD_WORKER__SETUP_SECONDS": "1",
        "SNAPYARD_SUPERVISOR__SHUTDOWN_TIMEOUT_S": "20",
    }
    with running_supervisor(tmp_path, project, env) as sup:
        yield sup
    for container in docker_engine.list_containers({LABEL_PROJECT: project}):
        with contextlib.suppress(EngineError):
            docker_engine.remove_container(container.id, force=True)
    images = docker_engine.list_images({LABEL_PROJECT: project})
    for image in sorted(images, key=lambda i: i.created_at, reverse=True):
        with contextlib.suppress(EngineError):
            docker_engine.remove_image(image.id, force=True)


def submit_wait(sup: Supervisor, work_item: str, *extra: str) -> tuple[int, dict[str, Any]]:
    code, out, err = cli(
        sup.env,
        "submit",
        "--project",
        sup.project,
        "--work-item",
        work_item,
        "--wait",
        "--json",
        *extra,
    )
    assert err == "", err
    return code, json.loads(out)


def test_run_submit_snapshots_and_sigterm_on_the_real_engine(
    supervisor: Supervisor, docker_engine: Engine, base_image: str
) -> None:
    sup = supervisor
    code, first = submit_wait(sup, "item", "--env", f"API_TOKEN={SECRET}")
    assert code == 0
    assert tuple(first) == JOB_FIELDS
    assert first["state"] == "succeeded"
    assert first["project"] == sup.project
    assert first["work_item"] == "item"
    assert first["image_id"] == docker_engine.inspect_image(base_image).id
    assert first["from_snapshot"] is False
    assert first["snapshot_committed"] is True
    assert first["exit_code"] == 0
    assert first["error"] is None

    code, second = submit_wait(sup, "item")
    assert code == 0
    assert second["from_snapshot"] is True
    assert second["state"] == "succeeded"
    code, out, _ = cli(sup.env, "job", second["id"], "--logs", "--json")
    assert code == 0
    assert "setup skipped" in json.loads(out)["logs"]

    code, failed = submit_wait(sup, "broken", "--", "sh", "-c", "exit 7")
    assert code == 1
    assert failed["state"] == "failed"
    assert failed["exit_code"] == 7
    assert failed["snapshot_committed"] is False

    code, out, _ = cli(sup.env, "snapshots", "--json")
    assert code == 0
    mine = [s for s in json.loads(out) if s["project"] == sup.project]
    assert len(mine) == 1
    snap = mine[0]
    assert tuple(snap) == SNAPSHOT_FIELDS
    assert snap["work_item"] == "item"
    assert snap["base_image_id"] == first["image_id"]
    assert snap["layers"] >= 2
    docker_engine.inspect_image(snap["image_id"])

    code, out, _ = cli(sup.env, "snapshots", "rm", sup.project, "item")
    assert code == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            docker_engine.inspect_image(snap["image_id"])
        except ImageMissing:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"snapshot image {snap['image_id']} still exists after snapshots rm")

    code, out, _ = cli(sup.env, "jobs", "--json")
    assert code == 0
    assert {j["id"] for j in json.loads(out)} >= {first["id"], second["id"], failed["id"]}

    sup.process.send_signal(signal.SIGTERM)
    assert sup.process.wait(timeout=40) == 0
    logs = sup.log.read_text()
    assert SECRET not in logs
    code, _, err = cli(sup.env, "jobs")
    assert code == 3
    assert sup.url in err


def test_doctor_checks_engine_base_image_store_and_the_running_api(
    supervisor: Supervisor, base_image: str
) -> None:
    code, out, _ = cli(supervisor.env, "doctor")
    lines = {line.split()[1]: line for line in out.splitlines() if line[:4] in ("ok  ", "FAIL")}
    assert code == 0, out
    assert set(lines) == {"config", "engine", "base", "env", "store", "permissions", "api"}
    assert all(line.startswith("ok  ") for line in lines.values()), out
    assert base_image in lines["base"]
    assert supervisor.env["SNAPYARD_DATA_DIR"] in lines["store"]
    assert "a supervisor answers" in lines["api"]
    assert "only its owner can read it" in lines["permissions"]
    assert out.splitlines()[-1] == "all checks passed"


def test_doctor_says_what_to_do_when_the_port_is_taken(base_image: str, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        env = {"SNAPYARD_API": f"127.0.0.1:{port}", "SNAPYARD_DATA_DIR": str(tmp_path / "d")}
        code, out, _ = cli(env, "doctor")
    assert code == 1
    assert re.search(rf"^FAIL  api port +127\.0\.0\.1:{port}: ", out, re.M), out
    assert "-> free the port or change [api] port / SNAPYARD_API" in out
    assert out.splitlines()[-1] == "1 check(s) failed: api port"


def test_doctor_warns_about_a_data_dir_others_can_read(base_image: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    env = {"SNAPYARD_API": f"127.0.0.1:{free_port()}", "SNAPYARD_DATA_DIR": str(data)}
    code, out, _ = cli(env, "doctor")
    assert code == 1
    assert re.search(rf"^FAIL  permissions +{re.escape(str(data))} is mode 0755", out, re.M), out
    assert f"-> chmod -R go= {data}" in out
