"""The API's two streams: a job's output as it is written, and job state changes.

``GET /jobs/{id}/logs?follow=true`` reads the engine's followed log on a
thread of its own (a blocking read must not hold one of the pool's threads
for as long as a job runs), masks the job's secrets line by line and ends
once the job has ended. ``GET /events`` is server-sent events from the job
store's history: every state change the Supervisor writes has a sequence
number, which is the event id, so a client resumes with ``Last-Event-ID``.
One poller per server notices new changes for every subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from http import HTTPStatus
from typing import TYPE_CHECKING

import pykka
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response, StreamingResponse

from actors.api_http import HttpError
from actors.engine.base import ContainerMissing, Engine, EngineError
from actors.masking import mask_secrets
from actors.model import Job, JobState
from actors.store.base import StoreUnavailable
from actors.supervisor import SupervisorStopped
from actors.telemetry import capture_error
from actors.wire import iso_time

if TYPE_CHECKING:
    from actors.api_routes import Facade

__all__ = ["ChangeFeed", "Followers", "LineMasker", "event_stream", "log_stream"]

# How often a stream looks at the job or the store, and for the server closing.
POLL_S = 0.2
# A comment line this often keeps an idle event stream's proxies and clients awake.
HEARTBEAT_S = 15.0
MAX_FOLLOWERS = 64
# A line longer than this is let out unfinished (masked as far as it goes).
MAX_HELD_LINE = 64 * 1024
_PAGE = 500
log = logging.getLogger("actors.api")

# The supervisor stopping under an open stream (its store closed, its actors
# gone): the stream ends, as it does when the server stops.
_STOPPED = (SupervisorStopped, pykka.ActorDeadError, pykka.Timeout, sqlite3.ProgrammingError)


async def _guarded(stream: AsyncIterator[bytes], what: str) -> AsyncIterator[bytes]:
    """A stream that ends, instead of raising, once its answer has begun: after
    the status line, an error cannot become an HTTP error any more."""
    try:
        async for chunk in stream:
            yield chunk
    except _STOPPED as exc:
        log.info("api: %s ended: the supervisor stopped (%s)", what, type(exc).__name__)
    except StoreUnavailable as exc:  # a cluster's database away: expected, not a bug
        log.warning("api: %s ended: %s", what, exc)
    except Exception as exc:
        log.exception("api: %s failed", what)
        capture_error(exc, source="api", extras={"route": what})


_END = object()


class Followers:
    """Bounds the threads that follow logs: each holds one engine connection.

    ``check`` refuses at the limit before the response starts (a 503 needs a
    status line); the stream itself counts in and out, in a ``finally`` that
    runs however it ends.
    """

    def __init__(self, limit: int = MAX_FOLLOWERS) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self.limit = limit

    def check(self) -> None:
        with self._lock:
            if self.count >= self.limit:
                raise HttpError(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    f"{self.limit} jobs are being followed already; try again later",
                )

    @contextlib.contextmanager
    def following(self) -> Iterator[None]:
        with self._lock:
            self.count += 1
        try:
            yield
        finally:
            with self._lock:
                self.count -= 1


class LineMasker:
    """Masks a job's secrets in whole lines, so a secret split across two reads is
    still caught; a partial line waits for its end (or for the stream's)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = list(secrets)
        self._held = ""

    def feed(self, text: str) -> str:
        self._held += text
        cut = self._held.rfind("\n") + 1
        if cut == 0 and len(self._held) < MAX_HELD_LINE:
            return ""
        if cut == 0:
            cut = len(self._held)
        out, self._held = self._held[:cut], self._held[cut:]
        return mask_secrets(out, self._secrets)

    def flush(self) -> str:
        out, self._held = self._held, ""
        return mask_secrets(out, self._secrets)


async def _engine_output(
    engine: Engine, container_id: str, closing: threading.Event
) -> AsyncGenerator[str, None]:
    """The followed log, read on a thread of its own and handed over with back-pressure."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=16)
    stopped = threading.Event()
    opened: list[object] = []

    def hand_over(item: object) -> bool:
        future = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
        while not stopped.is_set():
            try:
                future.result(timeout=POLL_S)
                return True
            except FutureTimeout:
                continue
        future.cancel()
        return False

    def read() -> None:
        try:
            stream = engine.follow_logs(container_id)
            opened.append(stream)
            if stopped.is_set():
                stream.close()
            for chunk in stream:
                if not hand_over(chunk):
                    return
            hand_over(_END)
        except BaseException as exc:  # handed to the request, which decides
            hand_over(exc)

    thread = threading.Thread(target=read, name=f"snapyard-follow-{container_id[:12]}", daemon=True)
    thread.start()
    try:
        while not closing.is_set():
            try:
                item = await asyncio.wait_for(queue.get(), POLL_S)
            except TimeoutError:
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, str)
            yield item
    finally:
        stopped.set()
        for stream in opened:
            with contextlib.suppress(Exception):
                stream.close()  # type: ignore[attr-defined]


async def _until(
    app: Facade, job: Job, done: Callable[[Job], bool], closing: threading.Event
) -> Job:
    """The job once ``done(job)`` holds, looked at every POLL_S; as it is if closing."""
    while not done(job) and not closing.is_set():
        await asyncio.sleep(POLL_S)
        fresh = await run_in_threadpool(app.get, job.id)
        if fresh is None:
            return job
        job = fresh
    return job


def _started(job: Job) -> bool:
    return job.state.terminal or (job.state is JobState.RUNNING and job.container_id is not None)


async def _follow(
    app: Facade, job: Job, followers: Followers, closing: threading.Event
) -> AsyncIterator[bytes]:
    masker = LineMasker(job.spec.env.values())
    with followers.following():
        job = await _until(app, job, _started, closing)
        streamed = False
        if not job.state.terminal and job.container_id is not None:
            output = _engine_output(app.engine, job.container_id, closing)
            try:
                # aclosing: a client that leaves stops the reader thread now, not at GC.
                async with contextlib.aclosing(output):
                    async for text in output:
                        streamed = True
                        out = masker.feed(text)
                        if out:
                            yield out.encode()
            except ContainerMissing:
                pass  # removed before we got there: the stored tail tells it
            except EngineError as exc:
                yield f"\n[snapyard: following the output failed: {exc}]\n".encode()
            rest = masker.flush()
            if rest:
                yield rest.encode()
        job = await _until(app, job, lambda j: j.state.terminal, closing)
        if not streamed and job.state.terminal:
            yield job.logs_tail.encode()  # masked when it was stored


def log_stream(
    app: Facade, job: Job, followers: Followers, closing: threading.Event, head: bool
) -> Response:
    """``?follow=true``: the output as it is written, until the job ends."""
    media = "text/plain; charset=utf-8"
    if head:
        return Response(b"", media_type=media)
    followers.check()
    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
    stream = _guarded(_follow(app, job, followers, closing), "/jobs/{id}/logs?follow=true")
    return StreamingResponse(stream, headers=headers, media_type=media)


class ChangeFeed:
    """Wakes the event streams when the store has a newer change.

    One task polls ``last_change`` (a single indexed read) while anyone
    waits; each stream then reads its own page of changes from its cursor.
    """

    def __init__(self, last_change: Callable[[], int], poll_s: float = POLL_S / 2) -> None:
        self._last_change = last_change
        self._poll_s = poll_s
        self._latest = -1
        self._changed = asyncio.Event()
        self._waiting = 0
        self._task: asyncio.Task[None] | None = None

    async def wait_after(self, seq: int, timeout_s: float) -> bool:
        """Return once a change newer than ``seq`` exists (True), or after ``timeout_s``."""
        self._waiting += 1
        try:
            if self._task is None or self._task.done():
                self._task = asyncio.create_task(self._poll())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    while self._latest <= seq:
                        await self._changed.wait()
        finally:
            self._waiting -= 1
        return self._latest > seq

    async def _poll(self) -> None:
        while self._waiting > 0:
            try:
                latest = await run_in_threadpool(self._last_change)
            except Exception as exc:  # the store closed under us: the streams end on their own
                log.info("api: the event feed cannot read the store: %s", type(exc).__name__)
                await asyncio.sleep(self._poll_s)
                continue
            if latest != self._latest:
                self._latest = latest
                changed, self._changed = self._changed, asyncio.Event()
                changed.set()
            await asyncio.sleep(self._poll_s)


def _event(seq: int, job_id: str, state: JobState, at: float | None) -> bytes:
    data = json.dumps({"id": job_id, "state": state.value, "time": iso_time(at)})
    return f"id: {seq}\nevent: job\ndata: {data}\n\n".encode()


async def _events(
    app: Facade, feed: ChangeFeed, after: int, job: Job | None, closing: threading.Event
) -> AsyncIterator[bytes]:
    yield b"retry: 1000\n\n"
    cursor = after
    quiet = 0.0
    changed = True  # read once at the start: a resumed stream has history to replay
    while not closing.is_set():
        if changed:
            page = await run_in_threadpool(app.store.changes, cursor, _PAGE)
            for seq, job_id, state, at in page:
                cursor = seq
                if job is None or job_id == job.id:
                    yield _event(seq, job_id, state, at)
                    if job is not None and state.terminal:
                        return
            if len(page) == _PAGE:
                continue
            if job is not None and job.state.terminal:
                # It ended before the stream's cursor: say how, once, and end.
                yield _event(cursor, job.id, job.state, job.finished_at)
                return
            if page:
                quiet = 0.0
        if quiet >= HEARTBEAT_S:
            quiet = 0.0
            yield b": keep-alive\n\n"
        # A quiet stream reads nothing: only the feed's one poller asks the store.
        changed = await feed.wait_after(cursor, POLL_S * 2)
        quiet += POLL_S * 2


def event_stream(
    app: Facade,
    feed: ChangeFeed,
    after: int,
    job: Job | None,
    closing: threading.Event,
    head: bool,
) -> Response:
    """``GET /events``: server-sent events, one per job state change after ``after``."""
    media = "text/event-stream; charset=utf-8"
    if head:
        return Response(b"", media_type=media)
    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    stream = _guarded(_events(app, feed, after, job, closing), "/events")
    return StreamingResponse(stream, headers=headers, media_type=media)
