"""A real supervisor on the MemoryEngine, served over loopback, for API and CLI tests.

The MemoryEngine runs no processes, so ``worker_policy`` plays the demo
worker's part: it pays "setup" once (a marker file that a commit carries into
the snapshot), prints what the real entrypoint prints, and exits with the code
the command asks for (``sh -c "exit N"``); ``sleep`` keeps it running until
it is stopped, which is how a test gets a job to cancel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actor_kit import kit_settings

from actors.api import ApiServer
from actors.app import Snapyard
from actors.engine.memory import MemoryContainer, MemoryEngine
from actors.settings import Settings

BASE_TAG = "snapyard-worker:latest"
MARKER = "/workspace/.snapyard-setup-done"
WAIT_S = 20.0


def worker_policy(engine: MemoryEngine) -> Callable[[MemoryContainer], int | None]:
    def policy(container: MemoryContainer) -> int | None:
        if MARKER in container.files:
            engine.append_logs(container.id, stdout="worker: snapshot reused, setup skipped\n")
        else:
            engine.write_file(container.id, MARKER, "")
            engine.append_logs(container.id, stdout="worker: setup starting (0s)\n")
        command = container.cmd or ()
        last = command[-1] if command else ""
        if last.startswith("exit "):
            return int(last.split()[1])
        if last.startswith("sleep") or (command and command[0] == "sleep"):
            return None
        engine.append_logs(container.id, stdout="job done\n")
        return 0

    return policy


def memory_engine() -> MemoryEngine:
    engine = MemoryEngine()
    engine.exit_policy = worker_policy(engine)
    engine.add_worker_image(BASE_TAG)
    return engine


def unit_settings(data_dir: Path, **sections: Any) -> Settings:
    settings = kit_settings(
        BASE_TAG,
        supervisor={"data_dir": str(data_dir), "tick_interval_s": 0.05},
        retry={"attempts": 3, "backoff_initial_s": 0.01, "backoff_max_s": 0.05},
        api={"host": "127.0.0.1", "port": 0, "token": ""},
    )
    return settings.replace(**sections)


@dataclass
class Served:
    app: Snapyard
    engine: MemoryEngine
    server: ApiServer
    settings: Settings

    @property
    def url(self) -> str:
        return self.server.url

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a CLI run that reaches this server (and nothing else)."""
        env = {"SNAPYARD_API": f"127.0.0.1:{self.server.port}"}
        if self.settings.api.token:
            env["SNAPYARD_API_TOKEN"] = self.settings.api.token
        env.update(extra or {})
        return env


@contextlib.contextmanager
def served(
    data_dir: Path,
    engine: MemoryEngine | None = None,
    server_options: Mapping[str, Any] | None = None,
    **sections: Any,
) -> Iterator[Served]:
    """A started Snapyard and its API; ``server_options`` go to ``ApiServer``."""
    settings = unit_settings(data_dir, **sections)
    engine = engine or memory_engine()
    app = Snapyard(settings, engine=engine)
    app.start()
    try:
        with ApiServer(app, settings.api, **dict(server_options or {})) as server:
            yield Served(app, engine, server, settings)
    finally:
        app.stop(timeout_s=10.0)
