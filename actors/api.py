"""The HTTP API: a thin JSON skin over the ``Snapyard`` facade.

It is built on the standard library's ``ThreadingHTTPServer`` on purpose: the
API is a handful of routes on loopback, and a framework would add a large
dependency for routing we can read in one screen. Each request runs on its
own thread and only calls the facade, which talks to the actors by message,
so a slow client never stalls the supervisor. This module owns the socket
and its threads; ``actors.api_routes`` answers each request.

Two rules matter for safety: a job's env never leaves the server (it is a
secret; the JSON shapes of ``actors.wire`` have no field for it), and an address other than
loopback is refused without a bearer token.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from http.server import ThreadingHTTPServer
from typing import Any

from actors.api_routes import Facade, RequestHandler
from actors.metrics import Metrics
from actors.settings import ApiSettings, SettingsError
from actors.supervisor import SupervisorStopped
from actors.wire import client_host

__all__ = [
    "ApiServer",
    "Facade",
    "check_bind_allowed",
    "is_loopback",
]

log = logging.getLogger(__name__)

# One thread per connection: bounded, or idle sockets could exhaust the process.
MAX_CONNECTIONS = 64


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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Restarting the supervisor must not wait for TIME_WAIT sockets to clear.
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: Facade | None, token: str) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, RequestHandler)
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

    @property
    def metrics(self) -> Metrics | None:
        return None if self._app is None else self._app.metrics


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
