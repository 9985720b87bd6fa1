"""The HTTP API: a thin JSON skin over the ``Snapyard`` facade.

It is built on the standard library's ``ThreadingHTTPServer`` on purpose: the
API is a handful of routes on loopback, and a framework would add a large
dependency for routing we can read in one screen. Each request runs on its
own thread and only calls the facade, which talks to the actors by message,
so a slow client never stalls the supervisor.

Two rules matter for safety: a job's env never leaves the server (it is a
secret; the JSON shape below has no field for it), and an address other than
loopback is refused without a bearer token.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import pykka

from actors.model import InvalidJob, Job, JobSpec, JobState, Snapshot, SnapshotKey, validate_spec
from actors.settings import ApiSettings, SettingsError
from actors.supervisor import SupervisorStopped
from actors.telemetry import METRICS, capture_error

__all__ = [
    "JOB_FIELDS",
    "MAX_BODY_BYTES",
    "SNAPSHOT_FIELDS",
    "ApiServer",
    "Facade",
    "check_bind_allowed",
    "client_host",
    "is_loopback",
    "iso_time",
    "job_json",
    "snapshot_json",
]

log = logging.getLogger(__name__)

# A job spec is a few kilobytes; env values are capped at 32 KiB each by the
# model, but nobody needs a megabyte. Refusing early keeps a bad client cheap.
MAX_BODY_BYTES = 1024 * 1024
MAX_CONNECTIONS = 64
MAX_LIST_LIMIT = 1000

# The stable JSON shapes, in order. Env is deliberately absent: it is a secret.
JOB_FIELDS = (
    "id",
    "state",
    "project",
    "work_item",
    "agent_type",
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
_SUBMIT_KEYS = frozenset({"project", "work_item", "agent_type", "command", "env", "timeout_s"})


class Facade(Protocol):
    """What the API needs from ``actors.app.Snapyard``; tests can pass a fake."""

    def submit(self, spec: JobSpec) -> Job: ...

    def get(self, job_id: str) -> Job | None: ...

    def jobs(
        self, state: JobState | None = None, project: str | None = None, limit: int = 100
    ) -> list[Job]: ...

    def cancel(self, job_id: str) -> Job | None: ...

    def snapshots(self) -> list[Snapshot]: ...

    def remove_snapshot(self, key: SnapshotKey) -> bool: ...

    def prune_snapshots(self) -> list[Snapshot]: ...

    def health(self) -> tuple[bool, str]: ...


def iso_time(ts: float | None) -> str | None:
    """Epoch seconds as ISO-8601 UTC (``...Z``): what every client can parse."""
    if ts is None:
        return None
    text = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def job_json(job: Job) -> dict[str, Any]:
    """The stable JSON shape of a job (API and ``--json``). Never includes env."""
    return {
        "id": job.id,
        "state": str(job.state),
        "project": job.spec.project,
        "work_item": job.spec.work_item,
        "agent_type": job.spec.agent_type,
        "image_id": job.image_id,
        "from_snapshot": job.from_snapshot,
        "snapshot_committed": job.snapshot_committed,
        "exit_code": job.exit_code,
        "error": job.error,
        "created_at": iso_time(job.created_at),
        "started_at": iso_time(job.started_at),
        "finished_at": iso_time(job.finished_at),
    }


def snapshot_json(snapshot: Snapshot) -> dict[str, Any]:
    """The stable JSON shape of a snapshot registry entry."""
    return {
        "project": snapshot.key.project,
        "work_item": snapshot.key.work_item,
        "image_id": snapshot.image_id,
        "tag": snapshot.tag,
        "base_image_id": snapshot.base_image_id,
        "size_bytes": snapshot.size_bytes,
        # What the snapshot adds over its parent: what snapshots.max_total_bytes counts.
        "own_bytes": snapshot.own_bytes,
        "layers": snapshot.layers,
        "created_at": iso_time(snapshot.created_at),
        "last_used_at": iso_time(snapshot.last_used_at),
    }


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; names are not resolved on purpose."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind_allowed(api: ApiSettings) -> None:
    """Refuse to listen beyond loopback without a token: anyone could run jobs."""
    if not api.token and not is_loopback(api.host):
        raise SettingsError(
            "api.host",
            api.host,
            "a non-loopback address needs a bearer token: set api.token or "
            "SNAPYARD_API_TOKEN, or listen on 127.0.0.1",
        )


def client_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to ``host``."""
    if host in ("", "0.0.0.0"):  # noqa: S104 - a wildcard bind is reached on loopback
        return "127.0.0.1"
    if host.strip("[]") == "::":
        return "::1"
    return host


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
_Route = Callable[["_Handler", list[str]], _Body]


