"""The API's routes and the ASGI application that dispatches to them.

Routing is on the raw path, split before decoding: a work item may contain an
encoded "/" (``/snapshots/p/a%2Fb``), which Starlette's router would see
decoded and match wrongly. The token is checked before routing, so an unknown
path says nothing to a caller without it. Every facade call blocks (it asks
an actor), so it runs on the thread pool, never on the event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote

import pykka
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from actors.api_health import HealthCache
from actors.api_http import (
    BODY_TIMEOUT_S,
    JSON_TYPE,
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    MAX_TARGET_BYTES,
    Call,
    HttpError,
    authorized,
    error_body,
    json_response,
    read_json,
)
from actors.api_schema import openapi_json
from actors.api_streams import ChangeFeed, Followers, event_stream, log_stream
from actors.cluster.member import RunsElsewhere, SnapshotElsewhere
from actors.engine.base import Engine
from actors.metrics import CONTENT_TYPE, Metrics
from actors.model import InvalidJob, Job, JobSpec, JobState, Snapshot, SnapshotKey
from actors.outage import StoreOutage
from actors.settings import Settings
from actors.store.base import StoreUnavailable
from actors.store.cluster import HostInfo
from actors.supervisor import SupervisorStopped
from actors.telemetry import capture_error
from actors.wire import WireError, host_json, job_json, snapshot_json, spec_from_json

__all__ = ["MAX_BODY_BYTES", "MAX_LIST_LIMIT", "ApiApp", "ChangeLog", "Facade"]

# The API's log lines keep one logger name, whichever module writes them.
log = logging.getLogger("actors.api")

MAX_LIST_LIMIT = 1000
# Routes whose answer reads the job store: one that succeeds ends an outage.
_STORE_ROUTES = ("/jobs", "/hosts", "/events")


class ChangeLog(Protocol):
    """The job store's state-change history, as ``GET /events`` reads it."""

    def changes(self, after: int, limit: int = 500) -> list[tuple[int, str, JobState, float]]: ...

    def last_change(self) -> int: ...


class Facade(Protocol):
    """What the API needs from ``actors.app.Snapyard``; tests can pass a fake."""

    # The app's metrics: /metrics serves their registry, requests are counted there.
    @property
    def metrics(self) -> Metrics: ...

    # A submission may name only a configured agent type ([agent_types.NAME]).
    @property
    def settings(self) -> Settings: ...

    # Following a job's output reads the engine; /events reads the store's history.
    @property
    def engine(self) -> Engine: ...

    @property
    def store(self) -> ChangeLog: ...

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

    # A cluster's hosts ([] on a single host); their times are wall-clock seconds.
    def hosts(self) -> list[HostInfo]: ...


_Answer = Response | tuple[int, Any]
_Route = Callable[["ApiApp", Call, Facade], Awaitable[_Answer]]


def _unprocessable(exc: InvalidJob | WireError) -> HttpError:
    if isinstance(exc, WireError):
        return HttpError(HTTPStatus.UNPROCESSABLE_ENTITY, exc.message, exc.field)
    return HttpError(HTTPStatus.UNPROCESSABLE_ENTITY, f"{exc.field} {exc.problem}", exc.field)


def check_agent_type(spec: JobSpec, settings: Settings) -> None:
    """Refuse an agent type with no ``[agent_types.NAME]`` table (``default`` needs none).

    A project is only a name, so an unknown one runs (unless
    ``supervisor.allow_unknown_projects`` is false). An agent type exists to
    pick an image and limits: one without a table would run silently on the
    defaults, which is what a typo (``--agent-type reveiw``) looks like.
    """
    name = spec.agent_type
    if name == "default" or name in settings.agent_types:
        return
    known = ", ".join(["default", *sorted(set(settings.agent_types) - {"default"})])
    raise InvalidJob(
        "agent_type",
        f"{name!r} is not a configured agent type: add an [agent_types.{name}] table to the "
        f"configuration (an empty one runs it on the defaults); known agent types: {known}",
    )


async def _job_or_404(app: Facade, job_id: str) -> Job:
    job = await run_in_threadpool(app.get, job_id)
    if job is None:
        raise HttpError(HTTPStatus.NOT_FOUND, f"no job with id {job_id!r}", "id")
    return job


