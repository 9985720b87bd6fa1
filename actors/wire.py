"""The JSON shapes of the HTTP API, shared by the server and its clients.

Kept apart from ``api.py`` so a client (the ``snapyard`` command) can speak
the protocol without importing the server, and with it the whole actor
system, pykka, Sentry and the Docker SDK. Standard library plus the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from actors.model import Job, JobSpec, Snapshot, validate_spec
from actors.store.cluster import HostInfo

__all__ = [
    "JOB_FIELDS",
    "MAX_BODY_BYTES",
    "SNAPSHOT_FIELDS",
    "SUBMIT_FIELDS",
    "WireError",
    "client_host",
    "host_json",
    "iso_time",
    "job_json",
    "parse_time",
    "snapshot_json",
    "spec_from_json",
]

# A job spec is a few kilobytes; env values are capped at 32 KiB each by the
# model, but nobody needs a megabyte. Refusing early keeps a bad client cheap.
# The client checks it too: the server answers 413 and closes while a large
# body is still being sent, which a client would see as a broken pipe.
MAX_BODY_BYTES = 1024 * 1024

# The stable JSON shapes, in order. Env is deliberately absent: it is a secret.
JOB_FIELDS = (
    "id",
    "state",
    "project",
    "work_item",
    "agent_type",
    "host",
    "attempt",
    "image_id",
    "from_snapshot",
    "snapshot_committed",
    "exit_code",
    "error",
    "created_at",
    "started_at",
    "finished_at",
)
SNAPSHOT_FIELDS = (
    "project",
    "work_item",
    "image_id",
    "tag",
    "base_image_id",
    "size_bytes",
    "own_bytes",
    "layers",
    "created_at",
    "last_used_at",
)
# What a submit body may hold; anything else is refused, so a typo is never ignored.
SUBMIT_FIELDS = frozenset({"project", "work_item", "agent_type", "command", "env", "timeout_s"})


class WireError(ValueError):
    """A body that is not the shape the API accepts. ``field`` names what to fix."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def iso_time(ts: float | None) -> str | None:
    """Epoch seconds as ISO-8601 UTC (``...Z``): what every client can parse."""
    if ts is None:
        return None
    text = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """The inverse of :func:`iso_time` (an aware datetime in UTC)."""
    return datetime.fromisoformat(text)


def job_json(job: Job) -> dict[str, Any]:
    """The stable JSON shape of a job (API and ``--json``). Never includes env."""
    return {
        "id": job.id,
        "state": str(job.state),
        "project": job.spec.project,
        "work_item": job.spec.work_item,
        "agent_type": job.spec.agent_type,
        # The cluster host that claimed it (null while queued; on one host,
        # this host) and which claim it is: a rescued job's attempt grows.
        "host": job.host,
        "attempt": job.attempt,
        "image_id": job.image_id,
        "from_snapshot": job.from_snapshot,
        "snapshot_committed": job.snapshot_committed,
        "exit_code": job.exit_code,
        "error": job.error,
        "created_at": iso_time(job.created_at),
        "started_at": iso_time(job.started_at),
        "finished_at": iso_time(job.finished_at),
    }


def host_json(host: HostInfo, now: float) -> dict[str, Any]:
    """The stable JSON shape of a cluster host (``GET /hosts``); ``live`` as of ``now``."""
    return {
        "host_id": host.host_id,
        "live": host.live(now),
        "draining": host.draining,
        "api": host.api,
        "max_workers": host.max_workers,
        "running": host.running,
        "started_at": iso_time(host.started_at),
        "last_seen": iso_time(host.last_seen),
        "lease_until": iso_time(host.lease_until),
    }


def snapshot_json(snapshot: Snapshot) -> dict[str, Any]:
    """The stable JSON shape of a snapshot registry entry (``host`` only in a cluster)."""
    shape: dict[str, Any] = {
        "project": snapshot.key.project,
        "work_item": snapshot.key.work_item,
        "image_id": snapshot.image_id,
        "tag": snapshot.tag,
        "base_image_id": snapshot.base_image_id or None,  # "": unknown (another host's)
        "size_bytes": snapshot.size_bytes,
        # What the snapshot adds over its parent: what snapshots.max_total_bytes counts.
        "own_bytes": snapshot.own_bytes,
        "layers": snapshot.layers,
        "created_at": iso_time(snapshot.created_at),
        "last_used_at": iso_time(snapshot.last_used_at),
    }
    if snapshot.host is not None:  # a cluster's listing (issue 14): where it is
        shape["host"] = snapshot.host
    return shape


def spec_from_json(body: object) -> JobSpec:
    """A submit body as a valid JobSpec.

    Raises WireError for a body of the wrong shape and the model's InvalidJob
    for a value it refuses; both name the field to fix.
    """
    if not isinstance(body, Mapping):
        raise WireError("the body must be a JSON object")
    unknown = sorted(set(body) - SUBMIT_FIELDS)
    if unknown:
        raise WireError(
            f"unknown field {unknown[0]!r}; known fields: {', '.join(sorted(SUBMIT_FIELDS))}",
            unknown[0],
        )
    for required in ("project", "work_item"):
        if required not in body:
            raise WireError(f"{required} is required", required)
    return validate_spec(
        project=body["project"],
        work_item=body["work_item"],
        agent_type=body.get("agent_type", "default"),
        command=body.get("command"),
        env=body.get("env"),
        timeout_s=body.get("timeout_s"),
    )


def client_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to ``host``."""
    if host in ("", "0.0.0.0"):  # noqa: S104 - a wildcard bind is reached on loopback
        return "127.0.0.1"
    if host.strip("[]") == "::":
        return "::1"
    return host
