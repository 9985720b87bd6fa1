"""One suite, two engines: what Docker does, the MemoryEngine must do too.

Every test runs against the real daemon (with the real busybox worker image)
and against MemoryEngine (with the same image built from the same context, and
an exit policy that plays the few shell scripts below). When Docker surprises
us, the test here pins the surprise and the fake copies it.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import re
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from session_labels import TEST_LABELS
from waiting import eventually

from actors.engine.base import (
    Conflict,
    ContainerMissing,
    ContainerSpec,
    Engine,
    EngineError,
    EngineEvent,
    EngineUnavailable,
    EventKind,
    ImageConfig,
    ImageMissing,
)
from actors.engine.docker import DockerEngine
from actors.engine.memory import MemoryContainer, MemoryEngine
from actors.labels import LABEL_ROLE, LABEL_WORKER_DIGEST
from actors.model import MAX_ENV_VALUE_BYTES
from actors.worker_image import ensure_base_image

TAG = "snapyard-worker:latest"
MARKER = "/workspace/.snapyard-setup-done"
JOB_FILE = "/workspace/job-file"
EVENT_WAIT_S = 15.0

EXIT3 = ("sh", "-c", "echo out; echo err >&2; exit 3")
DONE = ("sh", "-c", "echo job done")
SLEEP = ("sh", "-c", "sleep 30")
# Says so once SIGTERM is ignored: a stop before that hits the entrypoint (143).
STUBBORN = ("sh", "-c", "trap '' TERM; echo stubborn; sleep 30")
WRITE = ("sh", "-c", f"echo data > {JOB_FILE}")
READ = ("sh", "-c", f"cat {JOB_FILE}")
SHOW_TOKEN = ("sh", "-c", 'echo "token=[$API_TOKEN]"')
# The pauses are the worker's, not the test's: lines written to two pipes in
# the same instant may be logged in either order by the daemon.
INTERLEAVED = ("sh", "-c", "echo out1; sleep 0.5; echo err1 >&2; sleep 0.5; echo out2")
OTHER_FILE = "/workspace/other-file"
# Deletes what WRITE wrote and writes another file: a flatten must keep both changes.
REWRITE = ("sh", "-c", f"rm {JOB_FILE}; echo more > {OTHER_FILE}")
SHOW = ("sh", "-c", f"test -e {JOB_FILE} && echo present || echo absent; cat {OTHER_FILE}; pwd")
TOKEN = "s3cret value with spaces=and équals"
DIGEST_LINE = re.compile(r'printf %s "\$(\w+)" \| sha256sum')


def digest_script(names: Sequence[str]) -> tuple[str, ...]:
    """A job that prints the SHA-256 of each named variable's bytes, one a line."""
    return ("sh", "-c", "; ".join(f'printf %s "${name}" | sha256sum' for name in names))


def play(container: MemoryContainer) -> int | None:
    """What the worker's entrypoint and the scripts above do, in memory."""
    engine = PLAYING[container.id]
    if MARKER in container.files:
        reuse = container.env.get("SNAPYARD_SNAPSHOT_REUSE", "unknown")
        engine.append_logs(
            container.id, stdout=f"worker: snapshot reused ({reuse}), setup skipped\n"
        )
    else:
        engine.append_logs(container.id, stdout="worker: setup starting (0s)\nworker: setup done\n")
        engine.write_file(container.id, MARKER, "")
    command = tuple(container.cmd or ())
    if command == EXIT3:
        engine.append_logs(container.id, stdout="out\n", stderr="err\n")
        return 3
    if command == DONE:
        engine.append_logs(container.id, stdout="job done\n")
        return 0
    if command == WRITE:
        engine.write_file(container.id, JOB_FILE, "data\n")
        return 0
    if command == READ:
        engine.append_logs(container.id, stdout=container.files.get(JOB_FILE, ""))
        return 0
    if command == REWRITE:
        engine.container(container.id).files.pop(JOB_FILE, None)
        engine.write_file(container.id, OTHER_FILE, "more\n")
        return 0
    if command == SHOW:
        present = "present" if JOB_FILE in container.files else "absent"
        shown = f"{present}\n{container.files.get(OTHER_FILE, '')}{container.working_dir}\n"
        engine.append_logs(container.id, stdout=shown)
        return 0
    if command == INTERLEAVED:
        engine.print_output(container.id, ("stdout", "out1\n"), ("stderr", "err1\n"))
        engine.print_output(container.id, ("stdout", "out2\n"))
        return 0
    if command == SHOW_TOKEN:
        token = container.process_env.get("API_TOKEN", "")
        engine.append_logs(container.id, stdout=f"token=[{token}]\n")
        return 0
    if command == STUBBORN:
        engine.ignore_sigterm(container.id)
        engine.append_logs(container.id, stdout="stubborn\n")
    if command[:2] == ("sh", "-c") and DIGEST_LINE.match(command[2]):
        env = container.process_env
        for name in DIGEST_LINE.findall(command[2]):
            digest = hashlib.sha256(env.get(name, "").encode()).hexdigest()
            engine.append_logs(container.id, stdout=f"{digest}  -\n")
        return 0
    return None