def _one(query: Mapping[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise _HttpError(HTTPStatus.UNPROCESSABLE_ENTITY, f"{name} given more than once", name)
    return values[0]


class _Handler(BaseHTTPRequestHandler):
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
        route_name = "?"
        try:
            try:
                # Split before decoding: a work item may contain an encoded "/".
                parts = [unquote(p, errors="strict") for p in split.path.strip("/").split("/")]
            except UnicodeDecodeError:
                raise _HttpError(HTTPStatus.BAD_REQUEST, "the path is not valid UTF-8") from None
            route_name, routes = self._routes(parts)
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
            if isinstance(body, str):
                self._send(status, body.encode(), "text/plain; version=0.0.4; charset=utf-8")
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
        METRICS.inc("snapyard_api_requests_total", route=route_name, method=method)

    def _declares_body(self) -> bool:
        length = self.headers.get("Content-Length", "0").strip()
        return length not in ("", "0") or "Transfer-Encoding" in self.headers

    def _routes(self, parts: list[str]) -> tuple[str, dict[str, _Route]]:
        match parts:
            case ["jobs"]:
                return "/jobs", {"GET": _Handler._list_jobs, "POST": _Handler._submit}
            case ["jobs", _]:
                return "/jobs/{id}", {"GET": _Handler._get_job, "DELETE": _Handler._cancel}
            case ["jobs", _, "logs"]:
                return "/jobs/{id}/logs", {"GET": _Handler._job_logs}
            case ["snapshots"]:
                return "/snapshots", {"GET": _Handler._list_snapshots}
            case ["snapshots", "prune"]:
                return "/snapshots/prune", {"POST": _Handler._prune}
            case ["snapshots", _, _]:
                return "/snapshots/{project}/{work_item}", {"DELETE": _Handler._remove_snapshot}
            case ["healthz"]:
                return "/healthz", {"GET": _Handler._health}
            case ["metrics"]:
                return "/metrics", {"GET": _Handler._metrics}
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
        body = self._read_json()
        if not isinstance(body, dict):
            raise _HttpError(HTTPStatus.UNPROCESSABLE_ENTITY, "the body must be a JSON object")
        unknown = sorted(set(body) - _SUBMIT_KEYS)
        if unknown:
            raise _HttpError(
                HTTPStatus.UNPROCESSABLE_ENTITY,
                f"unknown field {unknown[0]!r}; known fields: {', '.join(sorted(_SUBMIT_KEYS))}",
                unknown[0],
            )
        for required in ("project", "work_item"):
            if required not in body:
                raise _HttpError(
                    HTTPStatus.UNPROCESSABLE_ENTITY, f"{required} is required", required
                )
        try:
            spec = validate_spec(
                project=body["project"],
                work_item=body["work_item"],
                agent_type=body.get("agent_type", "default"),
                command=body.get("command"),
                env=body.get("env"),
                timeout_s=body.get("timeout_s"),
            )
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

    def _health(self, parts: list[str]) -> _Body:
        ok, reason = self.server.app.health()
        if ok:
            return HTTPStatus.OK, {"ok": True, "reason": reason}
        # "error" too: every non-2xx body carries one, so clients need one rule.
        return HTTPStatus.SERVICE_UNAVAILABLE, {"ok": False, "reason": reason, "error": reason}

    def _metrics(self, parts: list[str]) -> _Body:
        return HTTPStatus.OK, METRICS.render()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Restarting the supervisor must not wait for TIME_WAIT sockets to clear.
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: Facade | None, token: str) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self._app = app
        self.token = token
        # One thread per connection: bounded, or idle sockets could exhaust the process.
        self._connections = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._connections.acquire(blocking=False):
            log.warning("api: %d connections open; refusing one more", MAX_CONNECTIONS)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    @property
    def app(self) -> Facade:
        if self._app is None:
            raise SupervisorStopped("the supervisor is still starting")
        return self._app


class ApiServer:
    """The API on a background thread. ``port`` is the bound port (useful with port 0).

    The socket is bound in the constructor, so ``snapyard run`` learns that the
    port is taken before it starts any actor; ``attach`` hands over the facade
    once it runs (until then every endpoint answers 503 "starting").
    """

    def __init__(self, app: Facade | None, api: ApiSettings) -> None:
        check_bind_allowed(api)
        self._server = _Server((api.host.strip("[]"), api.port), app, api.token)
        self._thread: threading.Thread | None = None
        self.host = api.host

    def attach(self, app: Facade) -> None:
        self._server._app = app

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = client_host(self.host)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def start(self) -> ApiServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="snapyard-api",
            daemon=True,
        )
        self._thread.start()
        log.info("api: listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop accepting requests; in-flight ones finish on their daemon threads."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
