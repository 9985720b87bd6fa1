"""The API under a connection flood and on keep-alive, with generous bounds.

Found in issue 12: 64 slow clients locked everyone out of the http.server
API, and every keep-alive request waited ~44 ms (Nagle meets delayed ACK).
The machine is shared and small, so the bounds are far from the typical
figures (a /healthz answers in about a millisecond; the flood bound is 1 s)
and the keep-alive figure is a median of many requests, which a scheduling
hiccup cannot move. Both were run beside a CPU hog (``yes > /dev/null``).
"""

from __future__ import annotations

import http.client
import resource
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from api_kit import Served, served

pytestmark = pytest.mark.slow

IDLE = 500
SLOW = 500
# One header byte every SLOW_BYTE_S on each slow connection; never a whole request.
SLOW_BYTE_S = 2.0
SLOW_ROUNDS = 3
HEALTHZ_BOUND_S = 1.0
KEEP_ALIVE_BOUND_S = 0.005
PARTIAL_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: snapyard\r\nX-Slow: "


@pytest.fixture
def enough_descriptors() -> Iterator[None]:
    """Both ends of every connection live in this process: ~2 fds each, plus the rest."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * (IDLE + SLOW) + 512
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} < {wanted}: raise it (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def flooded(tmp_path: Path, enough_descriptors: None) -> Iterator[Served]:
    # The header timeout is the slowloris guard; here it must not end the
    # slow clients before the test is done holding them (it has its own test).
    with served(tmp_path, server_options={"header_timeout_s": 120.0}) as live:
        yield live


def healthz_seconds(live: Served) -> float:
    """One /healthz on a new connection: connect, ask, read, in seconds."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", live.server.port, timeout=10)
    try:
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    elapsed = time.monotonic() - started
    assert resp.status == 200, body
    return elapsed


def still_open(sock: socket.socket) -> bool:
    """True while the server has not closed the connection (nothing to read, no EOF)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def test_healthz_answers_within_1s_while_500_idle_and_500_slow_connections_are_held(
    flooded: Served,
) -> None:
    idle: list[socket.socket] = []
    slow: list[socket.socket] = []
    try:
        for _ in range(IDLE):
            idle.append(socket.create_connection(("127.0.0.1", flooded.server.port), timeout=10))
        for _ in range(SLOW):
            sock = socket.create_connection(("127.0.0.1", flooded.server.port), timeout=10)
            sock.sendall(PARTIAL_REQUEST)
            slow.append(sock)
        # Untimed: the server may still be accepting the flood (it sits in the
        # listen backlog); the claim is about holding it, so time from here.
        healthz_seconds(flooded)
        timings: list[float] = []
        for round_ in range(SLOW_ROUNDS):
            for sock in slow:
                sock.sendall(b"x")  # one more header byte; the request never ends
            timings.append(healthz_seconds(flooded))
            if round_ < SLOW_ROUNDS - 1:
                # The clients' pace, not a wait for the server: it is what makes them slow.
                threading.Event().wait(SLOW_BYTE_S)
        assert max(timings) < HEALTHZ_BOUND_S, timings
        # Every one of the thousand is still held by the server, none refused.
        assert all(still_open(sock) for sock in idle + slow)
    finally:
        for sock in idle + slow:
            sock.close()


def test_a_second_keep_alive_request_takes_under_5ms(tmp_path: Path) -> None:
    """On /openapi.json, whose answer is ready-made: what is timed is the
    transport (the ~44 ms stall was Nagle's), not the actors a /healthz asks."""
    with served(tmp_path) as live:
        conn = http.client.HTTPConnection("127.0.0.1", live.server.port, timeout=10)
        try:
            conn.request("GET", "/openapi.json")
            conn.getresponse().read()  # the first: connection set-up
            timings = []
            for _ in range(41):
                started = time.monotonic()
                conn.request("GET", "/openapi.json")
                resp = conn.getresponse()
                resp.read()
                timings.append(time.monotonic() - started)
                assert resp.status == 200
        finally:
            conn.close()
    # A median of 41: a few requests delayed by the shared machine cannot move
    # it, a 40 ms Nagle stall on every request would.
    assert statistics.median(timings) < KEEP_ALIVE_BOUND_S, sorted(timings)
