"""Following a job's output and job state events, on a real supervisor (MemoryEngine).

A ``sleep`` job keeps its worker running until the test ends it through the
engine, so each test decides when output appears and when the job ends, and
checks that what was written arrived before the end: streamed, not replayed.
Reads wait on the socket (with a timeout), never on a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import logging
import queue
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from api_kit import WAIT_S, Served, served
from test_api import post_json, raw
from waiting import eventually

from actors.api_streams import _guarded
from actors.cli import main
from actors.client import ApiClient, JobEvent
from actors.model import Job, JobState
from actors.store import StoreUnavailable

SECRET = "hunter2-follow-secret"


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Served]:
    with served(tmp_path) as s:
        yield s


def submit(live: Served, **body: Any) -> str:
    status, _, job = post_json(live.server, "/jobs", {"project": "p", "work_item": "w", **body})
    assert status == 201, job
    return str(job["id"])


def running(live: Served, job_id: str) -> Job:
    """The job once its worker runs (the only way to know: ask until it says so)."""
    return eventually(
        lambda: live.app.get(job_id),
        lambda j: j is not None and j.state is JobState.RUNNING and j.container_id is not None,
        f"job {job_id} running",
        timeout_s=WAIT_S,
    )


class Reader:
    """A streamed response read on a thread; the test waits on its queue."""

    def __init__(self, live: Served, path: str, headers: dict[str, str] | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", live.server.port, timeout=WAIT_S)
        self.conn.request("GET", path, headers=headers or {})
        self.resp = self.conn.getresponse()
        self.chunks: queue.Queue[bytes | None] = queue.Queue()
        self.text = ""
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        try:
            while chunk := self.resp.read1(65536):
                self.chunks.put(chunk)
        except (OSError, ValueError, AttributeError, http.client.HTTPException):
            pass  # closed by the test (close()) while a read was waiting
        finally:
            self.chunks.put(None)

    def until(self, fragment: str) -> str:
        while fragment not in self.text:
            chunk = self.chunks.get(timeout=WAIT_S)
            assert chunk is not None, f"the stream ended before {fragment!r}: {self.text!r}"
            self.text += chunk.decode()
        return self.text

    def to_the_end(self) -> str:
        while (chunk := self.chunks.get(timeout=WAIT_S)) is not None:
            self.text += chunk.decode()
        return self.text

    def close(self) -> None:
        # shutdown first: it wakes the pump's blocked read, which holds the
        # response's lock that close() would otherwise wait on.
        if self.conn.sock is not None:
            with contextlib.suppress(OSError):
                self.conn.sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()


def test_follow_streams_output_as_written_masks_secrets_and_ends_with_the_job(
    live: Served,
) -> None:
    job_id = submit(live, command=["sleep", "60"], env={"API_TOKEN": SECRET})
    job = running(live, job_id)
    assert job.container_id is not None
    reader = Reader(live, f"/jobs/{job_id}/logs?follow=true")
    try:
        assert reader.resp.status == 200
        assert reader.resp.headers["Content-Type"].startswith("text/plain")
        reader.until("setup starting")
        live.engine.append_logs(job.container_id, stdout=f"step one token={SECRET}\n")
        assert "step one token=***\n" in reader.until("step one")
        # The secret split across two writes is still masked: lines go out whole.
        live.engine.append_logs(job.container_id, stdout=f"half {SECRET[:6]}")
        live.engine.append_logs(job.container_id, stdout=f"{SECRET[6:]} done\n")
        reader.until("half")
        assert live.app.get(job_id).state is JobState.RUNNING  # streamed, not replayed
        live.engine.exit_container(job.container_id, 0)
        text = reader.to_the_end()
    finally:
        reader.close()
    assert SECRET not in text
    assert SECRET[:6] not in text
    assert "half *** done\n" in text
    assert live.app.get(job_id).state is JobState.SUCCEEDED


def test_follow_of_a_finished_job_gives_its_stored_tail_and_ends(live: Served) -> None:
    job_id = submit(live, env={"API_TOKEN": SECRET})
    live.app.wait(job_id, WAIT_S)
    reader = Reader(live, f"/jobs/{job_id}/logs?follow=true")
    try:
        text = reader.to_the_end()
    finally:
        reader.close()
    assert "job done" in text


def test_follow_refuses_a_bad_value_and_an_unknown_job(live: Served) -> None:
    status, _, body = raw(live.server, "GET", "/jobs/nope/logs?follow=true")
    assert status == 404
    job_id = submit(live)
    status, _, body = raw(live.server, "GET", f"/jobs/{job_id}/logs?follow=yes")
    assert status == 422
    assert body["field"] == "follow"


def test_cli_follow_prints_the_output_and_exits_with_the_jobs_result(
    live: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in live.env().items():
        monkeypatch.setenv(name, value)
    job_id = submit(live, command=["sh", "-c", "exit 3"], env={"API_TOKEN": SECRET})
    out, err = io.StringIO(), io.StringIO()
    assert main(["job", job_id, "--logs", "--follow"], out=out, err=err) == 1
    assert "setup starting" in out.getvalue()
    assert f"job {job_id}: failed (exit code 3)" in err.getvalue()
    ok_id = submit(live, work_item="other")
    assert main(["job", ok_id, "--follow"], out=io.StringIO(), err=io.StringIO()) == 0


def events_of(live: Served, job_id: str, after: int | None = None) -> list[JobEvent]:
    return list(ApiClient(live.url).events(job_id, after))


def test_events_stream_every_state_change_of_a_job_as_it_happens(live: Served) -> None:
    reader = Reader(live, "/events", {"Accept": "text/event-stream"})
    try:
        assert reader.resp.headers["Content-Type"].startswith("text/event-stream")
        job_id = submit(live)
        text = reader.until('"state": "succeeded"')
    finally:
        reader.close()
    events = [block for block in text.split("\n\n") if block.startswith("id:")]
    parsed = []
    for block in events:
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        assert lines["event"] == "job"
        parsed.append((int(lines["id"]), json.loads(lines["data"])))
    assert [data["id"] for _, data in parsed] == [job_id] * len(parsed)
    states = [data["state"] for _, data in parsed]
    assert states[0] == "queued"
    assert states[-1] == "succeeded"
    assert "running" in states
    assert [seq for seq, _ in parsed] == sorted({seq for seq, _ in parsed})
    assert all(data["time"].endswith("Z") for _, data in parsed)


def test_events_resume_after_last_event_id_and_end_with_the_job(live: Served) -> None:
    job_id = submit(live)
    live.app.wait(job_id, WAIT_S)
    # A finished job: one event with its final state, then the stream ends.
    (final,) = events_of(live, job_id)
    assert final.state == "succeeded"
    # From the start of history, filtered to the job: its whole life, in order.
    history = events_of(live, job_id, after=0)
    assert history[0].state == "queued"
    assert history[-1].state == "succeeded"
    resumed = events_of(live, job_id, after=history[0].seq)
    assert resumed == history[1:]


def test_events_refuse_a_bad_last_event_id_and_an_unknown_job(live: Served) -> None:
    status, _, body = raw(live.server, "GET", "/events", headers={"Last-Event-ID": "abc"})
    assert status == 422
    assert body["field"] == "Last-Event-ID"
    status, _, body = raw(live.server, "GET", "/events?job=nope")
    assert status == 404


def test_cli_events_for_a_job_prints_its_states_and_exits_with_its_result(
    live: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in live.env().items():
        monkeypatch.setenv(name, value)
    job_id = submit(live, command=["sleep", "60"])
    job = running(live, job_id)
    out, err = io.StringIO(), io.StringIO()
    result: list[int] = []
    watcher = threading.Thread(
        target=lambda: result.append(main(["events", "--job", job_id, "--json"], out=out, err=err))
    )
    watcher.start()
    assert job.container_id is not None
    live.engine.exit_container(job.container_id, 2)
    watcher.join(WAIT_S)
    assert result == [1]
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[-1]["id"] == job_id
    assert lines[-1]["state"] == "failed"


def test_stopping_the_server_ends_open_streams(tmp_path: Path) -> None:
    with served(tmp_path) as live:
        job_id = submit(live, command=["sleep", "60"])
        running(live, job_id)
        follow = Reader(live, f"/jobs/{job_id}/logs?follow=true")
        events = Reader(live, "/events")
        follow.until("setup starting")
        live.server.stop()
        follow.to_the_end()
        events.to_the_end()


def test_the_supervisor_stopping_under_open_streams_is_no_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As ``snapyard run`` stops: the app (and its store) first, then the server."""
    with served(tmp_path) as live:
        job_id = submit(live, command=["sleep", "60"])
        running(live, job_id)
        follow = Reader(live, f"/jobs/{job_id}/logs?follow=true")
        events = Reader(live, "/events")
        follow.until("setup starting")
        events.until("retry:")
        with caplog.at_level(logging.INFO):
            live.app.stop(timeout_s=10.0)
            live.server.stop()
            follow.to_the_end()
            events.to_the_end()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_stream_the_store_outage_ends_is_a_warning_not_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression: a cluster's database away ended an /events stream with an ERROR
    and a traceback (and a Sentry event), as if it were a bug."""

    async def changes() -> AsyncIterator[bytes]:
        yield b"id: 1\n\n"
        raise StoreUnavailable("the cluster database db:5432/snapyard cannot be reached (x)")

    async def read() -> list[bytes]:
        return [chunk async for chunk in _guarded(changes(), "GET /events")]

    assert asyncio.run(read()) == [b"id: 1\n\n"]
    said = [(r.levelno, r.getMessage(), r.exc_info) for r in caplog.records]
    assert said == [
        (
            logging.WARNING,
            "api: GET /events ended: the cluster database db:5432/snapyard cannot be reached (x)",
            None,
        )
    ]