# The policy gets only the container; this finds its engine again.
PLAYING: dict[str, MemoryEngine] = {}


@dataclass
class Rig:
    """One test's view of an engine: the base image, unique labels, helpers."""

    engine: Engine
    base: str
    base_id: str
    labels: dict[str, str]
    repo: str
    created: list[str] = field(default_factory=list)

    def create(self, command: tuple[str, ...], image: str | None = None) -> str:
        spec = ContainerSpec(
            image=image or self.base,
            command=command,
            env={"SNAPYARD_SETUP_SECONDS": "0", "SNAPYARD_JOB_ID": "job-secret-4711"},
            labels=self.labels,
            memory_bytes=64 * 1024 * 1024,
            pids_limit=64,
            cpus=0.5,
        )
        container_id = self.engine.create_container(spec)
        if isinstance(self.engine, MemoryEngine):
            PLAYING[container_id] = self.engine
        return container_id

    def run(self, command: tuple[str, ...], image: str | None = None) -> tuple[str, int]:
        container_id = self.create(command, image)
        self.engine.start_container(container_id)
        return container_id, self.engine.wait_container(container_id, timeout_s=30)

    def snapshot(self, tag: str = "one", image: str | None = None) -> str:
        """A committed image from a clean run, as a Spawner would make it."""
        container_id, code = self.run(WRITE, image)
        assert code == 0
        # The image's own entrypoint and CMD, or the env helper's argv would be kept.
        own = self.engine.inspect_image(image or self.base)
        config = ImageConfig(
            labels={LABEL_ROLE: "snapshot"}, entrypoint=own.entrypoint or (), cmd=own.cmd
        )
        image_id = self.engine.commit_container(container_id, self.repo, tag, config)
        self.engine.remove_container(container_id)
        return image_id


@pytest.fixture
def rig(engine: Engine, request: pytest.FixtureRequest) -> Iterator[Rig]:
    if isinstance(engine, MemoryEngine):
        engine.exit_policy = play
        ensure_base_image(engine, TAG)
        base = TAG
    else:
        base = request.getfixturevalue("base_image")
    run = uuid.uuid4().hex[:12]
    labels = {**TEST_LABELS, "snapyard.contract": run}
    yield Rig(engine, base, engine.inspect_image(base).id, labels, f"snapyard-test/c{run}")
    # Clean-up tolerates what vanished already (auto-remove, pruned parents).
    for container in engine.list_containers(labels):
        with contextlib.suppress(EngineError):
            engine.remove_container(container.id, force=True)
        PLAYING.pop(container.id, None)
    for _ in range(3):  # children before parents
        for image in engine.list_images(labels):
            with contextlib.suppress(EngineError):
                engine.remove_image(image.id, force=True)


