"""The API server at the HTTP level: what the old ``http.server`` got wrong.

Each test reproduces one defect of issue 12 on raw sockets (so nothing in a
client library smooths it over) against a server with a fake facade.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import http.client
import json
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from test_api import FakeApp, raw
from uvicorn.server import ServerState
from waiting import eventually

from actors.api import ApiServer
from actors.api_health import HealthCache
from actors.api_protocol import OneWrite, protocol_class
from actors.api_routes import ApiApp
from actors.settings import ApiSettings, SentrySettings
from actors.telemetry import RecordingTransport, close_sentry, flush_sentry, setup_sentry

TOKEN = "t0ken-" + "y" * 20


@pytest.fixture
def fake() -> FakeApp:
    return FakeApp()


@pytest.fixture
def server(fake: FakeApp) -> Iterator[ApiServer]:
    with ApiServer(fake, ApiSettings(host="127.0.0.1", port=0), body_timeout_s=1.0) as srv:
        yield srv


def connect(server: ApiServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One whole response off a socket (Content-Length framed, as every answer here is)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def exchange(server: ApiServer, request: bytes) -> tuple[int, dict[str, str], Any]:
    with connect(server) as sock:
        sock.sendall(request)
        status, headers, body = read_response(sock)
    assert headers["content-type"].startswith("application/json"), (status, body)
    return status, headers, json.loads(body)


def test_unknown_routes_answer_401_before_404_when_a_token_is_set(fake: FakeApp) -> None:
    """Found in issue 12: an unknown path answered 404 before the token check."""
    with ApiServer(fake, ApiSettings(host="127.0.0.1", port=0, token=TOKEN)) as server:
        status, headers, body = raw(server, "GET", "/nope")
        assert status == 401
        assert headers["www-authenticate"] == 'Bearer realm="snapyard"'
        assert body["field"] is None
        status, _, body = raw(server, "GET", "/nope", headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 404
        assert body == {"error": "no such endpoint: /nope", "field": None}
        status, _, _ = raw(server, "GET", "/healthz")
        assert status == 200


def test_head_answers_like_get_without_a_body(server: ApiServer) -> None:
    """Found in issue 12: HEAD gave a 501."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("HEAD", "/healthz")
        resp = conn.getresponse()
        assert resp.read() == b""
        assert resp.status == 200
        assert int(resp.headers["Content-Length"]) > 0
        conn.request("GET", "/healthz")  # the same connection still serves
        assert json.loads(conn.getresponse().read())["ok"] is True
    finally:
        conn.close()