class ApiApp:
    """The ASGI application: token, routing, errors and metrics around the routes.

    ``facade`` is None while the supervisor starts: every endpoint answers 503
    "starting" until ``attach``. ``close`` ends the open streams (follow,
    events), so a server stop does not wait for their clients.
    """

    def __init__(
        self, facade: Facade | None, token: str, body_timeout_s: float = BODY_TIMEOUT_S
    ) -> None:
        self.facade = facade
        self.token = token
        self.body_timeout_s = body_timeout_s
        self.closing = threading.Event()
        self.followers = Followers()
        self._feed: ChangeFeed | None = None
        self.health_cache = HealthCache()
        self.outage = StoreOutage("api", log)

    def close(self) -> None:
        self.closing.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off; websockets are not served
            return
        request = Request(scope, receive)
        call = Call(request, [], {}, self.body_timeout_s)
        try:
            try:
                response = await self._answer(call)
            except ClientDisconnect:
                return  # the client went away mid-body: nobody to answer, nothing to report
            except HttpError as exc:
                response = json_response(
                    exc.status, error_body(exc.message, exc.field), exc.headers
                )
            except SupervisorStopped as exc:
                response = json_response(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    error_body(f"the supervisor is not running: {exc}"),
                )
            except (pykka.ActorDeadError, pykka.Timeout) as exc:
                # The supervisor is stopping or stuck: a retryable condition for the client.
                log.warning("api: %s %s: supervisor unavailable: %s", call.method, call.route, exc)
                response = json_response(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    error_body(f"the supervisor is not answering: {exc or type(exc).__name__}"),
                )
            except StoreUnavailable as exc:
                # The database is away (a cluster's PostgreSQL): retryable, and its
                # message already says where and what to do. Logged once (actors.outage).
                self.outage.lost(exc)
                response = json_response(HTTPStatus.SERVICE_UNAVAILABLE, error_body(str(exc)))
            except Exception as exc:
                log.exception("api: %s %s failed", call.method, call.route)
                capture_error(
                    exc, source="api", extras={"method": call.method, "route": call.route}
                )
                response = json_response(
                    HTTPStatus.INTERNAL_SERVER_ERROR,
                    error_body(f"internal error ({type(exc).__name__}); see the supervisor's log"),
                )
            if response.status_code < 500 and call.route.startswith(_STORE_ROUTES):
                self.outage.answered()  # a 404 from the store is an answer too
            if self.facade is not None:  # None until attached: no registry to count in yet
                # Counted before the answer leaves: a client that reads it sees the count.
                labels = {"route": call.route, "method": call.method}
                self.facade.metrics.api_requests.labels(**labels).inc()
            if not call.body_read and call.declares_body():
                # An unread body would be read as the next request: end the connection.
                response.headers["Connection"] = "close"
            await response(scope, receive, send)
        except (ClientDisconnect, OSError):
            return  # gone while we answered: not an error of ours

    async def _answer(self, call: Call) -> Response:
        scope = call.request.scope
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query_string: bytes = scope["query_string"]
        if len(raw_path) + len(query_string) > MAX_TARGET_BYTES:
            raise HttpError(
                HTTPStatus.REQUEST_URI_TOO_LONG,
                f"the request target is over {MAX_TARGET_BYTES} bytes",
            )
        if sum(len(k) + len(v) + 4 for k, v in scope["headers"]) > MAX_HEADER_BYTES:
            raise HttpError(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "the request headers are too large"
            )
        if raw_path.strip(b"/") != b"healthz":
            authorized(call.request, self.token)
        text = raw_path.decode("latin-1")
        try:
            # Split before decoding: a work item may contain an encoded "/".
            call.parts = [unquote(p, errors="strict") for p in text.strip("/").split("/")]
        except UnicodeDecodeError:
            raise HttpError(HTTPStatus.BAD_REQUEST, "the path is not valid UTF-8") from None
        try:
            call.query = parse_qs(
                query_string.decode("latin-1"), keep_blank_values=True, errors="strict"
            )
        except UnicodeDecodeError:
            raise HttpError(HTTPStatus.BAD_REQUEST, "the query is not valid UTF-8") from None
        call.route, routes = _routes(call.parts, text)
        facade = self.facade
        if facade is None:
            raise SupervisorStopped("the supervisor is still starting")
        method = "GET" if call.method == "HEAD" else call.method
        route = routes.get(method)
        if route is None:
            allowed = ", ".join(sorted(routes))
            raise HttpError(
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"{call.method} is not allowed on {text}; allowed: {allowed}",
                headers={"Allow": allowed},
            )
        answer = await route(self, call, facade)
        if isinstance(answer, Response):
            return answer
        status, body = answer
        if isinstance(body, bytes):  # only /metrics answers with anything but JSON
            return Response(body, status_code=status, media_type=CONTENT_TYPE)
        return json_response(status, body)

    # --- routes ------------------------------------------------------------

    async def submit(self, call: Call, app: Facade) -> _Answer:
        try:
            spec = spec_from_json(await read_json(call))
            check_agent_type(spec, app.settings)
        except (WireError, InvalidJob) as exc:
            raise _unprocessable(exc) from None
        try:
            job = await run_in_threadpool(app.submit, spec)
        except InvalidJob as exc:  # e.g. an unknown project when those are refused
            raise _unprocessable(exc) from None
        return HTTPStatus.CREATED, job_json(job)

    async def list_jobs(self, call: Call, app: Facade) -> _Answer:
        unknown = sorted(set(call.query) - {"state", "project", "limit"})
        if unknown:
            raise HttpError(
                HTTPStatus.UNPROCESSABLE_ENTITY,
                f"unknown query parameter {unknown[0]!r}; known: state, project, limit",
                unknown[0],
            )
        raw_state = call.one("state") or None
        state: JobState | None = None
        if raw_state is not None:
            try:
                state = JobState(raw_state)
            except ValueError:
                raise HttpError(
                    HTTPStatus.UNPROCESSABLE_ENTITY,
                    f"state {raw_state!r} is not one of {', '.join(s.value for s in JobState)}",
                    "state",
                ) from None
        raw_limit = call.one("limit")
        limit = 100
        if raw_limit is not None:
            try:
                limit = int(raw_limit)
            except ValueError:
                limit = -1
            if not 1 <= limit <= MAX_LIST_LIMIT:
                raise HttpError(
                    HTTPStatus.UNPROCESSABLE_ENTITY,
                    f"limit {raw_limit!r} must be a whole number from 1 to {MAX_LIST_LIMIT}",
                    "limit",
                )
        project = call.one("project") or None
        jobs = await run_in_threadpool(app.jobs, state, project, limit)
        return HTTPStatus.OK, {"jobs": [job_json(j) for j in jobs]}

    async def get_job(self, call: Call, app: Facade) -> _Answer:
        return HTTPStatus.OK, job_json(await _job_or_404(app, call.parts[1]))

    async def job_logs(self, call: Call, app: Facade) -> _Answer:
        follow = call.one("follow")
        if follow not in (None, "true", "false"):
            raise HttpError(
                HTTPStatus.UNPROCESSABLE_ENTITY,
                f"follow {follow!r} must be true or false",
                "follow",
            )
        job = await _job_or_404(app, call.parts[1])
        if follow == "true":
            return log_stream(app, job, self.followers, self.closing, head=call.method == "HEAD")
        return HTTPStatus.OK, {"id": job.id, "state": str(job.state), "logs": job.logs_tail}

    async def cancel(self, call: Call, app: Facade) -> _Answer:
        job = await _job_or_404(app, call.parts[1])
        if job.state.terminal:
            raise HttpError(
                HTTPStatus.CONFLICT, f"job {job.id} already ended ({job.state}); nothing to cancel"
            )
        try:
            cancelled = await run_in_threadpool(app.cancel, job.id)
        except RunsElsewhere as exc:  # handed to the host that runs it: say which
            return HTTPStatus.ACCEPTED, {
                **job_json(exc.job),
                "cancel_handed_to": {"host": exc.host, "api": exc.api},
            }
        if cancelled is None:  # removed between the two calls
            raise HttpError(HTTPStatus.NOT_FOUND, f"no job with id {job.id!r}", "id")
        return HTTPStatus.OK, job_json(cancelled)

    async def list_snapshots(self, call: Call, app: Facade) -> _Answer:
        snaps = sorted(await run_in_threadpool(app.snapshots), key=lambda s: s.key)
        return HTTPStatus.OK, {"snapshots": [snapshot_json(s) for s in snaps]}

    async def remove_snapshot(self, call: Call, app: Facade) -> _Answer:
        key = SnapshotKey(call.parts[1], call.parts[2])
        try:
            removed = await run_in_threadpool(app.remove_snapshot, key)
        except SnapshotElsewhere as exc:  # a cluster's: the listing shows it, on another host
            raise HttpError(HTTPStatus.NOT_FOUND, str(exc)) from None
        if not removed:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no snapshot for {key}")
        return HTTPStatus.OK, {"removed": True, "project": key.project, "work_item": key.work_item}

    async def prune_jobs(self, call: Call, app: Facade) -> _Answer:
        """Retention now: 200 {"deleted": N} finished jobs older than retention_s."""
        return HTTPStatus.OK, {"deleted": await run_in_threadpool(app.prune_jobs)}

    async def prune(self, call: Call, app: Facade) -> _Answer:
        evicted = await run_in_threadpool(app.prune_snapshots)
        return HTTPStatus.OK, {"evicted": [snapshot_json(s) for s in evicted]}

    async def list_hosts(self, call: Call, app: Facade) -> _Answer:
        hosts = await run_in_threadpool(app.hosts)
        now = time.time()
        return HTTPStatus.OK, {"hosts": [host_json(h, now) for h in hosts]}

    async def health(self, call: Call, app: Facade) -> _Answer:
        # From a check at most a second old: a probe storm never waits on one.
        ok, reason = await self.health_cache.answer(app.health)
        if ok:
            return HTTPStatus.OK, {"ok": True, "reason": reason}
        return HTTPStatus.SERVICE_UNAVAILABLE, {"ok": False, "reason": reason, **error_body(reason)}

    async def metrics(self, call: Call, app: Facade) -> _Answer:
        return HTTPStatus.OK, await run_in_threadpool(app.metrics.exposition)

    async def openapi(self, call: Call, app: Facade) -> _Answer:
        answer = Response(openapi_json(), media_type=JSON_TYPE)
        answer.headers["Cache-Control"] = "no-store"
        return answer

    async def events(self, call: Call, app: Facade) -> _Answer:
        unknown = sorted(set(call.query) - {"job"})
        if unknown:
            raise HttpError(
                HTTPStatus.UNPROCESSABLE_ENTITY,
                f"unknown query parameter {unknown[0]!r}; known: job",
                unknown[0],
            )
        raw_last = call.request.headers.get("last-event-id")
        after: int | None = None
        if raw_last is not None:
            if not raw_last.strip().isdigit():
                raise HttpError(
                    HTTPStatus.UNPROCESSABLE_ENTITY,
                    f"Last-Event-ID {raw_last!r} is not an event id this API sent",
                    "Last-Event-ID",
                )
            after = int(raw_last)
        if after is None:  # from now on: the cursor is taken before the job is read
            after = await run_in_threadpool(app.store.last_change)
        job_id = call.one("job")
        job = None if job_id is None else await _job_or_404(app, job_id)
        if self._feed is None:
            self._feed = ChangeFeed(lambda: self.facade.store.last_change() if self.facade else 0)
        return event_stream(app, self._feed, after, job, self.closing, head=call.method == "HEAD")


