"""The nouns of Snapyard: jobs, their states, snapshot keys and snapshots.

Validation lives here, at the edge: a JobSpec that exists is a JobSpec that
can run, so nothing deeper has to re-check IDs, env names or timeouts.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from actors.labels import RESERVED_ENV_PREFIX

__all__ = [
    "MAX_ID_LENGTH",
    "InvalidJob",
    "Job",
    "JobSpec",
    "JobState",
    "Snapshot",
    "SnapshotKey",
    "validate_spec",
]

MAX_ID_LENGTH = 200
MAX_COMMAND_ARGS = 256
MAX_ENV_VARS = 256
MAX_ENV_VALUE_BYTES = 32 * 1024
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class InvalidJob(ValueError):
    """A submitted job was refused. ``field`` names what to fix."""

    def __init__(self, field_name: str, problem: str) -> None:
        self.field = field_name
        self.problem = problem
        super().__init__(f"{field_name}: {problem}")


class JobState(StrEnum):
    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.TIMED_OUT, JobState.CANCELLED})


@dataclass(frozen=True, order=True)
class SnapshotKey:
    project: str
    work_item: str

    def __str__(self) -> str:
        return f"{self.project}/{self.work_item}"


@dataclass(frozen=True)
class Snapshot:
    """A registry entry: one committed image per key, addressed by immutable ID."""

    key: SnapshotKey
    image_id: str
    tag: str
    base_image_id: str
    created_at: float
    last_used_at: float
    size_bytes: int
    layers: int
    # What this snapshot adds over its parent (its own layer); None when not known.
    own_bytes: int | None = None
    # In a cluster's listing: the host that holds it (None: this host, or no cluster).
    host: str | None = None

    @property
    def charged_bytes(self) -> int:
        """What ``snapshots.max_total_bytes`` counts: the snapshot's own bytes when known,
        else its whole image (an over-count evicts early; an under-count fills the disk)."""
        return self.size_bytes if self.own_bytes is None else self.own_bytes


@dataclass(frozen=True)
class JobSpec:
    """What a user asked to run. ``env`` is secret: it never appears in a repr."""

    project: str
    work_item: str
    agent_type: str = "default"
    command: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    timeout_s: float | None = None

    @property
    def key(self) -> SnapshotKey:
        return SnapshotKey(self.project, self.work_item)


@dataclass(frozen=True)
class Job:
    id: str
    spec: JobSpec
    state: JobState
    created_at: float
    attempts: int = 0
    container_id: str | None = None
    image_id: str | None = None
    from_snapshot: bool = False
    snapshot_committed: bool = False
    exit_code: int | None = None
    error: str | None = None
    logs_tail: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    deadline: float | None = None
    # Not before: a re-queued start backs off until then (None: at once).
    retry_at: float | None = None
    # The claim generation, the cluster's fencing token: a rescue re-queues the
    # job with attempt + 1, and a store write carrying an older one is refused
    # (``Fenced``). Not ``attempts``, which counts the engine's start tries.
    attempt: int = 0
    # The cluster host that claimed it; None while queued, and on a single host.
    host: str | None = None
    # When it last became queued (None: at ``created_at``): the cluster's
    # locality wait counts from here, not from the submission.
    queued_at: float | None = None

    @property
    def key(self) -> SnapshotKey:
        return self.spec.key


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_id(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidJob(name, "must be a string")
    if not value or not value.strip():
        raise InvalidJob(name, "must not be empty")
    if all(char.isspace() or unicodedata.category(char) == "Cf" for char in value):
        # U+200B and friends print as nothing: an ID nobody can read or type.
        raise InvalidJob(
            name, "has no visible character (only spaces and invisible ones such as U+200B)"
        )
    if len(value) > MAX_ID_LENGTH:
        raise InvalidJob(
            name, f"is {len(value)} characters long; at most {MAX_ID_LENGTH} are allowed"
        )
    for char in value:
        category = unicodedata.category(char)
        # Control, surrogate, unassigned and private-use characters cannot be
        # labels or log fields safely; everything printable is fine.
        if category in {"Cc", "Cs", "Cn", "Co", "Zl", "Zp"}:
            raise InvalidJob(name, f"contains the unprintable character U+{ord(char):04X}")
    return value


def validate_spec(
    project: object,
    work_item: object,
    agent_type: object = "default",
    command: object = None,
    env: object = None,
    timeout_s: object = None,
) -> JobSpec:
    """Build a JobSpec from untrusted input, or raise InvalidJob saying what is wrong."""
    command_tuple: tuple[str, ...] | None = None
    if command is not None:
        if isinstance(command, str) or not isinstance(command, Sequence):
            raise InvalidJob("command", "must be a list of strings")
        if not command:
            raise InvalidJob("command", "must not be empty; omit it to use the worker's default")
        if len(command) > MAX_COMMAND_ARGS:
            raise InvalidJob("command", f"has {len(command)} arguments; at most {MAX_COMMAND_ARGS}")
        for arg in command:
            if not isinstance(arg, str):
                raise InvalidJob("command", "must be a list of strings")
            if "\x00" in arg or not _is_utf8(arg):
                raise InvalidJob("command", "an argument contains a NUL or a lone surrogate")
        command_tuple = tuple(command)
    env_dict: dict[str, str] = {}
    if env is not None:
        if not isinstance(env, Mapping):
            raise InvalidJob("env", "must be an object of NAME: value")
        if len(env) > MAX_ENV_VARS:
            raise InvalidJob("env", f"has {len(env)} variables; at most {MAX_ENV_VARS}")
        for name, value in env.items():
            if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
                raise InvalidJob(
                    "env", f"{name!r} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)"
                )
            if name.startswith(RESERVED_ENV_PREFIX):
                raise InvalidJob(
                    "env",
                    f"{name} is reserved: names starting with {RESERVED_ENV_PREFIX} are set by Snapyard",
                )
            if not isinstance(value, str):
                raise InvalidJob("env", f"the value of {name} must be a string")
            if "\x00" in value or not _is_utf8(value):
                raise InvalidJob("env", f"the value of {name} contains a NUL or a lone surrogate")
            if len(value.encode("utf-8")) > MAX_ENV_VALUE_BYTES:
                raise InvalidJob(
                    "env", f"the value of {name} is longer than {MAX_ENV_VALUE_BYTES} bytes"
                )
            env_dict[name] = value
    timeout: float | None = None
    if timeout_s is not None:
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float):
            raise InvalidJob("timeout_s", "must be a number of seconds")
        try:
            timeout = float(timeout_s)
        except OverflowError:
            raise InvalidJob("timeout_s", "is too large; give a number of seconds") from None
        if not (timeout > 0 and math.isfinite(timeout)):
            raise InvalidJob(
                "timeout_s", f"must be a positive, finite number of seconds, not {timeout_s}"
            )
    return JobSpec(
        project=_check_id("project", project),
        work_item=_check_id("work_item", work_item),
        agent_type=_check_id("agent_type", agent_type),
        command=command_tuple,
        env=env_dict,
        timeout_s=timeout,
    )
