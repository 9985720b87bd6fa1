"""MemoryEngine: an in-process container engine with Docker's semantics.

Like ``structlog.testing``, this is a first-class test double that ships with
the package: unit tests, property tests and benchmarks drive the actors
against it, and ``tests/contract`` runs one suite against it and against a real
daemon so that the two cannot drift apart.

Where Docker's behaviour is surprising, this engine copies it on purpose, and
the docstrings say which daemon code it follows (Docker 20.10,
``daemon/images/image_delete.go`` and ``daemon/commit.go``):

- ``docker rmi <tag>`` of an image with dependent child images only untags it;
  the image stays, hidden from ``docker images``. By ID it is a conflict that
  cannot be forced.
- ``docker rmi -f <tag>`` of an image a *running* container uses only untags
  it; by ID it is a conflict that cannot be forced.
- Moving a tag to another image (tag or commit) emits no ``untag`` event for
  the image that lost it.
- ``image_deleted`` events carry no labels: the daemon logs them after the
  image config is gone.

Fault injection (``fail_next``, ``before``, ``delay``, ``set_unavailable``) and
the ``calls`` log let tests put a failure exactly between two engine calls,
which is where the races this project exists to survive happen.

The engine is built in layers, one concern per module: ``_memory_faults``
(call log and fault injection), ``_memory_events`` (the event stream),
``_memory_images`` (images, tags and Docker's delete rules), ``_memory_build``
(the Dockerfile interpreter), ``_memory_registry`` (push and pull through a
shared MemoryRegistry); containers live here, on top.
"""

from __future__ import annotations

import secrets
import signal as signals
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from actors.clock import Clock
from actors.engine._memory_logs import MemoryLogStream
from actors.engine._memory_records import (
    COMMIT_OVERHEAD_BYTES,
    DEFAULT_BASE_SIZE,
    HEX,
    MIN_PREFIX,
    MemoryContainer,
    MemoryImage,
    env_key,
    has_labels,
    merge_env,
    normalize_tag,
    short_id,
    signal_number,
)
from actors.engine._memory_registry import MemoryRegistry, RegistryClient
from actors.engine.base import (
    Conflict,
    ContainerMissing,
    ContainerSpec,
    ContainerState,
    EngineUnavailable,
    ImageConfig,
    ImageMissing,
    Logs,
    encode_secret_env,
)
from actors.labels import LABEL_ROLE, ROLE_BASE
from actors.worker_helper import helper_entrypoint, job_argv, unwrapped

__all__ = ["MemoryContainer", "MemoryEngine", "MemoryImage", "MemoryRegistry", "normalize_tag"]