class Events:
    """Collects an engine's event stream on a thread; waits on it, never sleeps."""

    def __init__(self, engine: Engine, since: float | None = None) -> None:
        self.stream = engine.events(since)
        self.queue: queue.Queue[EngineEvent] = queue.Queue()
        self.seen: list[EngineEvent] = []
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        for event in self.stream:
            self.queue.put(event)

    def until(self, kind: EventKind, object_id: str) -> EngineEvent:
        while True:
            event = self.queue.get(timeout=EVENT_WAIT_S)
            self.seen.append(event)
            if event.kind == kind and event.id == object_id:
                return event

    def kinds(self, object_id: str) -> list[EventKind]:
        return [e.kind for e in self.seen if e.id == object_id]

    def close(self) -> None:
        self.stream.close()
        self.thread.join(timeout=EVENT_WAIT_S)


@pytest.fixture
def events(rig: Rig) -> Iterator[Events]:
    collector = Events(rig.engine)
    yield collector
    collector.close()
    assert not collector.thread.is_alive(), "close() must end the event stream"


# --- containers ------------------------------------------------------------------


def test_create_on_a_missing_image_is_image_missing_404(rig: Rig) -> None:
    missing = f"{rig.repo}/gone:nope"
    with pytest.raises(ImageMissing) as caught:
        rig.create(DONE, image=missing)
    assert caught.value.status_code == 404
    assert missing in str(caught.value)
    assert "No such image" in str(caught.value)


def test_missing_container_is_container_missing_404(rig: Rig) -> None:
    with pytest.raises(ContainerMissing) as caught:
        rig.engine.inspect_container("0" * 64)
    assert caught.value.status_code == 404
    with pytest.raises(ContainerMissing):
        rig.engine.remove_container("0" * 64)


def test_create_from_tag_from_id_and_from_short_id(rig: Rig) -> None:
    bare = rig.base_id.removeprefix("sha256:")
    for ref in (rig.base, rig.base_id, bare, bare[:12]):
        container_id = rig.create(DONE, image=ref)
        state = rig.engine.inspect_container(container_id)
        assert state.image_id == rig.base_id
        assert state.status == "created"
        assert state.exit_code is None
        assert state.labels["snapyard.contract"] == rig.labels["snapyard.contract"]
        # Image labels show through, under the container's own.
        assert state.labels[LABEL_ROLE] == "base"


def test_start_wait_gives_the_exit_code_and_logs_are_demultiplexed(rig: Rig) -> None:
    container_id, code = rig.run(EXIT3)
    assert code == 3
    state = rig.engine.inspect_container(container_id)
    assert state.status == "exited"
    assert state.exit_code == 3
    assert state.started_at is not None
    assert state.finished_at is not None
    lines = rig.engine.container_logs(container_id).lines()
    assert "worker: setup done" in lines
    assert {"out", "err"} <= set(lines)
    # Docker tails the combined log: one line in all, not one per stream.
    assert len(rig.engine.container_logs(container_id, tail=1).lines()) == 1


def test_logs_keep_stdout_and_stderr_in_the_order_they_were_written(rig: Rig) -> None:
    """Regression: the streams were read apart and joined (out1 out2 err1)."""
    container_id, code = rig.run(INTERLEAVED)
    assert code == 0
    assert rig.engine.container_logs(container_id).lines()[-3:] == ["out1", "err1", "out2"]
    assert rig.engine.container_logs(container_id, tail=2).lines() == ["err1", "out2"]


def test_wait_times_out_as_engine_unavailable(rig: Rig) -> None:
    container_id = rig.create(SLEEP)
    rig.engine.start_container(container_id)
    with pytest.raises(EngineUnavailable, match="timed out"):
        rig.engine.wait_container(container_id, timeout_s=0.5)
    assert rig.engine.inspect_container(container_id).status == "running"


def test_stop_sends_sigterm_and_the_worker_exits_143(rig: Rig) -> None:
    container_id = rig.create(SLEEP)
    rig.engine.start_container(container_id)
    rig.engine.stop_container(container_id, grace_s=10)
    assert rig.engine.wait_container(container_id, timeout_s=30) == 143
    rig.engine.stop_container(container_id, grace_s=10)  # not running: no error
    assert rig.engine.inspect_container(container_id).exit_code == 143


