"""``snapyard run`` as a child process: one cluster host's supervisor.

The cluster demo and the cluster tests run each host's supervisor exactly as
an operator would, as its own process configured by environment variables,
so killing a host is a real SIGKILL and its restart a real recovery.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from actors.client import ApiClient, ApiUnreachable
from actors.localcluster._process import free_port, log_tail, wait_until

__all__ = ["SupervisorProcess"]

_START_S = 60.0
_STOP_S = 30.0


class SupervisorProcess:
    """A supervisor with its own data dir and API port; ``env`` is its configuration."""

    def __init__(self, name: str, directory: Path, env: Mapping[str, str]) -> None:
        self.name = name
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.dir / "supervisor.log"
        self.env = {
            "SNAPYARD_API": f"127.0.0.1:{self.port}",
            "SNAPYARD_DATA_DIR": str(self.dir / "data"),
            "SNAPYARD_LOG__FORMAT": "json",
            **env,
        }
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def client(self, timeout_s: float = 10.0) -> ApiClient:
        return ApiClient(self.url, timeout_s=timeout_s)

    def start(self) -> None:
        """Start it and wait until its API answers /healthz."""
        if self.running:
            return
        with self.log.open("ab") as sink:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "actors.cli", "run"],
                env={**os.environ, **self.env},
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the demo's terminal is the demo's
            )
        client = self.client(timeout_s=2.0)
        wait_until(
            lambda: self._answers(client),
            _START_S,
            f"supervisor {self.name}",
            self._process,
            self.log,
        )

    @staticmethod
    def _answers(client: ApiClient) -> bool:
        try:
            return bool(client.health()[0])
        except ApiUnreachable:
            return False

    def kill(self) -> None:
        """SIGKILL: the host dies without a word, as on a power cut."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM: a clean shutdown (running jobs stay for the restart)."""
        self._signal(signal.SIGTERM)

    def _signal(self, sig: signal.Signals) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            process.wait(timeout=_STOP_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log, lines)

    def __enter__(self) -> SupervisorProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()