class MemoryEngine(RegistryClient):
    """An ``Engine`` in memory, safe to call from many actor threads.

    ``exit_policy`` decides what a started container does: an int makes it exit
    at once with that code, None keeps it running until ``exit_container``,
    ``stop_container`` or ``kill_container``. ``registry``: the one registry
    its pushes and pulls reach (several engines may share it).
    """

    def __init__(
        self,
        clock: Clock | None = None,
        exit_policy: Callable[[MemoryContainer], int | None] | None = None,
        registry: MemoryRegistry | None = None,
    ) -> None:
        super().__init__(clock)
        self.exit_policy = exit_policy
        self.registry = registry
        self._changed = threading.Condition(self._lock)
        self._containers: dict[str, MemoryContainer] = {}

    # Fault injection (see FaultInjection for the rest)

    def set_unavailable(self, flag: bool) -> None:
        """Like a daemon that went down: every call, open event streams and waits fail."""
        with self._lock:
            self._unavailable = flag
            if flag:
                for stream in self._streams:
                    stream.push(EngineUnavailable(f"{self.describe()}: engine went away"))
                self._streams.clear()
                self._changed.notify_all()

    # Test helpers: seeding images and driving containers

    def add_worker_image(
        self, tag: str = "snapyard-worker:latest", labels: Mapping[str, str] | None = None
    ) -> str:
        """Seed an image shaped like actors/worker's: its entrypoint, cmd, env and workdir.

        Tests, benchmarks and users of this engine then create containers
        whose committed snapshots carry the same config as on Docker.
        """
        return self.add_image(
            tag,
            labels=dict(labels or {LABEL_ROLE: ROLE_BASE}),
            env=("PATH=/usr/local/bin:/bin",),
            cmd=("sh", "-c", "echo job done"),
            entrypoint=("/usr/local/bin/snapyard-worker",),
            working_dir="/workspace",
        )

    def add_image(
        self,
        tag: str,
        labels: Mapping[str, str] | None = None,
        layers: int = 3,
        size_bytes: int = DEFAULT_BASE_SIZE,
        env: Sequence[str] = (),
        cmd: Sequence[str] | None = None,
        entrypoint: Sequence[str] | None = None,
        working_dir: str = "",
        files: Mapping[str, str] | None = None,
    ) -> str:
        """Seed a base image (as if built or loaded) and return its ID."""
        with self._lock:
            image = MemoryImage(
                id=self._new_image_id(),
                tags=[],
                labels=dict(labels or {}),
                layers=layers,
                size_bytes=size_bytes,
                created_at=self.clock.now(),
                env=tuple(env),
                cmd=None if cmd is None else tuple(cmd),
                entrypoint=None if entrypoint is None else tuple(entrypoint),
                working_dir=working_dir,
                files=dict(files or {}),
            )
            self._images[image.id] = image
            self._set_tag(image, normalize_tag(tag))
            return image.id

    def container(self, container_id: str) -> MemoryContainer:
        """The live container record (ID, unique prefix or name)."""
        with self._lock:
            return self._find_container(container_id)

    def image_files(self, image: str) -> dict[str, str]:
        with self._lock:
            return dict(self._find_image(image).files)

    def image_parent(self, image: str) -> str | None:
        with self._lock:
            return self._find_image(image).parent

    def write_file(self, container_id: str, path: str, content: str) -> None:
        with self._lock:
            self._find_container(container_id).files[path] = content

    def append_logs(self, container_id: str, stdout: str = "", stderr: str = "") -> None:
        """Add output as the container would print it: stdout first, then stderr."""
        self.print_output(container_id, ("stdout", stdout), ("stderr", stderr))

    def print_output(self, container_id: str, *chunks: tuple[str, str]) -> None:
        """Add ``(stream, text)`` chunks in the order given, as a worker interleaves them."""
        with self._lock:
            record = self._find_container(container_id)
            for stream, text in chunks:
                record.log.extend((stream, line) for line in text.splitlines(keepends=True))
            self._changed.notify_all()  # wakes followers (follow_logs)

    def ignore_sigterm(self, container_id: str) -> None:
        """Make ``stop_container`` wait out the grace period and SIGKILL (exit 137)."""
        with self._lock:
            self._find_container(container_id).ignores_sigterm = True

    def exit_container(self, container_id: str, exit_code: int, oom: bool = False) -> bool:
        """End a running container as its process would; False if it was not running."""
        with self._lock:
            return self._exit(self._find_container(container_id), exit_code, oom=oom)

    def delete_image_behind_back(self, image: str) -> None:
        """An operator's ``docker rmi -f``: no call recorded, no fault injected."""
        with self._lock:
            self._remove_image(image, force=True)

    # Reading state without recording a call (for test kits and benchmarks)

    @property
    def lock(self) -> threading.RLock:
        """The engine's re-entrant lock. A kit that checks an invariant and then
        calls the engine holds it to make the two one atomic step."""
        return self._lock

    def containers(self) -> list[MemoryContainer]:
        """Every container record not removed, oldest first (live, not copies)."""
        with self._lock:
            return list(self._containers.values())

    # Engine: daemon

    def ping(self) -> None:
        self._enter("ping")

    # Engine: containers

    def create_container(self, spec: ContainerSpec) -> str:
        self._enter("create_container", spec)
        with self._lock:
            image = self._find_image(spec.image)
            if spec.name is not None:
                for other in self._containers.values():
                    if other.name == spec.name:
                        raise Conflict(
                            f'Conflict. The container name "/{spec.name}" is already in use '
                            f'by container "{other.id}". You have to remove (or rename) that '
                            "container to be able to reuse that name.",
                            status_code=409,
                        )
            env_entries = merge_env([f"{k}={v}" for k, v in spec.env.items()], image.env)
            env = {env_key(entry): entry.partition("=")[2] for entry in env_entries}
            command = tuple(spec.command) if spec.command else None
            # The config Docker records: under the env helper, all in the entrypoint.
            config_entrypoint, config_cmd = image.entrypoint, command or image.cmd
            if spec.env_helper:
                argv = job_argv(image.entrypoint, image.cmd, command)
                config_entrypoint, config_cmd = helper_entrypoint(argv), ()
            record = MemoryContainer(
                id=self._new_container_id(),
                spec=spec,
                image_id=image.id,
                labels={**image.labels, **spec.labels},
                env=env,
                cmd=command or image.cmd,
                entrypoint=image.entrypoint,
                config_cmd=config_cmd,
                config_entrypoint=config_entrypoint,
                working_dir=image.working_dir,
                files=dict(image.files),
                created_at=self.clock.now(),
                base_layers=image.layers,
                base_size=image.size_bytes,
                base_files=dict(image.files),
                secret_env_file=encode_secret_env(spec.secret_env),
            )
            self._containers[record.id] = record
            return record.id

    def start_container(self, container_id: str) -> None:
        self._enter("start_container", container_id)
        with self._lock:
            record = self._find_container(container_id)
            if record.status == "running":
                return  # Docker answers 304 Not Modified.
            record.status = "running"
            record.exit_code = None
            record.oom_killed = False
            record.started_at = self.clock.now()
            record.finished_at = None
            self._changed.notify_all()
        # Outside the lock: the policy is test code and may call the engine back.
        code = self.exit_policy(record) if self.exit_policy is not None else None
        if code is not None:
            with self._lock:
                self._exit(record, code)

    def inspect_container(self, container_id: str) -> ContainerState:
        self._enter("inspect_container", container_id)
        with self._lock:
            return self._find_container(container_id).state()

    def wait_container(self, container_id: str, timeout_s: float | None = None) -> int:
        self._enter("wait_container", container_id, timeout_s)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._changed:
            record = self._find_container(container_id)
            # Like Docker's default "not-running" condition: a created container returns 0.
            while record.status == "running":
                if self._unavailable:
                    raise EngineUnavailable(f"{self.describe()}: engine went away during wait")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise EngineUnavailable(
                        f"timed out after {timeout_s}s waiting for container {short_id(record.id)}"
                    )
                self._changed.wait(remaining)
            return record.exit_code or 0

    def stop_container(self, container_id: str, grace_s: float) -> None:
        self._enter("stop_container", container_id, grace_s)
        with self._lock:
            record = self._find_container(container_id)
            if record.status != "running":
                return
            if not record.ignores_sigterm:
                self._exit(record, 128 + signals.SIGTERM)
                return
        self.clock.sleep(grace_s)
        with self._lock:
            self._exit(record, 128 + signals.SIGKILL)

    def kill_container(self, container_id: str, signal: str = "SIGKILL") -> None:
        self._enter("kill_container", container_id, signal)
        number = signal_number(signal)
        with self._lock:
            record = self._find_container(container_id)
            if record.status != "running":
                return
            if number == signals.SIGTERM and record.ignores_sigterm:
                return
            self._exit(record, 128 + number)

    def remove_container(self, container_id: str, force: bool = False) -> None:
        self._enter("remove_container", container_id, force)
        with self._lock:
            record = self._find_container(container_id)
            if record.status == "running":
                if not force:
                    raise Conflict(
                        f"You cannot remove a running container {record.id}. Stop the "
                        "container before attempting removal or force remove",
                        status_code=409,
                    )
                self._exit(record, 128 + signals.SIGKILL)
            self._forget(record)

    def container_logs(self, container_id: str, tail: int = 200) -> Logs:
        self._enter("container_logs", container_id, tail)
        with self._lock:
            record = self._find_container(container_id)
            # Docker tails the combined log, in the order it was written.
            lines = record.log[-tail:] if tail > 0 else []
            return Logs(text="".join(line for _stream, line in lines))

    def follow_logs(self, container_id: str) -> MemoryLogStream:
        self._enter("follow_logs", container_id)
        with self._lock:
            return MemoryLogStream(self._find_container(container_id), self._changed)

    def list_containers(self, labels: Mapping[str, str]) -> list[ContainerState]:
        self._enter("list_containers", dict(labels))
        with self._lock:
            found = [
                record.state()
                for record in self._containers.values()
                if has_labels(record.labels, labels)
            ]
        return found[::-1]  # Newest first, as Docker lists them.

    def commit_container(
        self,
        container_id: str,
        repository: str,
        tag: str,
        config: ImageConfig,
    ) -> str:
        """Docker's commit: ``config`` is merged with the container's, as daemon/commit.go does."""
        self._enter("commit_container", container_id, repository, tag, config)
        with self._lock:
            record = self._find_container(container_id)
            if record.image_id not in self._images:
                # Docker cannot commit onto a deleted image (a 500 "failed to get
                # digest", which DockerEngine reports as ImageMissing too).
                raise ImageMissing(
                    record.image_id, f"failed to get digest {record.image_id}: image deleted"
                )
            image = self._images[record.image_id]
            config = unwrapped(config, record.config_entrypoint, image.entrypoint, image.cmd)
            entrypoint = None if config.entrypoint is None else tuple(config.entrypoint)
            cmd = None if config.cmd is None else tuple(config.cmd)
            # Merged with the config the container was created with, the helper's
            # entrypoint included: daemon/commit.go merge().
            if not entrypoint:
                if not cmd:
                    cmd = record.config_cmd
                if config.entrypoint is None:
                    entrypoint = record.config_entrypoint
            labels = dict(config.labels)
            for key, value in record.labels.items():
                labels.setdefault(key, value)
            written = sum(
                len(content.encode())
                for path, content in record.files.items()
                if record.base_files.get(path) != content
            )
            image = MemoryImage(
                id=self._new_image_id(),
                tags=[],
                labels=labels,
                layers=record.base_layers + 1,
                size_bytes=record.base_size + COMMIT_OVERHEAD_BYTES + written,
                created_at=self.clock.now(),
                env=tuple(merge_env(list(config.env), record.env_list())),
                cmd=cmd,
                entrypoint=entrypoint,
                working_dir=config.working_dir or record.working_dir,
                files=dict(record.files),
                parent=record.image_id,
                # Docker records the committed container's own config too.
                container_env=tuple(record.env_list()),
            )
            self._images[image.id] = image
            self._set_tag(image, normalize_tag(f"{repository}:{tag}"))
            return image.id

    # Internals (the caller holds the lock)

    def _new_container_id(self) -> str:
        return secrets.token_hex(32)

    def _find_container(self, ref: str) -> MemoryContainer:
        record = self._containers.get(ref)
        if record is not None:
            return record
        name = ref.removeprefix("/")
        for candidate in self._containers.values():
            if candidate.name == name:
                return candidate
        if HEX.match(ref) and len(ref) >= MIN_PREFIX:
            matches = [c for c in self._containers.values() if c.id.startswith(ref)]
            if len(matches) == 1:
                return matches[0]
        raise ContainerMissing(ref)

    def _exit(self, record: MemoryContainer, exit_code: int, oom: bool = False) -> bool:
        if record.status != "running":
            return False
        record.status = "exited"
        record.exit_code = exit_code
        record.oom_killed = oom
        record.finished_at = self.clock.now()
        if oom:
            self._emit("container_oom", record.id, labels=record.labels)
        self._emit("container_exited", record.id, exit_code=exit_code, labels=record.labels)
        self._changed.notify_all()
        if record.spec.auto_remove:
            self._forget(record)
        return True

    def _forget(self, record: MemoryContainer) -> None:
        record.removed = True
        self._containers.pop(record.id, None)
        self._changed.notify_all()
