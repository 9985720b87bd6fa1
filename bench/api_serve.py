"""Serve a real Snapyard (MemoryEngine, temp data dir) on loopback for a load tool.

``python -m bench.api_serve PORT`` serves until SIGTERM/SIGINT; point ``wrk``
or ``ab -k`` at ``/healthz``. The MemoryEngine keeps Docker out of the figure:
what is measured is the API stack plus one supervisor ask per request. The
server is bound first and the app attached once it runs, as ``snapyard run``
does (attaching freezes the startup heap, which the figure depends on).
"""

from __future__ import annotations

import signal
import sys
import tempfile
import threading

from actors.api import ApiServer
from actors.app import Snapyard
from actors.engine.memory import MemoryEngine
from actors.settings import Settings


def main(port: int) -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    engine = MemoryEngine()
    engine.add_worker_image("snapyard-worker:latest")
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings().replace(
            supervisor={"data_dir": data_dir},
            api={"host": "127.0.0.1", "port": port, "token": ""},
        )
        server = ApiServer(None, settings.api)
        app = Snapyard(settings, engine=engine).start()
        try:
            with server:
                server.attach(app)
                print(f"serving {server.url}", flush=True)
                stop.wait()
        finally:
            app.stop(timeout_s=10.0)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8751)
