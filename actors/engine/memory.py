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
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import queue
import re
import secrets
import shlex
import signal as signals
import tarfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from actors.clock import Clock, SystemClock
from actors.engine.base import (
    Conflict,
    ContainerMissing,
    ContainerSpec,
    ContainerState,
    ContainerStatus,
    Engine,
    EngineError,
    EngineEvent,
    EngineUnavailable,
    EventKind,
    ImageConfig,
    ImageInfo,
    ImageMissing,
    Logs,
    decode_secret_env,
    encode_secret_env,
)

__all__ = ["MemoryContainer", "MemoryEngine", "MemoryImage", "normalize_tag"]

_HEX = re.compile(r"^[0-9a-f]+$")
# Docker only accepts unique ID prefixes; we also demand 12 hex digits so that
# code which works here never relies on a prefix Docker could find ambiguous.
_MIN_PREFIX = 12
# The daemon keeps only this many events for ``since`` replays (events.go).
_EVENT_BACKLOG = 256
_DEFAULT_BASE_SIZE = 5_000_000
# What a commit adds on top of the files written: a layer is never free.
_COMMIT_OVERHEAD_BYTES = 4096
# ``describe`` never talks to the engine, so there is nothing to inject into it.
_ENGINE_METHODS = frozenset(
    name
    for name in dir(Engine)
    if not name.startswith("_") and callable(getattr(Engine, name)) and name != "describe"
)


def normalize_tag(ref: str) -> str:
    """``repo`` -> ``repo:latest``; a registry port (``host:5000/repo``) is not a tag."""
    last = ref.rsplit("/", 1)[-1]
    return ref if ":" in last else f"{ref}:latest"


def _short(object_id: str) -> str:
    """Docker's ``stringid.TruncateID``: drop the algorithm, keep 12 characters."""
    return object_id.split(":", 1)[-1][:12]


def _env_key(entry: str) -> str:
    return entry.split("=", 1)[0]


def _merge_env(user: Sequence[str], defaults: Sequence[str]) -> list[str]:
    """Docker's env merge: the user's entries, then defaults whose KEY the user did not name."""
    if not user:
        return list(defaults)
    named = {_env_key(entry) for entry in user}
    return [*user, *(entry for entry in defaults if _env_key(entry) not in named)]


@dataclass
class MemoryImage:
    id: str
    tags: list[str]
    labels: dict[str, str]
    layers: int
    size_bytes: int
    created_at: float
    env: tuple[str, ...] = ()
    cmd: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    working_dir: str = ""
    files: dict[str, str] = field(default_factory=dict)
    parent: str | None = None
    container_env: tuple[str, ...] = ()
    # A flattened image has no parent (as a loaded one on Docker) but sits on this base.
    flattened_onto: str | None = None

    def info(self) -> ImageInfo:
        return ImageInfo(
            id=self.id,
            tags=tuple(self.tags),
            labels=dict(self.labels),
            size_bytes=self.size_bytes,
            layers=self.layers,
            created_at=self.created_at,
            env=self.env,
            cmd=self.cmd,
            entrypoint=self.entrypoint,
            container_env=self.container_env,
            parent_id=self.parent or "",
        )


@dataclass
class MemoryContainer:
    """One container. ``files`` is its filesystem: copied from the image, committed back."""

    id: str
    spec: ContainerSpec
    image_id: str
    labels: dict[str, str]
    # The container's config env (what a commit records); secrets are apart.
    env: dict[str, str]
    cmd: tuple[str, ...] | None
    entrypoint: tuple[str, ...] | None
    working_dir: str
    files: dict[str, str]
    created_at: float
    # What the image held at create, so a commit can tell what the container wrote.
    base_layers: int
    base_size: int
    base_files: dict[str, str]
    status: ContainerStatus = "created"
    exit_code: int | None = None
    oom_killed: bool = False
    started_at: float | None = None
    finished_at: float | None = None
    ignores_sigterm: bool = False
    removed: bool = False
    log: list[tuple[str, str]] = field(default_factory=list)
    # The secret env file as the worker's bind mount holds it (never in ``files``,
    # so a commit cannot capture it), read back as the entrypoint reads it.
    secret_env_file: bytes = field(default=b"", repr=False)

    @property
    def name(self) -> str | None:
        return self.spec.name

    def env_list(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.env.items()]

    @property
    def process_env(self) -> dict[str, str]:
        """What the worker process sees: the config env plus the secret file's."""
        return {**self.env, **decode_secret_env(self.secret_env_file)}

    def state(self) -> ContainerState:
        return ContainerState(
            id=self.id,
            status=self.status,
            image_id=self.image_id,
            labels=dict(self.labels),
            exit_code=self.exit_code,
            oom_killed=self.oom_killed,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
        )