def _routes(parts: list[str], path: str) -> tuple[str, dict[str, _Route]]:
    match parts:
        case ["jobs"]:
            return "/jobs", {"GET": ApiApp.list_jobs, "POST": ApiApp.submit}
        case ["jobs", "prune"]:  # before /jobs/{id}: a job ID always starts "j-"
            return "/jobs/prune", {"POST": ApiApp.prune_jobs}
        case ["jobs", _]:
            return "/jobs/{id}", {"GET": ApiApp.get_job, "DELETE": ApiApp.cancel}
        case ["jobs", _, "logs"]:
            return "/jobs/{id}/logs", {"GET": ApiApp.job_logs}
        case ["snapshots"]:
            return "/snapshots", {"GET": ApiApp.list_snapshots}
        case ["snapshots", "prune"]:
            return "/snapshots/prune", {"POST": ApiApp.prune}
        case ["snapshots", _, _]:
            return "/snapshots/{project}/{work_item}", {"DELETE": ApiApp.remove_snapshot}
        case ["hosts"]:
            return "/hosts", {"GET": ApiApp.list_hosts}
        case ["healthz"]:
            return "/healthz", {"GET": ApiApp.health}
        case ["metrics"]:
            return "/metrics", {"GET": ApiApp.metrics}
        case ["events"]:
            return "/events", {"GET": ApiApp.events}
        case ["openapi.json"]:
            return "/openapi.json", {"GET": ApiApp.openapi}
    raise HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")
