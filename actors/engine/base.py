"""The engine boundary: what Snapyard needs from a container engine.

Everything above this package speaks in these types and errors only, so the
actors never learn whether Docker or the in-memory engine is underneath. The
errors are few and each one tells the caller what to do next: retry
(`EngineUnavailable`), fall back (`ImageMissing` on a snapshot), or give up
with a message a person can act on.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

__all__ = [
    "Conflict",
    "ContainerMissing",
    "ContainerSpec",
    "ContainerState",
    "ContainerStatus",
    "Engine",
    "EngineError",
    "EngineEvent",
    "EngineUnavailable",
    "EventKind",
    "EventStream",
    "ImageConfig",
    "ImageInfo",
    "ImageMissing",
    "LogStream",
    "Logs",
    "RegistryUnavailable",
    "decode_secret_env",
    "encode_secret_env",
]


def encode_secret_env(env: Mapping[str, str]) -> bytes:
    """The secret env file: one ``NAME=<base64 of the UTF-8 value>`` a line.

    Base64 keeps newlines, quotes and ``=`` in a value from ever being read as
    syntax. Its padding ends in ``=`` too, so a reader must split each line at
    the FIRST ``=`` only (``IFS='=' read`` drops the padding and truncates).
    """
    return b"".join(
        name.encode("ascii") + b"=" + base64.b64encode(value.encode("utf-8")) + b"\n"
        for name, value in env.items()
    )


def decode_secret_env(data: bytes) -> dict[str, str]:
    """What the env helper makes of the file: the reference reader.

    ``actors/helper/snapyard-init`` must agree with this byte for byte; the
    engine contract suite checks both against any value hypothesis can draw.
    """
    env: dict[str, str] = {}
    for line in data.split(b"\n"):
        name, sep, encoded = line.partition(b"=")
        if not name or not sep:
            continue
        try:
            env[name.decode("ascii")] = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise ValueError(f"the secret env line of {name!r} is not valid base64") from exc
    return env


class EngineError(Exception):
    """An engine call failed in a way that retrying will not fix."""

    status_code: int | None = None

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code


class ImageMissing(EngineError):
    """Docker's 404 "No such image": the image ID or tag does not exist (any more)."""

    status_code = 404

    def __init__(self, image: str, message: str | None = None) -> None:
        self.image = image
        super().__init__(message or f"No such image: {image}")


class ContainerMissing(EngineError):
    """Docker's 404 "No such container"."""

    status_code = 404

    def __init__(self, container: str, message: str | None = None) -> None:
        self.container = container
        super().__init__(message or f"No such container: {container}")


class Conflict(EngineError):
    """Docker's 409: e.g. removing an image that a container still uses."""

    status_code = 409


class EngineUnavailable(EngineError):
    """Daemon down, connection refused, a 5xx or a timeout: worth retrying later."""


class RegistryUnavailable(EngineUnavailable):
    """The registry of a push or pull does not answer (the engine itself does).

    Worth retrying later like any EngineUnavailable, but the engine is fine:
    a caller that falls back (start from base) need not back off its spawns.
    """

    def __init__(self, registry: str, detail: str) -> None:
        self.registry = registry
        self.detail = detail
        super().__init__(
            f"the registry at {registry} does not answer ({detail}); start it, "
            "or check [cluster] registry"
        )

    def __reduce__(self) -> tuple[type[RegistryUnavailable], tuple[str, str]]:
        # copy and pickle rebuild it from these, not from the formatted message.
        return type(self), (self.registry, self.detail)