def test_stop_escalates_to_sigkill_after_the_grace(rig: Rig) -> None:
    """Flaked under load (143): the stop reached the entrypoint before the trap."""
    container_id = rig.create(STUBBORN)
    rig.engine.start_container(container_id)
    eventually(
        lambda: rig.engine.container_logs(container_id).lines(),
        lambda lines: "stubborn" in lines,
        "the job to ignore SIGTERM",
        timeout_s=30,
    )
    rig.engine.stop_container(container_id, grace_s=1)
    assert rig.engine.wait_container(container_id, timeout_s=30) == 137


def test_kill_exits_137_and_a_second_kill_is_no_error(rig: Rig) -> None:
    container_id = rig.create(SLEEP)
    rig.engine.start_container(container_id)
    rig.engine.kill_container(container_id)
    assert rig.engine.wait_container(container_id, timeout_s=30) == 137
    rig.engine.kill_container(container_id)
    assert rig.engine.inspect_container(container_id).exit_code == 137


def test_remove_running_container_needs_force(rig: Rig) -> None:
    container_id = rig.create(SLEEP)
    rig.engine.start_container(container_id)
    with pytest.raises(Conflict) as caught:
        rig.engine.remove_container(container_id)
    assert caught.value.status_code == 409
    assert rig.engine.inspect_container(container_id).status == "running"
    rig.engine.remove_container(container_id, force=True)
    with pytest.raises(ContainerMissing):
        rig.engine.inspect_container(container_id)


def test_list_containers_by_label_in_every_state(rig: Rig) -> None:
    created = rig.create(DONE)
    exited, _ = rig.run(DONE)
    running = rig.create(SLEEP)
    rig.engine.start_container(running)
    found = {c.id: c.status for c in rig.engine.list_containers(rig.labels)}
    assert found == {created: "created", exited: "exited", running: "running"}
    other = {"snapyard.contract": "not-" + rig.labels["snapyard.contract"]}
    assert rig.engine.list_containers(other) == []


# --- commit ----------------------------------------------------------------------


def test_commit_merges_config_like_docker(rig: Rig) -> None:
    container_id, code = rig.run(DONE)
    assert code == 0
    base = rig.engine.inspect_image(rig.base_id)
    override = ImageConfig(
        env=["SNAPYARD_JOB_ID=", "SNAPYARD_SETUP_SECONDS=", "SNAPYARD_SNAPSHOT_REUSE=true"],
        labels={LABEL_ROLE: "snapshot", "snapyard.key": "k1"},
    )
    image_id = rig.engine.commit_container(container_id, rig.repo, "merge", override)
    info = rig.engine.inspect_image(image_id)
    # The override's entries first, then the container's whose KEY it did not name.
    assert info.env[:3] == tuple(override.env)
    assert not any("job-secret-4711" in entry for entry in info.env)
    assert set(base.env) <= set(info.env)
    assert info.labels[LABEL_ROLE] == "snapshot"
    assert info.labels["snapyard.key"] == "k1"
    assert info.labels["snapyard.contract"] == rig.labels["snapyard.contract"]
    assert info.labels[LABEL_WORKER_DIGEST] == base.labels[LABEL_WORKER_DIGEST]
    # Unnamed, they are the image's own: the engine takes out the env helper it put
    # in (Docker alone would copy the helper's argv, the job's command in it).
    assert info.entrypoint == base.entrypoint
    assert info.cmd == base.cmd
    assert info.tags == (f"{rig.repo}:merge",)
    assert info.layers == base.layers + 1
    assert info.size_bytes >= base.size_bytes


def test_inspect_shows_the_limits_the_container_runs_under(rig: Rig) -> None:
    """``docker inspect``'s HostConfig: what per-agent-type limits are checked by."""
    state = rig.engine.inspect_container(rig.create(DONE))
    assert (state.memory_bytes, state.cpus, state.pids_limit) == (64 * 1024 * 1024, 0.5, 64)