class _Closed:
    """Sentinel that ends an event stream's iteration."""


class _MemoryEventStream:
    def __init__(self, engine: MemoryEngine, backlog: Sequence[EngineEvent]) -> None:
        self._engine = engine
        self._queue: queue.SimpleQueue[EngineEvent | EngineUnavailable | _Closed] = (
            queue.SimpleQueue()
        )
        for event in backlog:
            self._queue.put(event)

    def push(self, item: EngineEvent | EngineUnavailable) -> None:
        self._queue.put(item)

    def __iter__(self) -> Iterator[EngineEvent]:
        while True:
            item = self._queue.get()
            if isinstance(item, _Closed):
                return
            if isinstance(item, EngineUnavailable):
                raise item
            yield item

    def close(self) -> None:
        self._engine._unsubscribe(self)
        self._queue.put(_Closed())


class _DeleteConflict(Conflict):
    """Docker's ``imageDeleteConflict``: ``hard`` ones cannot be forced."""

    def __init__(self, image_id: str, message: str, *, hard: bool, used: bool) -> None:
        self.hard = hard
        self.used = used
        how = "cannot be forced" if hard else "must be forced"
        super().__init__(f"conflict: unable to delete {_short(image_id)} ({how}) - {message}")


# Docker's conflict classes (image_delete.go): hard ones are never forced.
_CHILD, _RUNNING, _REFERENCE, _STOPPED = 1, 2, 4, 8
_HARD = _CHILD | _RUNNING
_SOFT = _REFERENCE | _STOPPED


