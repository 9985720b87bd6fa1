"""The OpenAPI 3.1 document of the API, served at ``GET /openapi.json``.

Written by hand next to the shapes of ``actors.wire`` (the field lists come
from there), because the contract is the README's, not what a framework
infers: every status a route can answer is listed with its body, errors
included, so a schema checker (schemathesis, in ``make test``) can hold each
response to it.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from actors.model import MAX_COMMAND_ARGS, MAX_ENV_VARS, MAX_ID_LENGTH, JobState
from actors.wire import JOB_FIELDS, SNAPSHOT_FIELDS

__all__ = ["openapi_document", "openapi_json"]

_JSON = "application/json"
_STRING_OR_NULL: dict[str, Any] = {"type": ["string", "null"]}
_TIME: dict[str, Any] = {"type": ["string", "null"], "format": "date-time"}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


# Statuses every route may answer besides its own. 405 belongs to a path, not
# to an operation, but OpenAPI has no place for it there: every operation of a
# path lists it, and its Allow header names the path's methods.
_COMMON = {
    "400": _error(
        "a malformed HTTP request (conflicting Content-Length headers too), "
        "or a path or query that is not valid UTF-8"
    ),
    "401": {
        **_error("no valid bearer token (only when api.token is set)"),
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    },
    "405": {
        **_error("a method this path does not serve; Allow lists the ones it does"),
        "headers": {"Allow": {"required": True, "schema": {"type": "string"}}},
    },
    "414": _error("the request target is over 8 KiB"),
    "431": _error("the request headers are over 16 KiB"),
    "500": _error("an internal error; the supervisor's log has the detail"),
    "503": _error(
        "the supervisor is starting, stopped or not answering, or its job store's database "
        "cannot be reached; `error` says which, and a later try may succeed"
    ),
}

_ID_PARAM = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}


def _operation(
    summary: str,
    responses: dict[str, Any],
    parameters: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    secured: bool = True,
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {**_COMMON, **responses},
    }
    if not secured:
        operation["security"] = []
        del operation["responses"]["401"]
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = body
    return operation


def _schemas() -> dict[str, Any]:
    job_types: dict[str, Any] = {
        "id": {"type": "string"},
        "state": {"type": "string", "enum": [s.value for s in JobState]},
        "project": {"type": "string"},
        "work_item": {"type": "string"},
        "agent_type": {"type": "string"},
        "host": _STRING_OR_NULL,
        "attempt": {"type": "integer", "minimum": 0},
        "image_id": _STRING_OR_NULL,
        "from_snapshot": {"type": "boolean"},
        "snapshot_committed": {"type": "boolean"},
        "exit_code": {"type": ["integer", "null"]},
        "error": _STRING_OR_NULL,
        "created_at": _TIME,
        "started_at": _TIME,
        "finished_at": _TIME,
    }
    snapshot_types: dict[str, Any] = {
        "project": {"type": "string"},
        "work_item": {"type": "string"},
        "image_id": {"type": "string"},
        "tag": {"type": "string"},
        "base_image_id": _STRING_OR_NULL,
        "size_bytes": {"type": "integer", "minimum": 0},
        # What the snapshot adds over its parent (null when the engine did not say).
        "own_bytes": {"type": ["integer", "null"], "minimum": 0},
        "layers": {"type": "integer", "minimum": 0},
        "created_at": _TIME,
        "last_used_at": _TIME,
    }
    host_types: dict[str, Any] = {
        "host_id": {"type": "string"},
        "live": {"type": "boolean"},
        "draining": {"type": "boolean"},
        "api": {"type": "string"},
        "max_workers": {"type": "integer", "minimum": 0},
        "running": {"type": "integer", "minimum": 0},
        "started_at": _TIME,
        "last_seen": _TIME,
        "lease_until": _TIME,
    }
    ident = {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH}
    return {
        "Job": {
            "type": "object",
            "required": list(JOB_FIELDS),
            "properties": {name: job_types[name] for name in JOB_FIELDS},
            "additionalProperties": False,
        },
        "Snapshot": {
            "type": "object",
            "required": list(SNAPSHOT_FIELDS),
            "properties": {
                **{name: snapshot_types[name] for name in SNAPSHOT_FIELDS},
                # A cluster's listing only: the host that holds it.
                "host": {"type": "string"},
            },
            "additionalProperties": False,
        },
        "Host": {
            "type": "object",
            "required": list(host_types),
            "properties": host_types,
            "additionalProperties": False,
        },
        "JobSubmission": {
            "type": "object",
            "required": ["project", "work_item"],
            "properties": {
                "project": ident,
                "work_item": ident,
                "agent_type": {
                    **ident,
                    "description": "`default`, or one with an [agent_types.NAME] table (422 if not)",
                },
                "command": {
                    "type": "array",
                    "items": {"type": "string"},
                    "minItems": 1,
                    "maxItems": MAX_COMMAND_ARGS,
                },
                "env": {
                    "type": "object",
                    "maxProperties": MAX_ENV_VARS,
                    "additionalProperties": {"type": "string"},
                    "description": "secret: never returned, masked as *** in logs",
                },
                "timeout_s": {"type": "number", "exclusiveMinimum": 0},
            },
            "additionalProperties": False,
        },
        "Error": {
            "type": "object",
            "required": ["error", "field"],
            "properties": {"error": {"type": "string"}, "field": _STRING_OR_NULL},
        },
        "Health": {
            "type": "object",
            "required": ["ok", "reason"],
            "properties": {
                "ok": {"type": "boolean"},
                "reason": {"type": "string"},
                "error": {"type": "string"},
                "field": {"type": "null"},
            },
        },
    }


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The document (built once; callers must not change it)."""
    job = _ref("Job")
    jobs = {
        "type": "object",
        "required": ["jobs"],
        "properties": {"jobs": {"type": "array", "items": job}},
    }
    snaps = {
        "type": "object",
        "required": ["snapshots"],
        "properties": {"snapshots": {"type": "array", "items": _ref("Snapshot")}},
    }
    evicted = {
        "type": "object",
        "required": ["evicted"],
        "properties": {"evicted": {"type": "array", "items": _ref("Snapshot")}},
    }
    hosts = {
        "type": "object",
        "required": ["hosts"],
        "properties": {"hosts": {"type": "array", "items": _ref("Host")}},
    }
    logs = {
        "type": "object",
        "required": ["id", "state", "logs"],
        "properties": {
            "id": {"type": "string"},
            "state": {"type": "string", "enum": [s.value for s in JobState]},
            "logs": {"type": "string"},
        },
    }
    deleted = {
        "type": "object",
        "required": ["deleted"],
        "properties": {"deleted": {"type": "integer", "minimum": 0}},
    }
    removed = {
        "type": "object",
        "required": ["removed", "project", "work_item"],
        "properties": {
            "removed": {"const": True},
            "project": {"type": "string"},
            "work_item": {"type": "string"},
        },
    }
    missing = _error("no such job")
    unprocessable = _error("a value is wrong; `field` names it")
    paths: dict[str, Any] = {
        "/jobs": {
            "get": _operation(
                "List jobs, newest first",
                {"200": _json(jobs, "the jobs"), "422": unprocessable},
                [
                    {
                        "name": "state",
                        "in": "query",
                        "schema": {"type": "string", "enum": [s.value for s in JobState]},
                    },
                    {"name": "project", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                ],
            ),
            "post": _operation(
                "Submit a job",
                {
                    "201": _json(job, "the queued job"),
                    "400": _error(
                        "not JSON, not Content-Type: application/json, or a key given "
                        "twice (`field` names it)"
                    ),
                    "408": _error("the body did not arrive in time"),
                    "411": _error("no Content-Length"),
                    "413": _error("the body is over 1 MiB"),
                    "422": unprocessable,
                },
                body={"required": True, "content": {_JSON: {"schema": _ref("JobSubmission")}}},
            ),
        },
        "/jobs/prune": {
            "post": _operation(
                "Delete finished jobs older than supervisor.retention_s, with their history",
                {"200": _json(deleted, "how many jobs were deleted")},
            ),
        },
        "/jobs/{id}": {
            "parameters": [_ID_PARAM],
            "get": _operation("One job", {"200": _json(job, "the job"), "404": missing}),
            "delete": _operation(
                "Cancel a queued or running job",
                {
                    "200": _json(job, "the cancelled job"),
                    "202": _json(
                        job,
                        "another cluster host runs it: the cancel was handed to that host "
                        "(cancel_handed_to: host, api), which stops it",
                    ),
                    "404": missing,
                    "409": _error("the job already ended"),
                },
            ),
        },
        "/jobs/{id}/logs": {
            "parameters": [_ID_PARAM],
            "get": _operation(
                "The tail of a job's output, or (follow=true) all of it as it is written",
                {
                    "200": {
                        "description": "JSON tail; with follow=true, text until the job ends",
                        "content": {
                            _JSON: {"schema": logs},
                            "text/plain": {"schema": {"type": "string"}},
                        },
                    },
                    "404": missing,
                    "422": unprocessable,
                },
                [{"name": "follow", "in": "query", "schema": {"type": "boolean"}}],
            ),
        },
        "/snapshots": {
            "get": _operation("List snapshots", {"200": _json(snaps, "the registry")}),
        },
        "/snapshots/prune": {
            "post": _operation("Run eviction now", {"200": _json(evicted, "what it evicted")}),
        },
        "/snapshots/{project}/{work_item}": {
            "parameters": [
                {"name": "project", "in": "path", "required": True, "schema": {"type": "string"}},
                {"name": "work_item", "in": "path", "required": True, "schema": {"type": "string"}},
            ],
            "delete": _operation(
                "Invalidate a snapshot and delete its image",
                {
                    "200": _json(removed, "removed"),
                    "404": _error(
                        "no snapshot for that key on this host (in a cluster, `error` names "
                        "the host that holds it)"
                    ),
                },
            ),
        },
        "/hosts": {
            "get": _operation(
                "List the cluster's hosts and their leases (empty on a single host)",
                {"200": _json(hosts, "the hosts")},
            ),
        },
        "/healthz": {
            "get": _operation(
                "Liveness and readiness: the engine answers and the actors are alive",
                {
                    "200": _json(_ref("Health"), "healthy"),
                    "503": _json(
                        {"anyOf": [_ref("Health"), _ref("Error")]}, "unhealthy, or starting"
                    ),
                },
                secured=False,
            ),
        },
        "/metrics": {
            "get": _operation(
                "Prometheus text exposition",
                {
                    "200": {
                        "description": "the app's registry",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            ),
        },
        "/events": {
            "get": _operation(
                "Job state changes as server-sent events (id: resume with Last-Event-ID)",
                {
                    "200": {
                        "description": "`event: job` with data {id, state, time}",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "404": missing,
                    "422": unprocessable,
                },
                [
                    {"name": "job", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "schema": {"type": "string", "pattern": "^[0-9]+$"},
                    },
                ],
            ),
        },
        "/openapi.json": {
            "get": _operation(
                "This document",
                {"200": _json({"type": "object"}, "the OpenAPI document")},
            ),
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Snapyard",
            "version": "1",
            "description": "Run jobs in Docker workers; reuse snapshots of clean runs.",
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


@functools.cache
def openapi_json() -> bytes:
    """The document as served: serialized once, not per request."""
    return (json.dumps(openapi_document(), ensure_ascii=False) + "\n").encode()
