"""A user's worker image, on the real engine: used as it is, never built over.

Regression for: `SNAPYARD_WORKER__IMAGE=ceo-custom:1 snapyard run` logged
"built the worker image ceo-custom:1" (the demo image, under the user's tag),
then deleted the user's original image.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from process_kit import cli, running_supervisor, start_run
from session_labels import TEST_LABELS

from actors.engine.base import EngineError, ImageMissing
from actors.engine.docker import DockerEngine
from actors.worker_image import BUSYBOX

pytestmark = pytest.mark.docker

MARKER = "acme-agent " + uuid.uuid4().hex
DOCKERFILE = f"""FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
RUN ["/bin/sh", "-c", "mkdir -p /etc /workspace && echo '{MARKER}' > /etc/acme-marker"]
ENV PATH=/bin
CMD ["sh", "-c", "echo the image's own command"]
"""
IMAGE_CMD = ("sh", "-c", "echo the image's own command")


def _context() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, blob, mode in (
            ("Dockerfile", DOCKERFILE.encode(), 0o644),
            ("busybox", BUSYBOX.read_bytes(), 0o755),
        ):
            member = tarfile.TarInfo(name)
            member.size, member.mode = len(blob), mode
            tar.addfile(member, io.BytesIO(blob))
    return buffer.getvalue()


@pytest.fixture
def user_image(docker_engine: DockerEngine, base_image: str) -> Iterator[tuple[str, str]]:
    """``(tag, ID)`` of an image the user built, with nothing of Snapyard's in it."""
    tag = f"snapyard-test-user-{uuid.uuid4().hex[:8]}:1"
    image_id = docker_engine.build_image(_context(), tag, TEST_LABELS)
    yield tag, image_id
    project_images = docker_engine.list_images({"snapyard.base_image_id": image_id})
    for image in sorted(project_images, key=lambda i: i.created_at, reverse=True):
        with contextlib.suppress(EngineError):
            docker_engine.remove_image(image.id, force=True)
    with contextlib.suppress(EngineError):
        docker_engine.remove_image(image_id, force=True)


def test_snapyard_run_uses_a_users_image_and_leaves_it_untouched(
    docker_engine: DockerEngine, user_image: tuple[str, str], tmp_path: Path
) -> None:
    tag, image_id = user_image
    project = f"it-user-{uuid.uuid4().hex[:8]}"
    env = {
        "SNAPYARD_WORKER__IMAGE": tag,
        "SNAPYARD_SNAPSHOTS__REPOSITORY": f"snapyard-test-user-{uuid.uuid4().hex[:8]}",
    }
    with running_supervisor(tmp_path, project, env) as sup:
        code, out, err = cli(
            sup.env,
            *("submit", "--project", project, "--work-item", "w", "--wait", "--json"),
            *("--", "sh", "-c", "cat /etc/acme-marker"),
        )
        assert (code, err) == (0, ""), out
        job = json.loads(out)
        assert job["state"] == "succeeded"
        assert job["image_id"] == image_id  # the job ran on the user's image
        code, out, _ = cli(sup.env, "job", job["id"], "--logs", "--json")
        assert MARKER in json.loads(out)["logs"]
        # Its snapshot looks like it: no entrypoint (it has only CMD), its own CMD.
        code, out, _ = cli(sup.env, "snapshots", "--json")
        (snapshot,) = [s for s in json.loads(out) if s["project"] == project]
        info = docker_engine.inspect_image(snapshot["image_id"])
        assert (tuple(info.entrypoint or ()), info.cmd) == ((), IMAGE_CMD)
        sup.process.send_signal(signal.SIGTERM)
        assert sup.process.wait(timeout=40) == 0
        log = sup.log.read_text()
    assert "built the worker image" not in log
    # Unchanged: the tag still names the same image, and that image exists.
    assert docker_engine.inspect_image(tag).id == image_id
    assert docker_engine.inspect_image(image_id).id == image_id

    code, out, err = cli(env, "image", "build", "--force")
    assert code != 0
    assert "is not an image Snapyard built" in err
    assert docker_engine.inspect_image(tag).id == image_id


def test_a_missing_users_image_stops_start_up_with_exit_2_saying_how_to_get_it(
    docker_engine: DockerEngine, base_image: str, tmp_path: Path
) -> None:
    tag = f"snapyard-test-absent-{uuid.uuid4().hex[:8]}:1"
    env = {
        "SNAPYARD_WORKER__IMAGE": tag,
        "SNAPYARD_API": "127.0.0.1:0",
        "SNAPYARD_DATA_DIR": str(tmp_path / "data"),
    }
    log = tmp_path / "run.log"
    process = start_run(env, log)
    assert process.wait(timeout=60) == 2
    text = log.read_text()
    assert f"the worker image {tag} does not exist" in text
    assert f"docker build -t {tag}" in text
    with pytest.raises(ImageMissing):
        docker_engine.inspect_image(tag)  # nothing was built under the user's name
