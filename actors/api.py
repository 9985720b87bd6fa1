"""The HTTP API server: uvicorn (h11) on its own thread, serving ``ApiApp``.

The API used to run on ``http.server``; under load and attack it could not
hold up (64 slow clients locked everyone out, every keep-alive request waited
~44 ms for Nagle and delayed ACK, a backlog of 5 made 50 clients retry for
seconds, a duplicate Content-Length was accepted). uvicorn's asyncio loop
holds thousands of idle connections for a few kilobytes each, sets
TCP_NODELAY, and h11 refuses ambiguous framing; ``actors.api_protocol`` adds
a header timeout and JSON refusals.

Two rules matter for safety: a job's env never leaves the server (it is a
secret; the JSON shapes of ``actors.wire`` have no field for it), and an
address other than loopback is refused without a bearer token.
"""

from __future__ import annotations

import gc
import ipaddress
import logging
import resource
import socket
import threading

import uvicorn

from actors.api_http import BODY_TIMEOUT_S
from actors.api_protocol import protocol_class
from actors.api_routes import ApiApp, Facade
from actors.settings import ApiSettings, SettingsError
from actors.wire import client_host

__all__ = [
    "ApiServer",
    "Facade",
    "check_bind_allowed",
    "freeze_startup_heap",
    "is_loopback",
    "raise_fd_limit",
]

log = logging.getLogger(__name__)

# Pending connections the kernel queues before we accept them (capped by somaxconn).
BACKLOG = 2048
# Open connections served at once; past it a new one is closed at accept.
MAX_CONNECTIONS = 4096
# A request's headers must arrive within this long (slowloris guard).
HEADER_TIMEOUT_S = 10.0
# An idle keep-alive connection is closed after this long.
KEEP_ALIVE_S = 30.0
# Streams (follow, events) end when the server stops; in-flight calls get this long.
GRACEFUL_STOP_S = 5.0
# File descriptors kept free for the store, the engine and logs when sizing connections.
_FD_RESERVE = 256


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


def raise_fd_limit(wanted: int = MAX_CONNECTIONS + _FD_RESERVE) -> int:
    """Raise this process's soft open-files limit towards ``wanted`` (never past
    the hard limit); return the soft limit now in force. Each connection is a
    descriptor, and the common default of 1024 is below MAX_CONNECTIONS."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def freeze_startup_heap() -> None:
    """Put every object alive now beyond the cyclic collector's reach (``gc.freeze``).

    Profiled under ``wrk -c50`` on ``/healthz``: full collections walked the
    ~46,000 objects of a started supervisor about once a second, 25-36 ms each
    with the GIL held, and were the p99 (20-24 ms). What exists once the
    supervisor runs (modules, actors, settings) lives as long as the process;
    after the freeze a full collection walks only what came later (~3,000).
    """
    gc.collect()  # garbage made while starting is freed, not frozen
    gc.freeze()


def _max_connections() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(64, min(MAX_CONNECTIONS, soft - _FD_RESERVE))


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY on accepted
    # sockets only when their proto says TCP. Without it every keep-alive
    # answer met Nagle and delayed ACK (~40 ms) again: measured, 1,000 req/s
    # instead of 4,000+.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        # Restarting the supervisor must not wait for TIME_WAIT sockets to clear.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class ApiServer:
    """The API on a background thread. ``port`` is the bound port (useful with port 0).

    The socket is bound in the constructor, so ``snapyard run`` learns that the
    port is taken before it starts any actor; ``attach`` hands over the facade
    once it runs (until then every endpoint answers 503 "starting").
    """

    def __init__(
        self,
        app: Facade | None,
        api: ApiSettings,
        *,
        header_timeout_s: float = HEADER_TIMEOUT_S,
        keep_alive_s: float = KEEP_ALIVE_S,
        body_timeout_s: float = BODY_TIMEOUT_S,
        max_connections: int | None = None,
    ) -> None:
        check_bind_allowed(api)
        self.host = api.host
        self._sock = _bind(api.host.strip("[]"), api.port)
        self.app = ApiApp(app, api.token, body_timeout_s)
        config = uvicorn.Config(
            self.app,
            http=protocol_class(header_timeout_s, max_connections or _max_connections()),
            loop="asyncio",
            lifespan="off",
            proxy_headers=False,  # no proxy in front: X-Forwarded-For is not trusted
            # The process's logging is ours (JSON, secrets scrubbed): uvicorn's
            # loggers propagate to it, and no access log repeats every request.
            log_config=None,
            access_log=False,
            server_header=False,
            headers=[("server", "snapyard")],
            backlog=BACKLOG,
            timeout_keep_alive=int(keep_alive_s) or 1,
            timeout_graceful_shutdown=int(GRACEFUL_STOP_S),
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def attach(self, app: Facade) -> None:
        """Serve ``app`` from now on. The serving process has built everything
        long-lived by then, so its heap is frozen here (``freeze_startup_heap``)."""
        freeze_startup_heap()
        self.app.facade = app

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        host = client_host(self.host)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def start(self) -> ApiServer:
        # Connections wait in the listen backlog until the loop accepts them.
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._sock]},
            name="snapyard-api",
            daemon=True,
        )
        self._thread.start()
        log.info("api: listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop accepting, end the open streams, let in-flight requests finish."""
        self.app.close()
        if self._thread is not None:
            self._server.should_exit = True
            self._thread.join(GRACEFUL_STOP_S + 5.0)
            if self._thread.is_alive():
                log.warning("api: the server thread did not stop in time")
            self._thread = None
        self._sock.close()

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