def test_commit_restores_the_images_own_entrypoint_and_cmd(rig: Rig) -> None:
    """What the Spawner's snapshot config relies on: ``entrypoint=()`` means none
    (Docker keeps an empty list), a named CMD replaces the container's, and
    nothing of the helper's argv is left in the image."""
    container_id, code = rig.run(DONE)
    assert code == 0
    base = rig.engine.inspect_image(rig.base_id)
    kept = rig.engine.inspect_image(
        rig.engine.commit_container(
            container_id, rig.repo, "own", ImageConfig(entrypoint=base.entrypoint, cmd=base.cmd)
        )
    )
    assert (kept.entrypoint, kept.cmd) == (base.entrypoint, base.cmd)
    cmd_only = rig.engine.inspect_image(
        rig.engine.commit_container(
            container_id, rig.repo, "cmd-only", ImageConfig(entrypoint=(), cmd=READ)
        )
    )
    assert (tuple(cmd_only.entrypoint or ()), cmd_only.cmd) == ((), READ)


def test_secret_env_reaches_the_worker_but_no_committed_config(rig: Rig) -> None:
    """Docker records a container's config (env included) in every image committed
    from it, as ContainerConfig: a job's secrets must travel outside that config."""
    spec = ContainerSpec(
        image=rig.base,
        command=SHOW_TOKEN,
        env={"SNAPYARD_SETUP_SECONDS": "0"},
        secret_env={"API_TOKEN": TOKEN},
        labels=rig.labels,
    )
    secret_files = _secret_files(rig.engine)
    container_id = rig.engine.create_container(spec)
    if isinstance(rig.engine, MemoryEngine):
        PLAYING[container_id] = rig.engine
    rig.engine.start_container(container_id)
    assert rig.engine.wait_container(container_id, timeout_s=30) == 0
    assert f"token=[{TOKEN}]" in rig.engine.container_logs(container_id).text
    image_id = rig.engine.commit_container(container_id, rig.repo, "secret", ImageConfig())
    info = rig.engine.inspect_image(image_id)
    assert not [e for e in (*info.env, *info.container_env) if TOKEN in e]
    assert "SNAPYARD_SETUP_SECONDS=0" in info.container_env  # the non-secret config is there
    rig.engine.remove_container(container_id)
    assert _secret_files(rig.engine) == secret_files  # the host file goes with the container


# Values users pass as secrets: any Unicode but NUL (the model refuses it), and
# the characters that broke delivery or could (padding '=', quotes, newlines,
# a leading '-', backslashes, '$'), at any length up to the model's limit.
ANY_VALUE = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
TRICKY_VALUE = st.text(st.sampled_from(list("=\"' \n\r\t\\-$`;|éß€😀x")), max_size=16)
LONG_VALUE = st.integers(1, MAX_ENV_VALUE_BYTES).map(lambda n: "ab=\n"[n % 4] * n)
ENV_VALUES = st.lists(st.one_of(ANY_VALUE, TRICKY_VALUE, LONG_VALUE), min_size=1, max_size=6)


