"""A whole cluster on this machine: PostgreSQL, a registry, and N hosts.

Each host is an extra ``dockerd`` (its own data-root, exec-root, pidfile and
socket) with a ``snapyard run`` process on it, configured by environment
variables exactly as an operator would configure a real host. The cluster
demo tells its story on one; the cluster tests break one in every way they
can. ``close()`` removes everything: processes, daemons, dirs.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from actors.engine.docker import DockerEngine
from actors.localcluster.dockerd import LocalDockerd
from actors.localcluster.postgres import LocalPostgres
from actors.localcluster.registry import LocalRegistry
from actors.localcluster.supervisor_process import SupervisorProcess

__all__ = ["ClusterHost", "LocalCluster"]

# Short leases so a dead host's work moves within seconds, not minutes.
DEMO_TIMINGS = {
    "SNAPYARD_CLUSTER__HEARTBEAT_S": "0.5",
    "SNAPYARD_CLUSTER__LEASE_S": "3",
    "SNAPYARD_CLUSTER__LOCALITY_WAIT_S": "5",
    "SNAPYARD_SUPERVISOR__TICK_INTERVAL_S": "0.5",
}


@dataclass
class ClusterHost:
    """One stand-in machine: its Docker daemon and its supervisor."""

    name: str
    dockerd: LocalDockerd
    supervisor: SupervisorProcess
    base_image_id: str = ""
    history: list[str] = field(default_factory=list)

    def kill(self) -> None:
        """The machine dies: SIGKILL to the supervisor, then to the daemon and its containers."""
        self.supervisor.kill()
        self.dockerd.kill()
        self.history.append("killed")

    def restart(self) -> None:
        """The machine comes back: daemon first (its images kept), then the supervisor."""
        self.dockerd.start()
        self.supervisor.start()
        self.history.append("restarted")


class LocalCluster:
    """``hosts`` hosts sharing one PostgreSQL and (unless ``registry`` is False) one registry.

    ``base_image`` is a tag on ``source`` (the main engine): it is copied into
    every host's daemon, keeping its ID, so every host's snapshots grow from
    the same base. ``env`` is added to every host's configuration;
    ``database_url(postgres, host_name)`` is how a host reaches the database
    (a test puts a proxy it controls in between).
    """

    def __init__(
        self,
        source: DockerEngine,
        base_image: str,
        *,
        hosts: int = 3,
        registry: bool = True,
        env: Mapping[str, str] | None = None,
        database_url: Callable[[LocalPostgres, str], str] | None = None,
        say: Callable[[str], None] = lambda _line: None,
    ) -> None:
        self._source = source
        self._base_image = base_image
        self._host_count = hosts
        self._want_registry = registry
        self._env = dict(env or {})
        self._database_url = database_url or (lambda pg, _host: pg.url)
        self._say = say
        self.dir = Path(tempfile.mkdtemp(prefix="snapyard-cluster-"))
        self.postgres: LocalPostgres | None = None
        self.registry: LocalRegistry | None = None
        self.hosts: list[ClusterHost] = []

    def start(self) -> LocalCluster:
        try:
            self.postgres = LocalPostgres()
            self._say(
                f"PostgreSQL 15 on 127.0.0.1:{self.postgres.port} (data in {self.postgres.dir})"
            )
            if self._want_registry:
                self.registry = LocalRegistry()
                self.registry.start()
                self._say(
                    f"registry on {self.registry.address} (storage in {self.registry.storage})"
                )
            for index in range(1, self._host_count + 1):
                self.hosts.append(self._start_host(f"host-{index}"))
        except BaseException:
            self.close()
            raise
        return self

    def _start_host(self, name: str) -> ClusterHost:
        dockerd = LocalDockerd(name)
        dockerd.start()
        base_id = dockerd.load_image(self._source, self._base_image)
        assert self.postgres is not None
        env = {
            "SNAPYARD_ENGINE__URL": dockerd.url,
            "SNAPYARD_WORKER__IMAGE": self._base_image,
            "SNAPYARD_SUPERVISOR__INSTANCE_ID": name,
            "SNAPYARD_CLUSTER__DATABASE_URL": self._database_url(self.postgres, name),
            "SNAPYARD_CLUSTER__HOST_ID": name,
            "SNAPYARD_CLUSTER__REGISTRY": self.registry.address if self.registry else "",
            **DEMO_TIMINGS,
            **self._env,
        }
        supervisor = SupervisorProcess(name, self.dir / name, env)
        host = ClusterHost(name, dockerd, supervisor, base_id)
        supervisor.start()
        self._say(f"{name}: dockerd at {dockerd.url}, supervisor API at {supervisor.url}")
        return host

    def host(self, name: str) -> ClusterHost:
        return next(h for h in self.hosts if h.name == name)

    def logs(self, lines: int = 40) -> str:
        """Every supervisor's warnings and errors, then its last lines: what a
        failing test or demo step shows."""
        parts = []
        for host in self.hosts:
            text = host.supervisor.log_tail(100_000).splitlines()
            trouble = [line for line in text if '"WARNING"' in line or '"ERROR"' in line]
            parts.append(f"--- {host.name}: warnings and errors ---")
            parts.extend(trouble[-lines:])
            parts.append(f"--- {host.name}: last lines ---")
            parts.extend(text[-lines // 2 :])
        return "\n".join(parts)

    def close(self) -> None:
        """Stop and delete everything, whatever state each part is in."""
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host.supervisor.kill()
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host.dockerd.close()
        if self.registry is not None:
            with contextlib.suppress(Exception):
                self.registry.close()
        if self.postgres is not None:
            with contextlib.suppress(Exception):
                self.postgres.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
