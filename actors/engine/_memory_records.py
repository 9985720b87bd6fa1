"""The records a MemoryEngine keeps (images, containers) and Docker's small rules
about names, IDs and env that every part of the engine shares."""

from __future__ import annotations

import re
import signal as signals
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from actors.engine.base import (
    ContainerSpec,
    ContainerState,
    ContainerStatus,
    EngineError,
    ImageInfo,
    decode_secret_env,
)

__all__ = [
    "COMMIT_OVERHEAD_BYTES",
    "DEFAULT_BASE_SIZE",
    "HEX",
    "MIN_PREFIX",
    "MemoryContainer",
    "MemoryImage",
    "env_key",
    "has_labels",
    "merge_env",
    "normalize_tag",
    "short_id",
    "signal_number",
]

HEX = re.compile(r"^[0-9a-f]+$")
# Docker only accepts unique ID prefixes; we also demand 12 hex digits so that
# code which works here never relies on a prefix Docker could find ambiguous.
MIN_PREFIX = 12
# The daemon keeps only this many events for ``since`` replays (events.go).
_EVENT_BACKLOG = 256
DEFAULT_BASE_SIZE = 5_000_000
# What a commit adds on top of the files written: a layer is never free.
COMMIT_OVERHEAD_BYTES = 4096


def normalize_tag(ref: str) -> str:
    """``repo`` -> ``repo:latest``; a registry port (``host:5000/repo``) is not a tag."""
    last = ref.rsplit("/", 1)[-1]
    return ref if ":" in last else f"{ref}:latest"


def short_id(object_id: str) -> str:
    """Docker's ``stringid.TruncateID``: drop the algorithm, keep 12 characters."""
    return object_id.split(":", 1)[-1][:12]


def env_key(entry: str) -> str:
    return entry.split("=", 1)[0]


def merge_env(user: Sequence[str], defaults: Sequence[str]) -> list[str]:
    """Docker's env merge: the user's entries, then defaults whose KEY the user did not name."""
    if not user:
        return list(defaults)
    named = {env_key(entry) for entry in user}
    return [*user, *(entry for entry in defaults if env_key(entry) not in named)]


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
    # A pulled image's layer digests, as its manifest listed them (it has no parent).
    layer_ids: tuple[str, ...] = ()

    def info(self) -> ImageInfo:
        return ImageInfo(
            id=self.id,
            # Digest references (``repo@sha256:...``) are Docker's RepoDigests, not tags.
            tags=tuple(tag for tag in self.tags if "@" not in tag),
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
    # What the job runs as the image defines it (ENTRYPOINT, then the job's
    # command or CMD): what the env helper execs, and what test kits play.
    cmd: tuple[str, ...] | None
    entrypoint: tuple[str, ...] | None
    # What Docker records in the container's config (a commit merges these):
    # under the env helper the helper's argv and an empty CMD.
    config_cmd: tuple[str, ...] | None
    config_entrypoint: tuple[str, ...] | None
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
    # so a commit cannot capture it), read back as the env helper reads it.
    secret_env_file: bytes = field(default=b"", repr=False)

    @property
    def name(self) -> str | None:
        return self.spec.name

    def env_list(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.env.items()]

    @property
    def process_env(self) -> dict[str, str]:
        """What the worker process sees: the config env plus the secret file's,
        which only the env helper reads (an image alone knows nothing of it)."""
        if not self.spec.env_helper:
            return dict(self.env)
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
            memory_bytes=self.spec.memory_bytes or None,
            cpus=self.spec.cpus or None,
            pids_limit=self.spec.pids_limit or None,
        )


def has_labels(have: Mapping[str, str], want: Mapping[str, str]) -> bool:
    return all(have.get(key) == value for key, value in want.items())


def signal_number(name: str) -> int:
    text = name.upper()
    if text.isdigit():
        return int(text)
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return int(signals.Signals[text])
    except KeyError:
        raise EngineError(f"Invalid signal: {name}", status_code=400) from None
