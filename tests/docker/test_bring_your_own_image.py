"""Bring your own worker image (issue 13), on the real engine.

The images are built here, FROM scratch with Debian's static busybox, and
hold nothing of Snapyard's: no entrypoint that reads /run/snapyard/env, no
label. The env helper gives them the job's env; commits give back their own
entrypoint and CMD; each agent type runs its own image under its own limits.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from process_kit import cli, free_port
from session_labels import TEST_LABELS
from waiting import eventually

from actors.app import Snapyard, SnapyardError
from actors.engine.base import ContainerState, EngineError
from actors.engine.docker import DockerEngine
from actors.labels import LABEL_JOB_ID
from actors.model import Job, JobSpec, JobState, validate_spec
from actors.settings import AgentTypeSettings, Settings, load_settings
from actors.worker_helper import BUSYBOX, HELPER_MOUNT

pytestmark = pytest.mark.docker

JOB_S = 90.0
GRACE_S = 10.0
AGENT_UID = "4321"

# A user's agent: its own entrypoint (a trap, then the command in the
# background, so SIGTERM is handled at once), its own CMD, a named non-root
# USER, and a run counter in its workdir that a snapshot keeps.
AGENT_SCRIPT = """#!/bin/sh
trap 'echo "agent: SIGTERM received" >&2; [ -n "${child:-}" ] && kill "$child" 2>/dev/null; exit 143' TERM
echo x >> /work/runs
echo "agent: run $(wc -l < /work/runs | tr -d ' ') as $(id -u)"
"$@" &
child=$!
wait "$child"
"""
AGENT_CMD = ("sh", "-c", "echo the image's own command")
AGENT_DOCKERFILE = f"""FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
COPY agent /usr/bin/agent
RUN ["/bin/sh", "-c", "chmod 0755 /usr/bin/agent && mkdir -p /etc /work /tmp && chmod 1777 /tmp && echo 'agent:x:{AGENT_UID}:{AGENT_UID}::/work:/bin/sh' > /etc/passwd && echo 'agent:x:{AGENT_UID}:' > /etc/group && chown {AGENT_UID}:{AGENT_UID} /work"]
ENV PATH=/usr/bin:/bin
WORKDIR /work
USER agent
ENTRYPOINT ["/usr/bin/agent"]
CMD ["sh", "-c", "echo the image's own command"]
"""
# One static binary and nothing else: no /bin/sh for a helper to lean on.
STATIC_DOCKERFILE = """FROM scratch
COPY busybox /app/busybox
ENTRYPOINT ["/app/busybox"]
CMD ["env"]
"""


def _context(dockerfile: str, *files: tuple[str, bytes, int]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, blob, mode in (("Dockerfile", dockerfile.encode(), 0o644), *files):
            member = tarfile.TarInfo(name)
            member.size, member.mode = len(blob), mode
            tar.addfile(member, io.BytesIO(blob))
    return buffer.getvalue()


@dataclass(frozen=True)
class Images:
    agent: str
    agent_id: str
    static: str
    static_id: str


@pytest.fixture(scope="module")
def images(docker_engine: DockerEngine) -> Iterator[Images]:
    suffix = uuid.uuid4().hex[:8]
    busybox = ("busybox", BUSYBOX.read_bytes(), 0o755)
    agent = f"snapyard-test-agent-{suffix}:1"
    static = f"snapyard-test-static-{suffix}:1"
    agent_id = docker_engine.build_image(
        _context(AGENT_DOCKERFILE, busybox, ("agent", AGENT_SCRIPT.encode(), 0o755)),
        agent,
        TEST_LABELS,
    )
    static_id = docker_engine.build_image(_context(STATIC_DOCKERFILE, busybox), static, TEST_LABELS)
    yield Images(agent, agent_id, static, static_id)
    for image_id in (agent_id, static_id):
        with contextlib.suppress(EngineError):
            docker_engine.remove_image(image_id, force=True)


def _settings(base_image: str, images: Images, data_dir: Path, repository: str) -> Settings:
    return (
        load_settings(env=os.environ)
        .replace(
            worker={"image": base_image, "setup_seconds": 0.0, "memory_mb": 128, "cpus": 1.0},
            snapshots={"repository": repository},
            supervisor={
                "data_dir": str(data_dir),
                "tick_interval_s": 0.05,
                "stop_grace_s": GRACE_S,
            },
            sentry={"dsn": ""},
        )
        .replace(
            agent_types={
                "review": AgentTypeSettings(
                    image=images.agent, memory_mb=96, cpus=0.5, pids_limit=48
                ),
                "static": AgentTypeSettings(image=images.static),
            }
        )
    )


@pytest.fixture
def app(
    docker_engine: DockerEngine,
    base_image: str,
    images: Images,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Snapyard]:
    repository = f"snapyard-test-byoi-{uuid.uuid4().hex[:8]}"
    settings = _settings(base_image, images, tmp_path_factory.mktemp("byoi"), repository)
    app = Snapyard(settings, engine=docker_engine, container_labels=TEST_LABELS).start()
    yield app
    app.stop(timeout_s=30.0)
    for _ in range(5):  # children before parents: one generation per pass
        for image in docker_engine.list_images({"snapyard.repository": repository}):
            with contextlib.suppress(EngineError):
                docker_engine.remove_image(image.id, force=True)


def run(app: Snapyard, spec: JobSpec) -> Job:
    job = app.wait(app.submit(spec).id, JOB_S)
    assert job.state is JobState.SUCCEEDED, job
    return job


def digests(job: Job) -> list[str]:
    return [line.split()[0] for line in job.logs_tail.splitlines() if line.endswith("  -")]


def digest_command(names: list[str]) -> list[str]:
    return ["sh", "-c", "; ".join(f'printf %s "${name}" | sha256sum' for name in names)]


ENV = {
    "TOKEN": "tok-" + uuid.uuid4().hex,
    "TRICKY": "x=y==\n\"'$`\\ -n é😀\n",
    "PAD": "hello",  # base64 ends in '=': split at the first '=' only
}


def test_an_image_with_its_own_entrypoint_and_user_gets_the_env_and_its_snapshot_looks_like_it(
    app: Snapyard, images: Images, docker_engine: DockerEngine
) -> None:
    project = f"byoi-{uuid.uuid4().hex[:8]}"
    spec = validate_spec(project, "w", "review", command=digest_command(list(ENV)), env=ENV)
    job = run(app, spec)
    # The image's own entrypoint ran, as the image's own (named, non-root) user.
    assert f"agent: run 1 as {AGENT_UID}" in job.logs_tail.splitlines()
    assert digests(job) == [hashlib.sha256(v.encode()).hexdigest() for v in ENV.values()]
    assert job.image_id == images.agent_id
    assert job.snapshot_committed

    (snapshot,) = [s for s in app.snapshots() if s.key == spec.key]
    assert snapshot.base_image_id == images.agent_id
    info = docker_engine.inspect_image(snapshot.image_id)
    assert info.entrypoint == ("/usr/bin/agent",)
    assert info.cmd == AGENT_CMD
    config = repr((info.env, info.container_env, dict(info.labels), info.cmd, info.entrypoint))
    assert HELPER_MOUNT not in config
    for value in ENV.values():
        assert value not in config

    again = run(app, validate_spec(project, "w", "review", command=["true"], env=ENV))
    assert again.from_snapshot
    assert again.image_id == snapshot.image_id
    assert f"agent: run 2 as {AGENT_UID}" in again.logs_tail.splitlines()  # its workdir kept


def test_an_image_that_is_one_static_binary_and_no_shell_works(
    app: Snapyard, images: Images, docker_engine: DockerEngine
) -> None:
    project = f"byoi-static-{uuid.uuid4().hex[:8]}"
    # No command: the image's CMD (`env`) after its ENTRYPOINT. Three
    # characters: short enough that the logs do not mask the value.
    plain = run(app, validate_spec(project, "w", "static", env={"GREETING": "h=i"}))
    assert "GREETING=h=i" in plain.logs_tail.splitlines()
    assert plain.image_id == images.static_id
    # A command replaces CMD and keeps the ENTRYPOINT: /app/busybox sh -c ...
    job = run(
        app, validate_spec(project, "w", "static", command=digest_command(list(ENV)), env=ENV)
    )
    assert job.from_snapshot
    assert digests(job) == [hashlib.sha256(v.encode()).hexdigest() for v in ENV.values()]
    (snapshot,) = [s for s in app.snapshots() if s.key.project == project]
    info = docker_engine.inspect_image(snapshot.image_id)
    assert (info.entrypoint, info.cmd) == (("/app/busybox",), ("env",))


def _container_of(app: Snapyard, engine: DockerEngine, job_id: str) -> ContainerState:
    def running() -> list[ContainerState]:
        job = app.get(job_id)
        if job is None or job.state is not JobState.RUNNING:
            return []
        return engine.list_containers({LABEL_JOB_ID: job_id})

    (state,) = eventually(running, lambda found: len(found) == 1, f"{job_id} running", JOB_S)
    return state


def test_two_agent_types_run_their_own_images_under_their_own_limits(
    app: Snapyard, images: Images, docker_engine: DockerEngine, base_image: str
) -> None:
    project = f"byoi-types-{uuid.uuid4().hex[:8]}"
    sleeping = ["sh", "-c", "echo ready; sleep 600"]
    coder = app.submit(validate_spec(project, "a", "coder", command=sleeping))
    reviewer = app.submit(validate_spec(project, "b", "review", command=sleeping))
    try:
        coder_state = _container_of(app, docker_engine, coder.id)
        review_state = _container_of(app, docker_engine, reviewer.id)
        # What docker inspect shows while both run.
        assert coder_state.image_id == docker_engine.inspect_image(base_image).id
        assert (coder_state.memory_bytes, coder_state.cpus) == (128 * 2**20, 1.0)
        assert review_state.image_id == images.agent_id
        assert (review_state.memory_bytes, review_state.cpus, review_state.pids_limit) == (
            96 * 2**20,
            0.5,
            48,
        )
    finally:
        for job in (coder, reviewer):
            app.cancel(job.id)
    for job in (coder, reviewer):
        assert app.wait(job.id, JOB_S).state is JobState.CANCELLED


def test_sigterm_on_timeout_reaches_the_images_process_within_the_grace(app: Snapyard) -> None:
    project = f"byoi-timeout-{uuid.uuid4().hex[:8]}"
    spec = validate_spec(
        project, "w", "review", command=["sh", "-c", "echo working; sleep 600"], timeout_s=3
    )
    job = app.wait(app.submit(spec).id, JOB_S)
    assert job.state is JobState.TIMED_OUT, job
    assert "agent: SIGTERM received" in job.logs_tail.splitlines()
    assert job.exit_code == 143  # its own trap's code: SIGTERM, not the SIGKILL after the grace
    assert job.deadline is not None
    assert job.finished_at is not None
    assert job.finished_at - job.deadline < GRACE_S


def test_a_missing_agent_type_image_stops_start_up_and_doctor_says_how_to_get_it(
    docker_engine: DockerEngine, base_image: str, images: Images, tmp_path: Path
) -> None:
    absent = f"snapyard-test-absent-{uuid.uuid4().hex[:8]}:1"
    settings = _settings(base_image, images, tmp_path / "data", "snapyard-test-absent").replace(
        agent_types={"review": AgentTypeSettings(image=absent)}
    )
    with pytest.raises(SnapyardError, match=f"the worker image {absent} does not exist"):
        Snapyard(settings, engine=docker_engine).start()

    env = {
        "SNAPYARD_AGENT_TYPES__review__IMAGE": absent,
        "SNAPYARD_AGENT_TYPES__static__IMAGE": images.static,
        "SNAPYARD_DATA_DIR": str(tmp_path / "doctor"),
        "SNAPYARD_API": f"127.0.0.1:{free_port()}",
    }
    code, out, _ = cli(env, "doctor")
    assert code == 1
    assert f"FAIL  image of review  {absent}: missing" in out
    assert f"docker build -t {absent} DIR" in out
    assert f"ok    image of static  {images.static}: " in out
    assert f"ok    env helper       {tmp_path / 'doctor' / 'helper'}/" in out