ContainerStatus = Literal[
    "created", "running", "paused", "restarting", "removing", "exited", "dead"
]


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to create one worker container.

    ``image`` should be an image ID for snapshots (immutable), a tag only for
    the base image. ``memory_bytes`` sets memory and memory+swap alike: no swap.
    ``command`` replaces the image's CMD and keeps its ENTRYPOINT, as in Docker.
    """

    image: str
    command: Sequence[str] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    # Env the worker sees but the container's config never holds: Docker writes
    # a container's config, env included, into every image committed from it
    # (ContainerConfig). Delivered as a read-only file at labels.SECRET_ENV_PATH that
    # the env helper exports (actors/worker_helper.py, actors/helper/snapyard-init).
    secret_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    labels: Mapping[str, str] = field(default_factory=dict)
    memory_bytes: int | None = None
    pids_limit: int | None = None
    # CPUs the container may use (Docker's NanoCPUs / --cpus); None: no limit.
    cpus: float | None = None
    # Run the image's entrypoint and command under the env helper, so any image
    # gets ``secret_env`` unchanged. False: the image's own entrypoint, as is.
    env_helper: bool = True
    network: str = "none"
    init: bool = True
    auto_remove: bool = False
    cap_drop_all: bool = True
    no_new_privileges: bool = True
    name: str | None = None


@dataclass(frozen=True)
class ContainerState:
    id: str
    status: ContainerStatus
    image_id: str
    labels: Mapping[str, str]
    exit_code: int | None
    oom_killed: bool
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    # The limits the engine applied (docker inspect's HostConfig): None for none.
    memory_bytes: int | None = None
    cpus: float | None = None
    pids_limit: int | None = None

    @property
    def running(self) -> bool:
        return self.status in ("running", "restarting", "paused")


@dataclass(frozen=True)
class ImageConfig:
    """The part of an image's config a commit may override.

    Docker merges a commit's config with the container's: keys left empty here
    are taken from the container, so to drop an env var the override must name
    it (``KEY=``), and to drop a label it must set it (to "").
    ``entrypoint=()`` means "no entrypoint" (None: the container's); an empty
    ``cmd`` is always the container's, as Docker merges it.
    """

    env: Sequence[str] = ()
    cmd: Sequence[str] | None = None
    entrypoint: Sequence[str] | None = None
    working_dir: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageInfo:
    id: str
    tags: tuple[str, ...]
    labels: Mapping[str, str]
    size_bytes: int
    layers: int
    created_at: float
    env: tuple[str, ...] = ()
    cmd: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    # For a committed image: the env of the container it was committed from.
    container_env: tuple[str, ...] = ()
    # The image it was committed or built on; "" for a loaded (or flattened) one.
    # ``size_bytes`` minus the parent's is what this image itself adds.
    parent_id: str = ""


@dataclass(frozen=True)
class Logs:
    """The last lines of a container's output, stdout and stderr interleaved in
    the order the daemon logged them: a job's error reads next to its cause."""

    text: str

    def lines(self) -> list[str]:
        return self.text.splitlines()


EventKind = Literal["container_exited", "container_oom", "image_deleted", "image_untagged"]


@dataclass(frozen=True)
class EngineEvent:
    """One engine event, already normalised.

    ``container_exited`` carries the exit code (Docker sends it as a string in
    the ``die`` event); ``image_deleted`` means the image is gone, while
    ``image_untagged`` only means a tag moved or was removed.
    """

    kind: EventKind
    id: str
    time: float
    exit_code: int | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


class EventStream(Protocol):
    """A blocking iterator of events that another thread may ``close()``."""

    def __iter__(self) -> Iterator[EngineEvent]: ...

    def close(self) -> None: ...


class LogStream(Protocol):
    """A container's output as it is written (stdout and stderr interleaved,
    from the first line on), ending when the container stops; another thread
    may ``close()`` it to stop following early."""

    def __iter__(self) -> Iterator[str]: ...

    def close(self) -> None: ...


@runtime_checkable
class Engine(Protocol):
    """The container engine as Snapyard sees it.

    Every method raises only the errors of this module. Calls may block (they
    are network calls on Docker): only Spawners and the Watcher make the slow
    ones, never the SnapshotManager or the Supervisor in their message loop.
    """

    def ping(self) -> None:
        """Raise EngineUnavailable unless the engine answers."""

    def describe(self) -> str:
        """Where the engine is, for messages: ``unix:///var/run/docker.sock``."""

    # Containers

    def create_container(self, spec: ContainerSpec) -> str:
        """Create (never pull) a container and return its ID. ImageMissing on 404."""

    def start_container(self, container_id: str) -> None: ...

    def inspect_container(self, container_id: str) -> ContainerState: ...

    def wait_container(self, container_id: str, timeout_s: float | None = None) -> int:
        """Block until the container exits; return its exit code.

        EngineUnavailable when ``timeout_s`` passes first.
        """

    def stop_container(self, container_id: str, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``. No error if already stopped."""

    def kill_container(self, container_id: str, signal: str = "SIGKILL") -> None:
        """Send a signal. No error if the container is not running."""

    def remove_container(self, container_id: str, force: bool = False) -> None: ...

    def container_logs(self, container_id: str, tail: int = 200) -> Logs:
        """The last ``tail`` lines of stdout and of stderr, demultiplexed."""

    def follow_logs(self, container_id: str) -> LogStream:
        """All output so far, then new output as it comes, until the container stops."""

    def list_containers(self, labels: Mapping[str, str]) -> list[ContainerState]:
        """All containers (running or not) carrying every one of ``labels``."""

    # Images

    def commit_container(
        self,
        container_id: str,
        repository: str,
        tag: str,
        config: ImageConfig,
    ) -> str:
        """Commit the container's filesystem to a new image; return the image ID."""

    def flatten_image(self, image: str, base: str, repository: str, tag: str) -> str:
        """Squash ``image``'s layers above ``base`` into one; tag it; return the new ID.

        A chain of snapshots grows a layer per run until the engine refuses
        more; the flattened image holds the same files (deletions included)
        and config (env, entrypoint, cmd, workdir, labels) at ``base``'s depth
        + 1. ``image`` is left as it is. ImageMissing when either is gone;
        EngineError when ``image`` is not built on ``base``.
        """

    def inspect_image(self, image: str) -> ImageInfo:
        """By ID or by tag. ImageMissing when it does not exist."""

    def list_images(self, labels: Mapping[str, str]) -> list[ImageInfo]: ...

    def remove_image(self, image: str, force: bool = False) -> None:
        """Conflict when a container uses it and ``force`` is false."""

    def tag_image(self, image: str, repository: str, tag: str) -> None: ...

    def build_image(self, context: bytes, tag: str, labels: Mapping[str, str]) -> str:
        """Build from a gzip-less tar ``context`` holding a Dockerfile; return the ID."""

    # Registry

    def push_image(self, image_id: str, repository: str) -> str:
        """Push the image to ``repository`` (``HOST:PORT/name``); return ``repository@sha256:...``.

        Only layers the registry lacks travel. The image keeps no tag of the
        registry (one is added for the push and removed after, unless the
        image had no other tag to keep it). ImageMissing when the image is
        gone; RegistryUnavailable when the registry does not answer.
        """

    def pull_image(self, reference: str) -> str:
        """Pull ``HOST:PORT/name@sha256:...``; return the image ID, the same as the pusher's.

        The image keeps the digest reference (Docker's RepoDigests, not a tag):
        tag it to keep it. ImageMissing when the registry has no such
        manifest; RegistryUnavailable when the registry does not answer.
        """

    # Events

    def events(self, since: float | None = None) -> EventStream:
        """Container exits/OOMs and image deletes/untags from ``since`` on."""