class MemoryEngine:
    """An ``Engine`` in memory, safe to call from many actor threads.

    ``exit_policy`` decides what a started container does: an int makes it exit
    at once with that code, None keeps it running until ``exit_container``,
    ``stop_container`` or ``kill_container``.
    """

    def __init__(
        self,
        clock: Clock | None = None,
        exit_policy: Callable[[MemoryContainer], int | None] | None = None,
    ) -> None:
        self.clock: Clock = clock or SystemClock()
        self.exit_policy = exit_policy
        self.calls: list[tuple[str, tuple[object, ...]]] = []
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._images: dict[str, MemoryImage] = {}
        self._tags: dict[str, str] = {}
        self._containers: dict[str, MemoryContainer] = {}
        self._history: deque[EngineEvent] = deque(maxlen=_EVENT_BACKLOG)
        self._streams: list[_MemoryEventStream] = []
        self._failures: dict[str, deque[EngineError]] = {}
        self._hooks: dict[str, list[tuple[Callable[[], None], bool]]] = {}
        self._delays: dict[str, float] = {}
        self._unavailable = False

    # Fault injection

    def fail_next(self, method: str, times: int = 1, error: EngineError | None = None) -> None:
        """Make the next ``times`` calls of ``method`` raise ``error``."""
        self._check_method(method)
        error = error or EngineUnavailable("injected: engine unavailable")
        with self._lock:
            pending = self._failures.setdefault(method, deque())
            pending.extend(copy.copy(error) for _ in range(times))

    def before(self, method: str, hook: Callable[[], None], once: bool = True) -> None:
        """Run ``hook`` right before ``method`` executes, outside the engine lock.

        The hook may call the engine (``delete_image_behind_back`` is the usual
        one), which is how a test deletes an image between two steps of a spawn.
        """
        self._check_method(method)
        with self._lock:
            self._hooks.setdefault(method, []).append((hook, once))

    def delay(self, method: str, seconds: float) -> None:
        """``clock.sleep(seconds)`` before every call of ``method``; 0 removes the delay."""
        self._check_method(method)
        with self._lock:
            if seconds > 0:
                self._delays[method] = seconds
            else:
                self._delays.pop(method, None)

    def set_unavailable(self, flag: bool) -> None:
        """Like a daemon that went down: every call, open event streams and waits fail."""
        with self._lock:
            self._unavailable = flag
            if flag:
                for stream in self._streams:
                    stream.push(EngineUnavailable(f"{self.describe()}: engine went away"))
                self._streams.clear()
                self._changed.notify_all()

    def calls_of(self, method: str) -> list[tuple[object, ...]]:
        """The arguments of every recorded call of ``method``."""
        with self._lock:
            return [args for name, args in self.calls if name == method]

    def _check_method(self, method: str) -> None:
        if method not in _ENGINE_METHODS:
            raise ValueError(
                f"{method!r} is not an Engine method; one of: {', '.join(sorted(_ENGINE_METHODS))}"
            )

    def _enter(self, method: str, *args: object) -> None:
        """Record the call, then apply the faults injected for it, in call order."""
        with self._lock:
            self.calls.append((method, args))
            hooks = self._hooks.get(method, [])
            due = [hook for hook, _ in hooks]
            self._hooks[method] = [(hook, once) for hook, once in hooks if not once]
            pause = self._delays.get(method, 0.0)
        if pause:
            self.clock.sleep(pause)
        for hook in due:
            hook()
        with self._lock:
            if self._unavailable:
                raise EngineUnavailable(f"{self.describe()}: engine unavailable (injected)")
            pending = self._failures.get(method)
            if pending:
                raise pending.popleft()

    # Test helpers: seeding images and driving containers

    def add_worker_image(
        self, tag: str = "snapyard-worker:latest", labels: Mapping[str, str] | None = None
    ) -> str:
        """Seed an image shaped like config/worker's: its entrypoint, cmd, env and workdir.

        Tests, benchmarks and users of this engine then create containers
        whose committed snapshots carry the same config as on Docker.
        """
        return self.add_image(
            tag,
            labels=dict(labels or {"snapyard.role": "base"}),
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
        size_bytes: int = _DEFAULT_BASE_SIZE,
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

    # Engine: daemon

    def ping(self) -> None:
        self._enter("ping")

    def describe(self) -> str:
        return "memory://"

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
            env_entries = _merge_env([f"{k}={v}" for k, v in spec.env.items()], image.env)
            env = {_env_key(entry): entry.partition("=")[2] for entry in env_entries}
            command = tuple(spec.command) if spec.command else None
            record = MemoryContainer(
                id=self._new_container_id(),
                spec=spec,
                image_id=image.id,
                labels={**image.labels, **spec.labels},
                env=env,
                cmd=command or image.cmd,
                entrypoint=image.entrypoint,
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
                        f"timed out after {timeout_s}s waiting for container {_short(record.id)}"
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
        number = _signal_number(signal)
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

    def list_containers(self, labels: Mapping[str, str]) -> list[ContainerState]:
        self._enter("list_containers", dict(labels))
        with self._lock:
            found = [
                record.state()
                for record in self._containers.values()
                if _has_labels(record.labels, labels)
            ]
        return found[::-1]  # Newest first, as Docker lists them.

    # Engine: images

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
            entrypoint = None if config.entrypoint is None else tuple(config.entrypoint)
            cmd = None if config.cmd is None else tuple(config.cmd)
            if not entrypoint:
                if not cmd:
                    cmd = record.cmd
                if config.entrypoint is None:
                    entrypoint = record.entrypoint
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
                size_bytes=record.base_size + _COMMIT_OVERHEAD_BYTES + written,
                created_at=self.clock.now(),
                env=tuple(_merge_env(list(config.env), record.env_list())),
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

    def flatten_image(self, image: str, base: str, repository: str, tag: str) -> str:
        """Docker's save, squash and load: the same files and config, ``base``'s depth + 1.

        As on Docker the result has no parent (a loaded image), its ID depends
        only on what it holds (flattening twice gives one image), and the
        image flattened is left as it was.
        """
        self._enter("flatten_image", image, base, repository, tag)
        with self._lock:
            source = self._find_image(image)
            under = self._find_image(base)
            if source.id == under.id or not self._built_on(source, under.id):
                raise EngineError(
                    f"cannot flatten {image} onto {base}: the image is not built on the given "
                    "base, or has no layer above it"
                )
            flat_id = "sha256:" + hashlib.sha256(f"{source.id} on {under.id}".encode()).hexdigest()
            flat = self._images.get(flat_id)
            if flat is None:
                written = sum(
                    len(content.encode())
                    for path, content in source.files.items()
                    if under.files.get(path) != content
                )
                flat = MemoryImage(
                    id=flat_id,
                    tags=[],
                    labels=dict(source.labels),
                    layers=under.layers + 1,
                    size_bytes=under.size_bytes + _COMMIT_OVERHEAD_BYTES + written,
                    created_at=source.created_at,
                    env=source.env,
                    cmd=source.cmd,
                    entrypoint=source.entrypoint,
                    working_dir=source.working_dir,
                    files=dict(source.files),
                    container_env=source.container_env,
                    flattened_onto=under.id,
                )
                self._images[flat.id] = flat
            self._set_tag(flat, normalize_tag(f"{repository}:{tag}"))
            return flat.id

    def _built_on(self, image: MemoryImage, base_id: str) -> bool:
        node: MemoryImage | None = image
        while node is not None:
            if base_id in (node.id, node.flattened_onto):
                return True
            node = self._images.get(node.parent) if node.parent else None
        return False

    def inspect_image(self, image: str) -> ImageInfo:
        self._enter("inspect_image", image)
        with self._lock:
            return self._find_image(image).info()

    def list_images(self, labels: Mapping[str, str]) -> list[ImageInfo]:
        """Like ``docker images`` (all=False): untagged parents of other images are hidden."""
        self._enter("list_images", dict(labels))
        with self._lock:
            shown = [
                image
                for image in self._images.values()
                if _has_labels(image.labels, labels)
                and (image.tags or not self._children(image.id))
            ]
            return [image.info() for image in reversed(shown)]

    def remove_image(self, image: str, force: bool = False) -> None:
        self._enter("remove_image", image, force)
        with self._lock:
            self._remove_image(image, force)

    def tag_image(self, image: str, repository: str, tag: str) -> None:
        self._enter("tag_image", image, repository, tag)
        with self._lock:
            self._set_tag(self._find_image(image), normalize_tag(f"{repository}:{tag}"))

    def build_image(self, context: bytes, tag: str, labels: Mapping[str, str]) -> str:
        """A Dockerfile interpreter good enough for layers, config, labels and COPY'd text."""
        self._enter("build_image", len(context), tag, dict(labels))
        with self._lock:
            image = _build(self, context, labels)
            self._images[image.id] = image
            self._set_tag(image, normalize_tag(tag))
            return image.id

    # Engine: events

    def events(self, since: float | None = None) -> _MemoryEventStream:
        self._enter("events", since)
        with self._lock:
            backlog = [] if since is None else [e for e in self._history if e.time >= since]
            stream = _MemoryEventStream(self, backlog)
            self._streams.append(stream)
            return stream

    # Internals (the caller holds the lock)

    def _unsubscribe(self, stream: _MemoryEventStream) -> None:
        with self._lock:
            if stream in self._streams:
                self._streams.remove(stream)

    def _emit(
        self,
        kind: EventKind,
        object_id: str,
        exit_code: int | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        event = EngineEvent(
            kind=kind,
            id=object_id,
            time=self.clock.now(),
            exit_code=exit_code,
            labels=dict(labels or {}),
        )
        self._history.append(event)
        for stream in self._streams:
            stream.push(event)

    def _new_image_id(self) -> str:
        return "sha256:" + hashlib.sha256(secrets.token_bytes(32)).hexdigest()

    def _new_container_id(self) -> str:
        return secrets.token_hex(32)

    def _find_image(self, ref: str) -> MemoryImage:
        """Docker's ``GetImage``: a full ID, then a tag, then a unique ID prefix."""
        bare = ref.removeprefix("sha256:")
        if _HEX.match(bare) and len(bare) == 64:
            image = self._images.get("sha256:" + bare)
            if image is None:
                raise ImageMissing(ref)
            return image
        image_id = self._tags.get(normalize_tag(ref))
        if image_id is not None:
            return self._images[image_id]
        if _HEX.match(bare) and len(bare) >= _MIN_PREFIX:
            matches = [i for i in self._images.values() if i.id[7:].startswith(bare)]
            if len(matches) == 1:
                return matches[0]
        raise ImageMissing(ref)

    def _find_container(self, ref: str) -> MemoryContainer:
        record = self._containers.get(ref)
        if record is not None:
            return record
        name = ref.removeprefix("/")
        for candidate in self._containers.values():
            if candidate.name == name:
                return candidate
        if _HEX.match(ref) and len(ref) >= _MIN_PREFIX:
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

    def _children(self, image_id: str) -> list[MemoryImage]:
        return [image for image in self._images.values() if image.parent == image_id]

    def _set_tag(self, image: MemoryImage, tag: str) -> None:
        # Docker moves a tag silently: the image that loses it gets no "untag" event.
        previous = self._tags.get(tag)
        if previous is not None and previous != image.id and previous in self._images:
            self._images[previous].tags.remove(tag)
        self._tags[tag] = image.id
        if tag not in image.tags:
            image.tags.append(tag)

    def _untag(self, image: MemoryImage, tag: str) -> None:
        image.tags.remove(tag)
        del self._tags[tag]
        self._emit("image_untagged", image.id, labels=image.labels)

    def _remove_image(self, ref: str, force: bool) -> None:
        """Docker's ``ImageDelete`` with prune on, step for step."""
        image = self._find_image(ref)
        bare = ref.removeprefix("sha256:")
        by_id = image.id.startswith(ref) or image.id[7:].startswith(bare)
        quiet = False
        if not by_id:
            tag = normalize_tag(ref)
            if not force and len(image.tags) == 1:
                user = next((c for c in self._containers.values() if c.image_id == image.id), None)
                if user is not None:
                    raise Conflict(
                        f'conflict: unable to remove repository reference "{ref}" (must force)'
                        f" - container {_short(user.id)} is using its referenced image "
                        f"{_short(image.id)}",
                        status_code=409,
                    )
            self._untag(image, tag)
            if image.tags:
                return
            quiet = True
        elif len(image.tags) == 1:
            mask = _HARD if force else _HARD | _STOPPED
            conflict = self._delete_conflict(image, mask)
            if conflict is not None:
                raise conflict
            self._untag(image, image.tags[0])
        self._delete(image, force=force, quiet=quiet)

    def _delete(self, image: MemoryImage, force: bool, quiet: bool) -> None:
        conflict = self._delete_conflict(image, _HARD if force else _HARD | _SOFT)
        if conflict is not None:
            dangling = not image.tags and not self._children(image.id)
            if quiet and (not dangling or conflict.used):
                return
            raise conflict
        for tag in list(image.tags):
            self._untag(image, tag)
        del self._images[image.id]
        self._emit("image_deleted", image.id)
        parent = self._images.get(image.parent) if image.parent else None
        if parent is not None:
            # Prune the parent only if nothing else holds it; never forced, never loud.
            self._delete(parent, force=False, quiet=True)

    def _delete_conflict(self, image: MemoryImage, mask: int) -> _DeleteConflict | None:
        if mask & _CHILD and self._children(image.id):
            return _DeleteConflict(
                image.id, "image has dependent child images", hard=True, used=False
            )
        users = [c for c in self._containers.values() if c.image_id == image.id]
        running = next((c for c in users if c.status == "running"), None)
        if mask & _RUNNING and running is not None:
            return _DeleteConflict(
                image.id,
                f"image is being used by running container {_short(running.id)}",
                hard=True,
                used=True,
            )
        if mask & _REFERENCE and image.tags:
            return _DeleteConflict(
                image.id, "image is referenced in multiple repositories", hard=False, used=False
            )
        stopped = next((c for c in users if c.status != "running"), None)
        if mask & _STOPPED and stopped is not None:
            return _DeleteConflict(
                image.id,
                f"image is being used by stopped container {_short(stopped.id)}",
                hard=False,
                used=True,
            )
        return None


def _has_labels(have: Mapping[str, str], want: Mapping[str, str]) -> bool:
    return all(have.get(key) == value for key, value in want.items())


def _signal_number(name: str) -> int:
    text = name.upper()
    if text.isdigit():
        return int(text)
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return int(signals.Signals[text])
    except KeyError:
        raise EngineError(f"Invalid signal: {name}", status_code=400) from None


def _dockerfile_lines(text: str) -> Iterator[tuple[str, str]]:
    joined = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            joined += line[:-1] + " "
            continue
        joined += line
        instruction, _, rest = joined.partition(" ")
        yield instruction.upper(), rest.strip()
        joined = ""


def _exec_form(rest: str) -> tuple[str, ...]:
    if rest.startswith("["):
        return tuple(json.loads(rest))
    return ("/bin/sh", "-c", rest)


def _key_values(rest: str) -> list[tuple[str, str]]:
    if "=" not in rest.split(" ", 1)[0]:
        key, _, value = rest.partition(" ")
        return [(key, value.strip())]
    return [(k, v) for k, _, v in (part.partition("=") for part in shlex.split(rest))]


def _build(engine: MemoryEngine, context: bytes, labels: Mapping[str, str]) -> MemoryImage:
    """Interpret the Dockerfile of a tar context the way the classic builder layers it."""
    try:
        with tarfile.open(fileobj=io.BytesIO(context)) as tar:
            members = {
                m.name.removeprefix("./"): tar.extractfile(m)
                for m in tar.getmembers()
                if m.isfile()
            }
            blobs = {name: f.read() for name, f in members.items() if f is not None}
    except tarfile.TarError as exc:
        raise EngineError(f"build context is not a tar archive: {exc}") from None
    if "Dockerfile" not in blobs:
        raise EngineError("Cannot locate specified Dockerfile: Dockerfile", status_code=500)
    image = MemoryImage(
        id=engine._new_image_id(),
        tags=[],
        labels={},
        layers=0,
        size_bytes=0,
        created_at=engine.clock.now(),
    )
    ran: list[str] = []
    for instruction, rest in _dockerfile_lines(blobs["Dockerfile"].decode()):
        if instruction == "FROM" and rest != "scratch":
            base = engine._find_image(rest)
            image.parent = base.id
            image.layers, image.size_bytes = base.layers, base.size_bytes
            image.labels, image.env = dict(base.labels), base.env
            image.cmd, image.entrypoint = base.cmd, base.entrypoint
            image.working_dir, image.files = base.working_dir, dict(base.files)
        elif instruction in {"COPY", "ADD"}:
            *sources, dest = _exec_form(rest) if rest.startswith("[") else rest.split()
            for source in sources:
                if source not in blobs:
                    raise EngineError(f"COPY failed: file not found in build context: {source}")
                blob = blobs[source]
                image.size_bytes += len(blob)
                target = dest.rstrip("/") + "/" + source if dest.endswith("/") else dest
                # Binaries (busybox) count for size only.
                with contextlib.suppress(UnicodeDecodeError):
                    image.files[target] = blob.decode()
            image.layers += 1
        elif instruction == "RUN":
            image.layers += 1
            ran.append(rest)
        elif instruction == "WORKDIR":
            # The classic builder commits a layer only when WORKDIR has to create
            # the directory; RUN's effects are invisible here, so read its text.
            if not any(rest in command for command in ran) and not any(
                path.startswith(rest.rstrip("/") + "/") for path in image.files
            ):
                image.layers += 1
            image.working_dir = rest
        elif instruction == "ENV":
            image.env = tuple(_merge_env([f"{k}={v}" for k, v in _key_values(rest)], image.env))
        elif instruction == "LABEL":
            image.labels.update(_key_values(rest))
        elif instruction == "CMD":
            image.cmd = _exec_form(rest)
        elif instruction == "ENTRYPOINT":
            image.entrypoint = _exec_form(rest)
    image.labels.update(labels)
    return image