def test_any_env_value_reaches_the_job_byte_for_byte(rig: Rig) -> None:
    """Regression: values whose length was not a multiple of 3 lost their tail
    (``hello`` arrived as ``hel``): the entrypoint split each line at every '=',
    dropping the base64 padding. The job prints each value's SHA-256."""
    on_docker = isinstance(rig.engine, DockerEngine)

    @settings(
        max_examples=25 if on_docker else 300,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @example(values=["hello", "hello world", "s3cr3t-0123456789", "x=y=z", "abc", "abcdef"])
    @example(values=["a" * MAX_ENV_VALUE_BYTES, "😀" * (MAX_ENV_VALUE_BYTES // 4), ""])
    @example(values=["\n", "ends with newlines\n\n", "-n", "-e \\n", "a\\", " lead", "trail "])
    @given(values=ENV_VALUES)
    def delivered_exactly(values: list[str]) -> None:
        env = {f"SY_V{index}": value for index, value in enumerate(values)}
        spec = ContainerSpec(
            image=rig.base,
            command=digest_script(list(env)),
            env={"SNAPYARD_SETUP_SECONDS": "0"},
            secret_env=env,
            labels=rig.labels,
        )
        container_id = rig.engine.create_container(spec)
        if isinstance(rig.engine, MemoryEngine):
            PLAYING[container_id] = rig.engine
        try:
            rig.engine.start_container(container_id)
            assert rig.engine.wait_container(container_id, timeout_s=60) == 0
            lines = rig.engine.container_logs(container_id).lines()
        finally:
            rig.engine.remove_container(container_id, force=True)
        got = [line.split()[0] for line in lines if line.endswith("  -")]
        assert got == [hashlib.sha256(v.encode()).hexdigest() for v in env.values()]

    delivered_exactly()


def _secret_files(engine: Engine) -> set[str]:
    if isinstance(engine, DockerEngine) and engine.secrets_dir.exists():
        return {p.name for p in engine.secrets_dir.iterdir()}
    return set()


def test_commit_keeps_the_filesystem_for_the_next_container(rig: Rig) -> None:
    snapshot = rig.snapshot()
    container_id, code = rig.run(READ, image=snapshot)
    assert code == 0
    logs = rig.engine.container_logs(container_id).lines()
    assert "data" in logs
    assert any("setup skipped" in line for line in logs)


def test_commit_of_a_snapshot_adds_one_more_layer(rig: Rig) -> None:
    first = rig.snapshot("first")
    second = rig.snapshot("second", image=first)
    layers = [rig.engine.inspect_image(i).layers for i in (rig.base_id, first, second)]
    assert layers == [layers[0], layers[0] + 1, layers[0] + 2]


def test_a_commit_adds_its_own_bytes_over_its_parent(rig: Rig) -> None:
    """What a snapshot costs on disk is its own layer, not the base's (issue 11, item 3)."""
    first = rig.snapshot("first")
    second = rig.snapshot("second", image=first)
    base, one, two = (rig.engine.inspect_image(i) for i in (rig.base_id, first, second))
    assert (one.parent_id, two.parent_id) == (rig.base_id, first)
    for image, parent in ((one, base), (two, one)):
        assert 0 < image.size_bytes - parent.size_bytes < 1_000_000


# --- flatten ---------------------------------------------------------------------


def flatten_chain(rig: Rig) -> tuple[str, str]:
    """Two snapshots (a file written, then deleted and another written), and their flattening."""
    first = rig.snapshot("first")
    container_id, code = rig.run(REWRITE, image=first)
    assert code == 0
    config = ImageConfig(
        env=["PATH=/usr/local/bin:/bin", "MODE=flat"],
        labels={"snapyard.role": "snapshot", "snapyard.project": "p"},
    )
    deep = rig.engine.commit_container(container_id, rig.repo, "deep", config)
    rig.engine.remove_container(container_id)
    return deep, rig.engine.flatten_image(deep, rig.base_id, rig.repo, "flat")


def test_flatten_keeps_files_deletions_and_config_one_layer_above_the_base(rig: Rig) -> None:
    deep, flat = flatten_chain(rig)
    base, before, after = (rig.engine.inspect_image(i) for i in (rig.base_id, deep, flat))
    assert before.layers == base.layers + 2
    assert after.layers == base.layers + 1
    assert after.id != before.id
    assert f"{rig.repo}:flat" in after.tags
    assert (after.env, after.entrypoint, after.cmd) == (before.env, before.entrypoint, before.cmd)
    assert after.labels == before.labels
    assert "MODE=flat" in after.env
    # A loaded image has no parent; what it adds is its size over the base's.
    assert after.parent_id == ""
    assert 0 < after.size_bytes - base.size_bytes < 1_000_000
    container_id, code = rig.run(SHOW, image=flat)
    assert code == 0
    logs = rig.engine.container_logs(container_id).lines()
    assert logs[-3:] == ["absent", "more", "/workspace"]
    assert any("setup skipped" in line for line in logs)


def test_a_flattened_image_is_a_parent_like_any_other(rig: Rig) -> None:
    _deep, flat = flatten_chain(rig)
    on_top = rig.snapshot("on-top", image=flat)
    info = rig.engine.inspect_image(on_top)
    assert info.parent_id == flat
    assert info.layers == rig.engine.inspect_image(rig.base_id).layers + 2
    again = rig.engine.flatten_image(on_top, rig.base_id, rig.repo, "again")
    assert rig.engine.inspect_image(again).layers == info.layers - 1


def test_flatten_leaves_the_flattened_image_as_it_was(rig: Rig) -> None:
    deep, _flat = flatten_chain(rig)
    container_id, code = rig.run(SHOW, image=deep)
    assert code == 0
    assert rig.engine.container_logs(container_id).lines()[-3:] == ["absent", "more", "/workspace"]


def test_flatten_onto_an_image_it_is_not_built_on_is_refused(rig: Rig) -> None:
    first = rig.snapshot("first")
    with pytest.raises(EngineError, match="cannot flatten"):
        rig.engine.flatten_image(rig.base_id, first, rig.repo, "wrong-way")
    with pytest.raises(EngineError, match="cannot flatten"):
        rig.engine.flatten_image(rig.base_id, rig.base_id, rig.repo, "nothing-above")


def test_flatten_of_a_missing_image_is_image_missing(rig: Rig) -> None:
    with pytest.raises(ImageMissing):
        rig.engine.flatten_image("sha256:" + "0" * 64, rig.base_id, rig.repo, "gone")


# --- image removal ---------------------------------------------------------------


def test_remove_by_tag_untags_while_other_tags_remain(rig: Rig, events: Events) -> None:
    image_id = rig.snapshot("a")
    rig.engine.tag_image(image_id, rig.repo, "b")
    rig.engine.remove_image(f"{rig.repo}:a")
    assert rig.engine.inspect_image(image_id).tags == (f"{rig.repo}:b",)
    rig.engine.remove_image(image_id)
    with pytest.raises(ImageMissing):
        rig.engine.inspect_image(image_id)
    deleted = events.until("image_deleted", image_id)
    assert events.kinds(image_id) == ["image_untagged", "image_untagged", "image_deleted"]
    assert deleted.labels == {}  # the daemon logs it after the config is gone


def test_remove_by_id_with_two_tags_must_be_forced(rig: Rig) -> None:
    image_id = rig.snapshot("a")
    rig.engine.tag_image(image_id, rig.repo, "b")
    with pytest.raises(Conflict, match="must be forced"):
        rig.engine.remove_image(image_id)
    rig.engine.remove_image(image_id, force=True)
    with pytest.raises(ImageMissing):
        rig.engine.inspect_image(image_id)


def test_moving_a_tag_emits_no_untag_for_the_image_that_lost_it(rig: Rig, events: Events) -> None:
    old = rig.snapshot("same")
    new = rig.snapshot("same")
    assert rig.engine.inspect_image(old).tags == ()
    assert rig.engine.inspect_image(new).tags == (f"{rig.repo}:same",)
    rig.engine.remove_image(old)  # events are ordered: this one marks "later"
    events.until("image_deleted", old)
    assert events.kinds(old) == ["image_deleted"]


def test_image_used_by_a_stopped_container_needs_force(rig: Rig) -> None:
    image_id = rig.snapshot()
    container_id, _ = rig.run(DONE, image=image_id)
    with pytest.raises(Conflict, match="must force"):
        rig.engine.remove_image(f"{rig.repo}:one")
    with pytest.raises(Conflict, match="stopped container"):
        rig.engine.remove_image(image_id)
    rig.engine.remove_image(image_id, force=True)
    with pytest.raises(ImageMissing):
        rig.engine.inspect_image(image_id)
    # The container outlives its image and still names it.
    assert rig.engine.inspect_container(container_id).image_id == image_id


def test_commit_onto_a_deleted_image_is_image_missing(rig: Rig) -> None:
    image_id = rig.snapshot()
    container_id, code = rig.run(DONE, image=image_id)
    assert code == 0
    rig.engine.remove_image(image_id, force=True)
    # Docker answers 500 "failed to get digest": permanent, so not EngineUnavailable.
    with pytest.raises(ImageMissing) as caught:
        rig.engine.commit_container(container_id, rig.repo, "orphan", ImageConfig())
    assert caught.value.image == image_id
    with pytest.raises(ImageMissing):
        rig.engine.inspect_image(f"{rig.repo}:orphan")


def test_image_used_by_a_running_container_cannot_be_forced_away(rig: Rig) -> None:
    image_id = rig.snapshot()
    container_id = rig.create(SLEEP, image=image_id)
    rig.engine.start_container(container_id)
    with pytest.raises(Conflict, match="cannot be forced"):
        rig.engine.remove_image(image_id, force=True)
    # By tag, force only takes the tag away; the image stays for its container.
    rig.engine.remove_image(f"{rig.repo}:one", force=True)
    assert rig.engine.inspect_image(image_id).tags == ()


def test_image_with_a_child_untags_by_tag_and_refuses_by_id(rig: Rig, events: Events) -> None:
    parent = rig.snapshot("parent")
    child = rig.snapshot("child", image=parent)
    with pytest.raises(Conflict, match="dependent child images"):
        rig.engine.remove_image(parent, force=True)
    rig.engine.remove_image(f"{rig.repo}:parent")
    assert rig.engine.inspect_image(parent).tags == ()
    # Untagged with a child: an intermediate image, hidden from the listing.
    assert {i.id for i in rig.engine.list_images(rig.labels)} == {child}
    # Deleting the child prunes the parent nobody else holds; the base stays.
    rig.engine.remove_image(child)
    events.until("image_deleted", parent)
    with pytest.raises(ImageMissing):
        rig.engine.inspect_image(parent)
    assert rig.engine.inspect_image(rig.base_id).id == rig.base_id
    assert events.kinds(child)[-1] == "image_deleted"


def test_remove_missing_image_is_image_missing(rig: Rig) -> None:
    with pytest.raises(ImageMissing):
        rig.engine.remove_image(f"{rig.repo}:never")


def test_list_images_by_label(rig: Rig) -> None:
    first = rig.snapshot("a")
    second = rig.snapshot("b")
    found = {i.id: i.tags for i in rig.engine.list_images(rig.labels)}
    assert found == {first: (f"{rig.repo}:a",), second: (f"{rig.repo}:b",)}
    assert rig.engine.list_images({"snapyard.contract": "nothing-has-this"}) == []


def test_inspect_image_by_short_and_bare_id(rig: Rig) -> None:
    bare = rig.base_id.removeprefix("sha256:")
    assert rig.engine.inspect_image(bare).id == rig.base_id
    assert rig.engine.inspect_image(bare[:12]).id == rig.base_id
    with pytest.raises(ImageMissing):
        rig.engine.inspect_image("sha256:" + "0" * 64)


# --- events ----------------------------------------------------------------------


def test_events_report_exit_codes_as_ints_with_labels(rig: Rig, events: Events) -> None:
    container_id, _ = rig.run(EXIT3)
    exited = events.until("container_exited", container_id)
    assert exited.exit_code == 3
    assert exited.labels["snapyard.contract"] == rig.labels["snapyard.contract"]
    assert exited.time > 0


def test_events_since_replays_what_happened(rig: Rig) -> None:
    container_id, _ = rig.run(DONE)
    since = rig.engine.inspect_container(container_id).created_at - 1
    replay = Events(rig.engine, since=since)
    try:
        exited = replay.until("container_exited", container_id)
    finally:
        replay.close()
    assert exited.exit_code == 0
    assert not replay.thread.is_alive()


def test_a_commit_without_entrypoint_or_cmd_takes_the_images_own_not_the_helpers(
    rig: Rig,
) -> None:
    """Found merging issues 11 and 13: Docker fills a commit's unset entrypoint from
    the container's, which under the env helper held the helper and the job's own
    command; a raw engine commit then baked both into the image."""
    base = rig.engine.inspect_image(rig.base)
    container_id, code = rig.run(WRITE)
    assert code == 0
    image_id = rig.engine.commit_container(container_id, rig.repo, "plain", ImageConfig())
    committed = rig.engine.inspect_image(image_id)
    assert committed.entrypoint == base.entrypoint
    assert committed.cmd == base.cmd
    assert not any(
        WRITE[-1] in part for part in (*(committed.entrypoint or ()), *(committed.cmd or ()))
    )