def test_the_servers_own_refusals_are_json(server: ApiServer) -> None:
    """Found in issue 12: the server's own 400/414/431 answers were HTML."""
    status, headers, body = exchange(server, b"NOT A REQUEST\r\n\r\n")
    assert status == 400
    assert body["error"].startswith("not a valid HTTP/1.1 request")
    assert body["field"] is None
    assert headers["connection"] == "close"
    big = b"X-Big: " + b"a" * 20_000 + b"\r\n"
    for end in (b"\r\n", b""):  # whole (the app measures) or unfinished (h11's limit)
        status, _, body = exchange(server, b"GET /jobs HTTP/1.1\r\nHost: x\r\n" + big + end)
        assert status == 431
        assert body == {"error": "the request headers are too large", "field": None}
    status, _, body = exchange(
        server, b"GET /jobs/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert status == 414
    assert body["error"] == "the request target is over 8192 bytes"
    status, _, body = exchange(server, b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 400  # h11 takes only ASCII in a request target
    assert body["field"] is None


def test_conflicting_content_lengths_are_refused(server: ApiServer, fake: FakeApp) -> None:
    """Found in issue 12: a duplicate Content-Length was accepted (request
    smuggling behind a proxy that reads the other one). Identical copies are
    one value (RFC 9110, 8.6), so only conflicting ones can smuggle."""
    body = b'{"project": "p", "work_item": "w"}'
    request = (
        b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nContent-Length: 5\r\n\r\n" + body
    )
    status, _, answer = exchange(server, request)
    assert status == 400
    assert "Content-Length" in answer["error"]
    assert fake.submitted == []


def test_a_short_body_is_408_after_the_body_timeout_not_a_500(server: ApiServer) -> None:
    """Found in issue 12: a body shorter than its Content-Length gave a 500 after 30 s."""
    request = (
        b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{"
    )
    status, headers, body = exchange(server, request)
    assert status == 408
    assert body["error"].startswith("the body did not arrive within 1s")
    assert headers["connection"] == "close"


def test_http_10_keep_alive_clients_get_an_answer_and_an_end(server: ApiServer) -> None:
    """Found in issue 12: HTTP/1.0 keep-alive clients hung."""
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, _, body = read_response(sock)
        assert status == 200
        assert json.loads(body)["ok"] is True


def test_an_early_disconnect_is_no_error_and_no_sentry_event(
    server: ApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Found in issue 12: a client that left early became an ERROR and a Sentry event."""
    transport = RecordingTransport()
    setup_sentry(SentrySettings(dsn="https://public@127.0.0.1/1"), transport=transport)
    try:
        with caplog.at_level(logging.DEBUG):
            for request in (
                b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"pro',
                b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET /jobs HTTP/1.1\r\nHo",
            ):
                sock = connect(server)
                sock.sendall(request)
                # RST instead of FIN: the rudest way to leave.
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                sock.close()
            # The server is still there and answers; by now it has seen all three go.
            assert raw(server, "GET", "/healthz")[0] == 200
        flush_sentry(2.0)
    finally:
        close_sentry()
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert transport.events == []


def test_slow_headers_are_cut_off_after_the_header_timeout(fake: FakeApp) -> None:
    """A client that trickles its headers (slowloris) is closed; others are served."""
    with (
        ApiServer(fake, ApiSettings(host="127.0.0.1", port=0), header_timeout_s=0.5) as server,
        connect(server) as slow,
    ):
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        assert raw(server, "GET", "/healthz")[0] == 200
        slow.settimeout(10)
        assert slow.recv(1024) == b""  # closed by the server, well before 10 s


def test_a_kept_alive_connection_waits_for_its_next_request_but_not_for_a_trickle(
    fake: FakeApp,
) -> None:
    """The header timeout runs from a request's first byte, not from the last answer:
    an idle keep-alive connection is uvicorn's keep-alive timeout's to close."""
    with (
        ApiServer(fake, ApiSettings(host="127.0.0.1", port=0), header_timeout_s=0.5) as server,
        connect(server) as sock,
    ):
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200
        sock.settimeout(1.5)  # three header timeouts of quiet: still open
        with pytest.raises(TimeoutError):
            sock.recv(1024)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")  # then a trickle begins
        sock.settimeout(10)
        assert sock.recv(1024) == b""


def healthz_status(server: ApiServer) -> int:
    try:
        return raw(server, "GET", "/healthz")[0]
    except (ConnectionError, http.client.HTTPException):
        return -1


def test_connections_past_the_cap_are_closed_at_once(fake: FakeApp) -> None:
    with ApiServer(fake, ApiSettings(host="127.0.0.1", port=0), max_connections=3) as server:
        held = [connect(server) for _ in range(3)]
        try:
            for sock in held:  # each one is served, so each one is accepted
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_response(sock)[0] == 200
            with connect(server) as extra, contextlib.suppress(ConnectionResetError):
                extra.settimeout(10)
                assert extra.recv(1024) == b""  # aborted (or reset): not served
            held.pop().close()
            # Once the server has seen that one go, there is room again.
            eventually(lambda: healthz_status(server), lambda s: s == 200, "a free slot")
        finally:
            for sock in held:
                sock.close()


def test_openapi_document_lists_every_route_and_the_error_shape(server: ApiServer) -> None:
    status, _, doc = raw(server, "GET", "/openapi.json")
    assert status == 200
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {
        "/jobs",
        "/jobs/prune",
        "/jobs/{id}",
        "/jobs/{id}/logs",
        "/snapshots",
        "/snapshots/prune",
        "/snapshots/{project}/{work_item}",
        "/hosts",
        "/healthz",
        "/metrics",
        "/events",
        "/openapi.json",
    }
    assert doc["components"]["schemas"]["Error"]["required"] == ["error", "field"]
    submit = doc["paths"]["/jobs"]["post"]["responses"]
    assert {"201", "400", "401", "411", "413", "422", "500", "503"} <= set(submit)


def test_a_keep_alive_connection_serves_many_requests_on_one_socket(server: ApiServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        for _ in range(5):
            conn.request("GET", "/healthz")
            resp = conn.getresponse()
            assert resp.status == 200
            resp.read()
    finally:
        conn.close()


def test_stop_ends_while_a_client_holds_a_connection(fake: FakeApp) -> None:
    server = ApiServer(fake, ApiSettings(host="127.0.0.1", port=0)).start()
    held = connect(server)
    try:
        done = threading.Event()
        stopper = threading.Thread(target=lambda: (server.stop(), done.set()))
        stopper.start()
        assert done.wait(15.0), "stop() must not wait on an idle client"
    finally:
        held.close()


def test_attaching_the_app_freezes_the_startup_heap(fake: FakeApp) -> None:
    """Found profiling /healthz under wrk -c50: full collections of the started
    supervisor's ~46,000 objects held the GIL 25-36 ms about once a second, and
    were the p99. ``snapyard run`` attaches its app once it runs, so attach is
    where the heap is frozen; without it every object here stays collectable."""
    gc.unfreeze()
    long_lived = {"built": "while starting"}
    try:
        with ApiServer(None, ApiSettings(host="127.0.0.1", port=0)) as server:
            assert gc.get_freeze_count() == 0
            server.attach(fake)
            assert gc.get_freeze_count() > 0
            assert not any(obj is long_lived for obj in gc.get_objects())  # frozen: not walked
            assert raw(server, "GET", "/healthz")[0] == 200
    finally:
        gc.unfreeze()  # this test process's garbage is collected again


class WriteRecorder(asyncio.Transport):
    """A connection's far end that keeps every write() as it was made."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8750)}.get(
            name, default
        )


def test_a_response_leaves_in_one_write(fake: FakeApp) -> None:
    """Found profiling /healthz under wrk -c50: uvicorn wrote each answer's head
    and body separately, two send() calls and two segments (TCP_NODELAY) each,
    a fifth of the event loop's time. The whole answer is one write now."""

    async def two_requests() -> list[bytes]:
        config = uvicorn.Config(
            ApiApp(fake, ""), http=protocol_class(10.0, 100), lifespan="off", log_config=None
        )
        config.load()
        protocol = config.http_protocol_class(
            config=config, server_state=ServerState(), app_state={}
        )
        transport = WriteRecorder()
        protocol.connection_made(transport)
        for path in (b"/healthz", b"/jobs/none"):
            answered = len(transport.writes)
            protocol.data_received(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(10):  # the answer is complete, however many writes
                while len(transport.writes) == answered or not protocol.cycle.response_complete:
                    await asyncio.sleep(0.001)
        protocol.connection_lost(None)
        return transport.writes

    writes = asyncio.run(two_requests())
    assert len(writes) == 2, writes
    assert writes[0].startswith(b"HTTP/1.1 200 ")
    assert writes[0].endswith(b'"ok": true, "reason": "engine answers; actors alive"}\n')
    assert writes[1].startswith(b"HTTP/1.1 404 ")
    assert writes[1].endswith(b'"field": "id"}\n')


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_probe_storm_is_answered_from_a_recent_check_without_waiting_on_one(
    server: ApiServer, fake: FakeApp
) -> None:
    """Found profiling /healthz under wrk -c50: every check crossed three threads
    (pool, supervisor, back), and probes queued behind the slow ones made the p99.
    An answer serves every probe for a second; at half that, a probe starts a
    fresh check in the background; older than a second, a probe waits for one."""
    clock = FakeClock()
    server.app.health_cache = HealthCache(ttl_s=1.0, clock=clock)
    with contextlib.closing(
        http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    ) as conn:

        def probe() -> int:
            conn.request("GET", "/healthz")
            resp = conn.getresponse()
            resp.read()
            return resp.status

        assert probe() == 200
        assert fake.health_checks == 1
        fake.healthy = (False, "engine unreachable")
        clock.now = 0.4
        assert [probe() for _ in range(50)] == [200] * 50  # one check, none waited on
        assert fake.health_checks == 1
        clock.now = 0.6  # half the TTL: answered at once, a check starts behind it
        assert probe() == 200
        eventually(lambda: fake.health_checks, lambda n: n == 2, "a refresh in the background")
        eventually(probe, lambda status: status == 503, "the refreshed answer")
        fake.healthy = (True, "engine answers; actors alive")
        clock.now = 1.7  # the last check (started at 0.6) is over a second old: wait for one
        assert probe() == 200
        assert fake.health_checks == 3


def test_a_large_answer_is_not_held_back_from_flow_control(fake: FakeApp) -> None:
    """What one response writes is held only up to 64 KiB: past that it leaves,
    so a stream's large backlog meets the transport's pause_writing."""

    async def big_answer() -> list[bytes]:
        transport = WriteRecorder()
        loop = asyncio.get_running_loop()
        one = OneWrite(transport, loop)
        one.write(b"h" * 100)
        assert transport.writes == []  # held until the answer is complete
        for _ in range(3):
            one.write(b"x" * 40_000)
        assert [len(w) for w in transport.writes] == [80_100]
        one.close()
        return transport.writes

    writes = asyncio.run(big_answer())
    assert [len(w) for w in writes] == [80_100, 40_000]
