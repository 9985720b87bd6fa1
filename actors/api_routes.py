"""The API's routes: one request in, one JSON answer out.

A request's thread parses it, checks the bearer token, calls the ``Snapyard``
facade and writes the answer; ``actors.api`` owns the socket and its threads.
The JSON shapes themselves are in ``actors.wire``, shared with the client.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import pykka

from actors.metrics import CONTENT_TYPE, Metrics
from actors.model import InvalidJob, Job, JobSpec, JobState, Snapshot, SnapshotKey
from actors.supervisor import SupervisorStopped
from actors.telemetry import capture_error
from actors.wire import WireError, job_json, snapshot_json, spec_from_json

if TYPE_CHECKING:
    from actors.api import _Server

__all__ = ["MAX_BODY_BYTES", "MAX_LIST_LIMIT", "Facade", "RequestHandler"]

# The API's log lines keep one logger name, whichever module writes them.
log = logging.getLogger("actors.api")

# A job spec is a few kilobytes; env values are capped at 32 KiB each by the
# model, but nobody needs a megabyte. Refusing early keeps a bad client cheap.
MAX_BODY_BYTES = 1024 * 1024
MAX_LIST_LIMIT = 1000


class Facade(Protocol):
    """What the API needs from ``actors.app.Snapyard``; tests can pass a fake."""

    # The app's metrics: /metrics serves their registry, requests are counted there.
    @property
    def metrics(self) -> Metrics: ...

    def submit(self, spec: JobSpec) -> Job: ...

    def get(self, job_id: str) -> Job | None: ...

    def jobs(
        self, state: JobState | None = None, project: str | None = None, limit: int = 100
    ) -> list[Job]: ...

    def cancel(self, job_id: str) -> Job | None: ...

    def snapshots(self) -> list[Snapshot]: ...

    def remove_snapshot(self, key: SnapshotKey) -> bool: ...

    def prune_snapshots(self) -> list[Snapshot]: ...

    def prune_jobs(self) -> int: ...

    def health(self) -> tuple[bool, str]: ...


class _HttpError(Exception):
    """A request refused with a status and a message a person can act on."""

    def __init__(
        self,
        status: HTTPStatus,
        message: str,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = dict(headers or {})


_Body = tuple[HTTPStatus, Any]
_Route = Callable[["RequestHandler", list[str]], _Body]


def _one(query: Mapping[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise _HttpError(HTTPStatus.UNPROCESSABLE_ENTITY, f"{name} given more than once", name)
    return values[0]


class RequestHandler(BaseHTTPRequestHandler):
    """One request. ``server`` is an ``_Server``: it carries the facade and token."""

    server: _Server
    protocol_version = "HTTP/1.1"
    # A client that opens a connection and sends nothing must not hold a thread forever.
    timeout = 30
    server_version = "snapyard"
    sys_version = ""

    # --- plumbing ----------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        # The default writes to stderr; route it to logging, never with bodies.
        log.debug("api: " + format, *args)

    def log_error(self, format: str, *args: Any) -> None:
        # http.server logs a malformed request line verbatim; it may be a body
        # (with a job's env) sent after an error. Say what, never the line.
        log.debug("api: refused a malformed request from %s", self.client_address[0])

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self._query = parse_qs(split.query, keep_blank_values=True)
        self._body_read = False
        self._route_name = route_name = "?"
        try:
            try:
                # Split before decoding: a work item may contain an encoded "/".
                parts = [unquote(p, errors="strict") for p in split.path.strip("/").split("/")]
            except UnicodeDecodeError:
                raise _HttpError(HTTPStatus.BAD_REQUEST, "the path is not valid UTF-8") from None
            route_name, routes = self._routes(parts)
            self._route_name = route_name
            if parts != ["healthz"]:
                self._authorize()
            route = routes.get(method)
            if route is None:
                raise _HttpError(
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    f"{method} is not allowed on {split.path}; allowed: {', '.join(sorted(routes))}",
                    headers={"Allow": ", ".join(sorted(routes))},
                )
            status, body = route(self, parts)
            if isinstance(body, bytes):  # only /metrics answers with anything but JSON
                self._send(status, body, CONTENT_TYPE)
            else:
                self._send_json(status, body)
        except _HttpError as exc:
            self._send_json(
                exc.status, {"error": exc.message, "field": exc.field}, headers=exc.headers
            )
        except SupervisorStopped as exc:
            self._send_json(
                HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"the supervisor is not running: {exc}"}
            )
        except (pykka.ActorDeadError, pykka.Timeout) as exc:
            # The supervisor is stopping or stuck: a retryable condition for the client.
            log.warning("api: %s %s: supervisor unavailable: %s", method, route_name, exc)
            self._send_json(
                HTTPStatus.SERVICE_UNAVAILABLE,
                {"error": f"the supervisor is not answering: {exc or type(exc).__name__}"},
            )
        except Exception as exc:
            log.exception("api: %s %s failed", method, route_name)
            capture_error(exc, source="api", extras={"method": method, "route": route_name})
            self._send_json(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                {"error": f"internal error ({type(exc).__name__}); see the supervisor's log"},
            )

    def _declares_body(self) -> bool:
        length = self.headers.get("Content-Length", "0").strip()
        return length not in ("", "0") or "Transfer-Encoding" in self.headers

    def _routes(self, parts: list[str]) -> tuple[str, dict[str, _Route]]:
        match parts:
            case ["jobs"]:
                return "/jobs", {"GET": RequestHandler._list_jobs, "POST": RequestHandler._submit}
            case ["jobs", "prune"]:  # before /jobs/{id}: a job ID always starts "j-"
                return "/jobs/prune", {"POST": RequestHandler._prune_jobs}
            case ["jobs", _]:
                return "/jobs/{id}", {
                    "GET": RequestHandler._get_job,
                    "DELETE": RequestHandler._cancel,
                }
            case ["jobs", _, "logs"]:
                return "/jobs/{id}/logs", {"GET": RequestHandler._job_logs}
            case ["snapshots"]:
                return "/snapshots", {"GET": RequestHandler._list_snapshots}
            case ["snapshots", "prune"]:
                return "/snapshots/prune", {"POST": RequestHandler._prune}
            case ["snapshots", _, _]:
                return "/snapshots/{project}/{work_item}", {
                    "DELETE": RequestHandler._remove_snapshot
                }
            case ["healthz"]:
                return "/healthz", {"GET": RequestHandler._health}
            case ["metrics"]:
                return "/metrics", {"GET": RequestHandler._metrics}
        raise _HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint: {self.path.split('?')[0]}")

    def _authorize(self) -> None:
        token = self.server.token
        if not token:
            return
        header = self.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        # compare_digest: the time taken must not reveal how much of the token matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            raise _HttpError(
                HTTPStatus.UNAUTHORIZED,
                "a bearer token is required: Authorization: Bearer <api.token>",
                headers={"WWW-Authenticate": 'Bearer realm="snapyard"'},
            )

    def _read_json(self) -> object:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise _HttpError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length")
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            raise _HttpError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length")
        try:
            length = int(raw_length)
        except ValueError:
            raise _HttpError(HTTPStatus.BAD_REQUEST, "Content-Length is not a number") from None
        if length < 0:
            raise _HttpError(HTTPStatus.BAD_REQUEST, "Content-Length is negative")
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the unread body would poison the connection
            raise _HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the body is {length} bytes; at most {MAX_BODY_BYTES} are accepted",
            )
        ctype = self.headers.get("Content-Type", "")
        raw = self.rfile.read(length)
        self._body_read = True
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise _HttpError(
                HTTPStatus.BAD_REQUEST,
                f"the body must be JSON with Content-Type: application/json, not {ctype or 'none'!r}",
            )
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise _HttpError(HTTPStatus.BAD_REQUEST, "the body is not UTF-8") from None
        except json.JSONDecodeError as exc:
            raise _HttpError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON: {exc}") from None
        except (ValueError, RecursionError):
            # Numbers past Python's digit limit, nesting past the recursion limit.
            raise _HttpError(
                HTTPStatus.BAD_REQUEST, "the body is not JSON this API accepts"
            ) from None

    def _send_json(
        self, status: HTTPStatus, body: Any, headers: Mapping[str, str] | None = None
    ) -> None:
        data = (json.dumps(body, ensure_ascii=False) + "\n").encode()
        self._send(status, data, "application/json; charset=utf-8", headers)

    def _send(
        self,
        status: HTTPStatus,
        data: bytes,
        ctype: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        # Counted before the answer leaves: a client that reads it sees the count.
        metrics = self.server.metrics
        if metrics is not None:  # None until the app is attached: no registry yet
            labels = {"route": getattr(self, "_route_name", "?"), "method": self.command}
            metrics.api_requests.labels(**labels).inc()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if not getattr(self, "_body_read", True) and self._declares_body():
            # An unread body would be parsed as the next request on this
            # connection (and logged as one): end the connection instead.
            self.close_connection = True
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _job_or_404(self, job_id: str) -> Job:
        job = self.server.app.get(job_id)
        if job is None:
            raise _HttpError(HTTPStatus.NOT_FOUND, f"no job with id {job_id!r}", "id")
        return job

    # --- routes ------------------------------------------------------------

    def _submit(self, parts: list[str]) -> _Body:
        try:
            spec = spec_from_json(self._read_json())
        except WireError as exc:
            raise _HttpError(HTTPStatus.UNPROCESSABLE_ENTITY, exc.message, exc.field) from None
        except InvalidJob as exc:
            raise _HttpError(
                HTTPStatus.UNPROCESSABLE_ENTITY, f"{exc.field} {exc.problem}", exc.field
            ) from None
        try:
            job = self.server.app.submit(spec)
        except InvalidJob as exc:  # e.g. an unknown project when those are refused
            raise _HttpError(
                HTTPStatus.UNPROCESSABLE_ENTITY, f"{exc.field} {exc.problem}", exc.field
            ) from None
        return HTTPStatus.CREATED, job_json(job)

    def _list_jobs(self, parts: list[str]) -> _Body:
        unknown = sorted(set(self._query) - {"state", "project", "limit"})
        if unknown:
            raise _HttpError(
                HTTPStatus.UNPROCESSABLE_ENTITY,
                f"unknown query parameter {unknown[0]!r}; known: state, project, limit",
                unknown[0],
            )
        raw_state = _one(self._query, "state") or None
        state: JobState | None = None
        if raw_state is not None:
            try:
                state = JobState(raw_state)
            except ValueError:
                raise _HttpError(
                    HTTPStatus.UNPROCESSABLE_ENTITY,
                    f"state {raw_state!r} is not one of {', '.join(s.value for s in JobState)}",
                    "state",
                ) from None
        raw_limit = _one(self._query, "limit")
        limit = 100
        if raw_limit is not None:
            try:
                limit = int(raw_limit)
            except ValueError:
                limit = -1
            if not 1 <= limit <= MAX_LIST_LIMIT:
                raise _HttpError(
                    HTTPStatus.UNPROCESSABLE_ENTITY,
                    f"limit {raw_limit!r} must be a whole number from 1 to {MAX_LIST_LIMIT}",
                    "limit",
                )
        project = _one(self._query, "project") or None
        jobs = self.server.app.jobs(state=state, project=project, limit=limit)
        return HTTPStatus.OK, {"jobs": [job_json(j) for j in jobs]}

    def _get_job(self, parts: list[str]) -> _Body:
        return HTTPStatus.OK, job_json(self._job_or_404(parts[1]))

    def _job_logs(self, parts: list[str]) -> _Body:
        job = self._job_or_404(parts[1])
        return HTTPStatus.OK, {"id": job.id, "state": str(job.state), "logs": job.logs_tail}

    def _cancel(self, parts: list[str]) -> _Body:
        job = self._job_or_404(parts[1])
        if job.state.terminal:
            raise _HttpError(
                HTTPStatus.CONFLICT, f"job {job.id} already ended ({job.state}); nothing to cancel"
            )
        cancelled = self.server.app.cancel(job.id)
        if cancelled is None:  # removed between the two calls
            raise _HttpError(HTTPStatus.NOT_FOUND, f"no job with id {job.id!r}", "id")
        return HTTPStatus.OK, job_json(cancelled)

    def _list_snapshots(self, parts: list[str]) -> _Body:
        snaps = sorted(self.server.app.snapshots(), key=lambda s: s.key)
        return HTTPStatus.OK, {"snapshots": [snapshot_json(s) for s in snaps]}

    def _remove_snapshot(self, parts: list[str]) -> _Body:
        key = SnapshotKey(parts[1], parts[2])
        if not self.server.app.remove_snapshot(key):
            raise _HttpError(HTTPStatus.NOT_FOUND, f"no snapshot for {key}")
        return HTTPStatus.OK, {"removed": True, "project": key.project, "work_item": key.work_item}

    def _prune(self, parts: list[str]) -> _Body:
        evicted = self.server.app.prune_snapshots()
        return HTTPStatus.OK, {"evicted": [snapshot_json(s) for s in evicted]}

    def _prune_jobs(self, parts: list[str]) -> _Body:
        """Retention now: 200 {"deleted": N} finished jobs older than retention_s."""
        return HTTPStatus.OK, {"deleted": self.server.app.prune_jobs()}

    def _health(self, parts: list[str]) -> _Body:
        ok, reason = self.server.app.health()
        if ok:
            return HTTPStatus.OK, {"ok": True, "reason": reason}
        # "error" too: every non-2xx body carries one, so clients need one rule.
        return HTTPStatus.SERVICE_UNAVAILABLE, {"ok": False, "reason": reason, "error": reason}

    def _metrics(self, parts: list[str]) -> _Body:
        return HTTPStatus.OK, self.server.app.metrics.exposition()
