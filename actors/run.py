"""``snapyard run``: one process's life around the application.

Start, serve until SIGTERM/SIGINT, stop gracefully, and turn how it went into
an exit code; the application itself (``actors.app``) knows nothing of
signals or processes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from types import FrameType

from actors.app import Snapyard, SnapyardError
from actors.settings import Settings
from actors.telemetry import install_thread_dump_signal, setup_logging, setup_sentry

__all__ = ["run_forever"]

log = logging.getLogger("actors.app")


def run_forever(
    settings: Settings,
    drain: bool = False,
    *,
    container_labels: Mapping[str, str] | None = None,
    on_started: Callable[[Snapyard], None] | None = None,
) -> int:
    """``snapyard run``: start, serve until SIGTERM/SIGINT, stop gracefully; the exit code.

    The first signal stops within ``shutdown_timeout_s`` and returns 0; a
    second one exits at once (130). 1 when the supervisor gave up, 2 when it
    could not start.
    """
    app = Snapyard(settings, container_labels=container_labels)
    setup_logging(settings.log, secrets=app.secrets)
    setup_sentry(settings.sentry, secrets=app.secrets)
    install_thread_dump_signal()
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop_requested.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(130)
        log.info("%s: stopping (drain=%s)", signal.Signals(signum).name, drain)
        stop_requested.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            app.start()
        except SnapyardError as exc:
            log.error("%s", exc)
            return 2
        if on_started is not None:
            on_started(app)  # e.g. the CLI hands the running facade to its API server
        # A bounded wait keeps the main thread returning to Python, where
        # signal handlers run.
        while not stop_requested.wait(0.5):
            if app.failed.is_set():
                break
        # --drain waits as long as the running jobs take (a second signal cuts it short).
        app.stop(drain=drain, timeout_s=None if drain else settings.supervisor.shutdown_timeout_s)
        return 1 if app.failed.is_set() else 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
