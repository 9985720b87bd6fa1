"""Docker's JSON, read into the Engine's types: pure functions, no SDK.

Kept apart from ``docker.py`` so the daemon's formats (RFC 3339 nanosecond
times, ``secs.nanos`` since-parameters, event attributes mixed with labels)
can be read and tested without the docker SDK or a daemon.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from actors.engine.base import ContainerState, EngineEvent, EventKind, ImageInfo

__all__ = [
    "EVENT_ACTIONS",
    "container_state",
    "engine_event",
    "image_info",
    "label_filter",
    "parse_time",
    "since_param",
]

# Event attributes the daemon mixes in with the labels of the container or image.
_NOT_LABELS = frozenset({"exitCode", "image", "name", "signal", "execDuration", "imageID"})
_ACTIONS: dict[tuple[str, str], EventKind] = {
    ("container", "die"): "container_exited",
    ("container", "oom"): "container_oom",
    ("image", "delete"): "image_deleted",
    ("image", "untag"): "image_untagged",
}
# The event actions to subscribe to: the ones engine_event reads.
EVENT_ACTIONS = tuple(sorted({action for _, action in _ACTIONS}))
_FRACTION = re.compile(r"\.(\d+)")
_ZERO_TIME = "0001-01-01T00:00:00Z"


def parse_time(text: str | None) -> float | None:
    """Docker's RFC 3339 timestamps (nanoseconds, ``Z``) as epoch seconds; None if unset."""
    if not text or text == _ZERO_TIME:
        return None
    # datetime takes at most microseconds.
    trimmed = _FRACTION.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), text, count=1)
    return datetime.fromisoformat(trimmed.replace("Z", "+00:00")).timestamp()


def since_param(since: float) -> str:
    # A bare float would be misread: Docker parses "secs.nanos", so ".5" means 5 ns.
    seconds = math.floor(since)
    return f"{seconds}.{round((since - seconds) * 1e9):09d}"


def label_filter(labels: Mapping[str, str]) -> dict[str, list[str]]:
    return {"label": [f"{key}={value}" for key, value in labels.items()]} if labels else {}


def engine_event(raw: Mapping[str, Any]) -> EngineEvent | None:
    kind = _ACTIONS.get((raw.get("Type", ""), raw.get("Action", "")))
    if kind is None:
        return None
    actor = raw.get("Actor") or {}
    attributes: Mapping[str, str] = actor.get("Attributes") or {}
    exit_code = attributes.get("exitCode")
    stamp = raw.get("timeNano")
    return EngineEvent(
        kind=kind,
        id=str(actor.get("ID", "")),
        time=stamp / 1e9 if stamp else float(raw.get("time", 0)),
        exit_code=int(exit_code) if kind == "container_exited" and exit_code else None,
        labels={k: v for k, v in attributes.items() if k not in _NOT_LABELS},
    )


def container_state(raw: Mapping[str, Any]) -> ContainerState:
    state = raw.get("State") or {}
    host = raw.get("HostConfig") or {}
    status = state.get("Status", "created")
    # Docker reports ExitCode 0 for containers that have not exited yet.
    exited = status in ("exited", "dead")
    return ContainerState(
        id=raw["Id"],
        status=status,
        image_id=raw.get("Image", ""),
        labels=dict((raw.get("Config") or {}).get("Labels") or {}),
        exit_code=int(state.get("ExitCode", 0)) if exited else None,
        oom_killed=bool(state.get("OOMKilled", False)),
        created_at=parse_time(raw.get("Created")) or 0.0,
        started_at=parse_time(state.get("StartedAt")),
        finished_at=parse_time(state.get("FinishedAt")) if exited else None,
        # Docker reports 0 (or null) for "no limit".
        memory_bytes=int(host.get("Memory") or 0) or None,
        cpus=int(host.get("NanoCpus") or 0) / 1e9 or None,
        pids_limit=int(host.get("PidsLimit") or 0) or None,
    )


def image_info(raw: Mapping[str, Any]) -> ImageInfo:
    config = raw.get("Config") or {}
    cmd = config.get("Cmd")
    entrypoint = config.get("Entrypoint")
    return ImageInfo(
        id=raw["Id"],
        tags=tuple(t for t in raw.get("RepoTags") or () if t != "<none>:<none>"),
        labels=dict(config.get("Labels") or {}),
        size_bytes=int(raw.get("Size", 0)),
        layers=len((raw.get("RootFS") or {}).get("Layers") or ()),
        created_at=parse_time(raw.get("Created")) or 0.0,
        env=tuple(config.get("Env") or ()),
        container_env=tuple((raw.get("ContainerConfig") or {}).get("Env") or ()),
        parent_id=str(raw.get("Parent") or ""),
        cmd=None if cmd is None else tuple(cmd),
        entrypoint=None if entrypoint is None else tuple(entrypoint),
    )
