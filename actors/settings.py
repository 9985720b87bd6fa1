"""Typed settings: the one place that reads configuration.

Settings come from three layers, later ones winning: the dataclass defaults
below, a TOML file, and ``SNAPYARD_*`` environment variables. Every error
names the key, the value and what is allowed, because a supervisor that
refuses to start must tell its operator exactly what to fix.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from actors._settings_values import (
    SettingsError,
    build,
    choice,
    docker_repository,
    libpq_url,
    minimum,
)
from actors.labels import CONFIG_FILE, STORE_FILE
from actors.layers import ENGINE_MAX_LAYERS, MIN_MAX_LAYERS

__all__ = [
    "AgentTypeSettings",
    "ApiSettings",
    "ClusterSettings",
    "EngineSettings",
    "LogSettings",
    "ProjectSettings",
    "RetrySettings",
    "SentrySettings",
    "Settings",
    "SettingsError",
    "SnapshotSettings",
    "SupervisorSettings",
    "WorkerSettings",
    "auto_cpus",
    "config_path_from_env",
    "load_settings",
]

ENV_PREFIX = "SNAPYARD_"
# The shipped default configuration, every key with its default: package data,
# found the same way from a checkout or an installed wheel, whatever the cwd.
# config/snapyard.toml in the repository is a symlink to it.
DEFAULT_CONFIG: Traversable = files("actors") / "defaults" / CONFIG_FILE
DEFAULT_ENGINE_URL = "unix:///var/run/docker.sock"


# An instance ID is a Docker label value and a file's content: keep it plain.
_INSTANCE_ID = r"(?:[A-Za-z0-9][A-Za-z0-9_.-]*)?"


@dataclass(frozen=True)
class EngineSettings:
    # Empty means DOCKER_HOST, else the local socket; load_settings resolves it.
    url: str = ""
    timeout_s: float = field(default=60.0, metadata=minimum(1))


@dataclass(frozen=True)
class WorkerSettings:
    image: str = "snapyard-worker:latest"
    # When a job gives none; empty: the image's own CMD (the demo's echoes "job done").
    command: tuple[str, ...] = ()
    network: str = "none"
    memory_mb: int = field(default=512, metadata=minimum(6))
    pids_limit: int = field(default=256, metadata=minimum(8))
    # CPUs per worker (Docker's --cpus, NanoCPUs; fractional). 0: see auto_cpus.
    cpus: float = field(default=0.0, metadata=minimum(0))
    drop_all_capabilities: bool = True
    # Passed to the demo worker as SNAPYARD_SETUP_SECONDS: what a snapshot saves.
    setup_seconds: float = field(default=2.0, metadata=minimum(0))


@dataclass(frozen=True)
class SnapshotSettings:
    enabled: bool = True
    repository: str = field(default="snapyard-snapshot", metadata=docker_repository())
    ttl_s: float = field(default=7 * 86400.0, metadata=minimum(1))
    max_count: int = field(default=100, metadata=minimum(1))
    max_total_bytes: int = field(default=20 * 1024**3, metadata=minimum(1))
    # Layers above the base image: the commit that reaches it is flattened to one.
    # Docker refuses a chain past 125 layers, base included, so above 124 no cap is met.
    max_layers: int = field(
        default=64,
        metadata={
            "min": MIN_MAX_LAYERS,
            "max": ENGINE_MAX_LAYERS - 1,
            "why": "layers a snapshot may have above its base image before it is flattened; "
            f"Docker refuses more than {ENGINE_MAX_LAYERS} in all",
        },
    )
    sweep_interval_s: float = field(default=300.0, metadata=minimum(1))


@dataclass(frozen=True)
class RetrySettings:
    attempts: int = field(default=8, metadata=minimum(1))
    backoff_initial_s: float = field(default=0.5, metadata=minimum(0))
    backoff_max_s: float = field(default=30.0, metadata=minimum(0))


@dataclass(frozen=True)
class SupervisorSettings:
    data_dir: str = "~/.local/share/snapyard"
    max_workers: int = field(default=4, metadata=minimum(1))
    spawners: int = field(default=4, metadata=minimum(1))
    default_timeout_s: float = field(default=3600.0, metadata=minimum(1))
    watchdog_buffer_s: float = field(default=60.0, metadata=minimum(0))
    stop_grace_s: float = field(default=10.0, metadata=minimum(0))
    orphan_grace_s: float = field(default=300.0, metadata=minimum(0))
    orphan_sweep_interval_s: float = field(default=60.0, metadata=minimum(1))
    tick_interval_s: float = field(default=1.0, metadata=minimum(0.01))
    restart_max: int = field(default=5, metadata=minimum(1))
    restart_window_s: float = field(default=60.0, metadata=minimum(1))
    shutdown_timeout_s: float = field(default=30.0, metadata=minimum(1))
    # False: a job for a project without a [projects.NAME] table is refused.
    allow_unknown_projects: bool = True
    # Labels what this instance creates; empty: generated once, kept in
    # <data_dir>/instance-id (actors.instance.resolve_instance_id).
    instance_id: str = field(
        default="",
        metadata={
            "pattern": _INSTANCE_ID,
            "max_length": 64,
            "allowed": "letters, digits and '_', '.', '-' (not first), at most 64 characters",
        },
    )
    # Finished jobs (history and logs) older than this are deleted by a sweep.
    retention_s: float = field(default=30 * 86400.0, metadata=minimum(1))


@dataclass(frozen=True)
class ApiSettings:
    host: str = "127.0.0.1"
    port: int = field(default=8750, metadata={"min": 0, "max": 65535})
    token: str = ""


@dataclass(frozen=True)
class ClusterSettings:
    """Past one host. Empty ``database_url``: a single host on SQLite, as ever."""

    # postgresql://user@127.0.0.1:5432/snapyard (libpq URL or key=value string).
    database_url: str = field(default="", metadata=libpq_url())
    # Empty: this machine's host name. Unique in the cluster; stable across restarts.
    host_id: str = field(
        default="",
        metadata={
            "pattern": _INSTANCE_ID,
            "max_length": 64,
            "allowed": "letters, digits and '_', '.', '-' (not first), at most 64 characters",
        },
    )
    # An OCI registry as host:port (e.g. 127.0.0.1:5000). Empty: snapshots stay
    # on the host that made them, and a job elsewhere starts from its base.
    registry: str = ""
    # How long a job whose key's newest snapshot is on a live host waits for it.
    locality_wait_s: float = field(default=10.0, metadata=minimum(0))
    heartbeat_s: float = field(default=2.0, metadata=minimum(0.1))
    # A host that has not renewed for this long is dead: its jobs are re-queued.
    lease_s: float = field(default=10.0, metadata=minimum(0.5))

    def __post_init__(self) -> None:
        # The fence falls due at lease_s - heartbeat_s after the last renewal:
        # a host must get at least two tries at renewing per lease.
        if self.heartbeat_s * 2 > self.lease_s:
            raise SettingsError(
                "cluster.heartbeat_s",
                self.heartbeat_s,
                f"must be at most half of cluster.lease_s ({self.lease_s}), so a host "
                "renews its lease at least twice before it runs out",
            )

    @property
    def enabled(self) -> bool:
        return bool(self.database_url)


@dataclass(frozen=True)
class SentrySettings:
    dsn: str = ""
    environment: str = "production"
    release: str = ""


@dataclass(frozen=True)
class LogSettings:
    level: str = field(default="INFO", metadata=choice("DEBUG", "INFO", "WARNING", "ERROR"))
    format: str = field(default="auto", metadata=choice("auto", "json", "text"))


@dataclass(frozen=True)
class ProjectSettings:
    """Per-project overrides; None means "use the global value"."""

    snapshots_enabled: bool | None = None
    ttl_s: float | None = field(default=None, metadata=minimum(1))
    watchdog_s: float | None = field(default=None, metadata=minimum(1))
    max_concurrent: int | None = field(default=None, metadata=minimum(1))


@dataclass(frozen=True)
class AgentTypeSettings:
    """Per-agent-type overrides; None means "use the global value" ([worker] for the rest)."""

    max_concurrent: int | None = field(default=None, metadata=minimum(1))
    timeout_s: float | None = field(default=None, metadata=minimum(1))
    image: str | None = None
    memory_mb: int | None = field(default=None, metadata=minimum(6))
    cpus: float | None = field(default=None, metadata=minimum(0))
    pids_limit: int | None = field(default=None, metadata=minimum(8))


# The [worker] keys an [agent_types.NAME] table may override.
_WORKER_OVERRIDES = ("image", "memory_mb", "cpus", "pids_limit")


def auto_cpus(host_cpus: int | None = None) -> float:
    """``worker.cpus = 0``: the host's CPUs less one, at least one. On 2 cores a
    spinning worker leaves one to the supervisor and dockerd; on 16 a build
    still gets 15. A cap, not a reservation: busy workers share what is left."""
    count = host_cpus if host_cpus is not None else (os.cpu_count() or 1)
    return float(max(1, count - 1))


@dataclass(frozen=True)
class Settings:
    engine: EngineSettings = EngineSettings()
    worker: WorkerSettings = WorkerSettings()
    snapshots: SnapshotSettings = SnapshotSettings()
    retry: RetrySettings = RetrySettings()
    supervisor: SupervisorSettings = SupervisorSettings()
    api: ApiSettings = ApiSettings()
    cluster: ClusterSettings = ClusterSettings()
    sentry: SentrySettings = SentrySettings()
    log: LogSettings = LogSettings()
    projects: Mapping[str, ProjectSettings] = field(default_factory=dict)
    agent_types: Mapping[str, AgentTypeSettings] = field(default_factory=dict)

    def project(self, name: str) -> ProjectSettings:
        return self.projects.get(name, ProjectSettings())

    def agent_type(self, name: str) -> AgentTypeSettings:
        return self.agent_types.get(name, AgentTypeSettings())

    def worker_for(self, agent_type: str) -> WorkerSettings:
        """``[worker]`` with the agent type's overrides, and ``cpus`` resolved (never 0)."""
        table = self.agent_type(agent_type)
        changes: dict[str, Any] = {
            key: getattr(table, key) for key in _WORKER_OVERRIDES if getattr(table, key) is not None
        }
        worker = dataclasses.replace(self.worker, **changes)
        if worker.cpus == 0:
            worker = dataclasses.replace(worker, cpus=auto_cpus())
        return worker

    def worker_images(self) -> tuple[str, ...]:
        """Every configured base image, ``worker.image`` first, each once."""
        images = [self.worker.image]
        for name in sorted(self.agent_types):
            image = self.agent_types[name].image
            if image is not None and image not in images:
                images.append(image)
        return tuple(images)

    def snapshots_enabled_for(self, project: str) -> bool:
        override = self.project(project).snapshots_enabled
        return self.snapshots.enabled if override is None else override

    def ttl_for(self, project: str) -> float:
        override = self.project(project).ttl_s
        return self.snapshots.ttl_s if override is None else override

    @property
    def data_dir(self) -> Path:
        return Path(self.supervisor.data_dir).expanduser()

    @property
    def store_path(self) -> Path:
        """The job store's file: named once, because the CLI's doctor opens it too."""
        return self.data_dir / STORE_FILE

    def replace(self, **sections: Any) -> Settings:
        """A copy with some sections' keys changed: ``replace(worker={"network": "none"})``."""
        changes: dict[str, Any] = {}
        for name, values in sections.items():
            current = getattr(self, name)
            if dataclasses.is_dataclass(current) and isinstance(values, Mapping):
                changes[name] = dataclasses.replace(current, **values)  # type: ignore[type-var]
            else:
                changes[name] = values
        return dataclasses.replace(self, **changes)


_SECTIONS = {f.name for f in dataclasses.fields(Settings)} - {"projects", "agent_types"}
_TABLES: dict[str, type[Any]] = {"projects": ProjectSettings, "agent_types": AgentTypeSettings}


def _from_mapping(data: Mapping[str, Any]) -> Settings:
    known = _SECTIONS | set(_TABLES)
    for name in data:
        if name not in known:
            raise SettingsError(
                name, data[name], f"unknown section; known sections: {', '.join(sorted(known))}"
            )
    hints = typing.get_type_hints(Settings)
    kwargs: dict[str, Any] = {}
    for name in _SECTIONS:
        kwargs[name] = build(hints[name], name, data.get(name, {}))
    for name, cls in _TABLES.items():
        table = data.get(name, {})
        if not isinstance(table, Mapping):
            raise SettingsError(name, table, "must be a table of tables")
        kwargs[name] = {key: build(cls, f"{name}.{key}", sub) for key, sub in table.items()}
    return Settings(**kwargs)


def _set_path(data: dict[str, Any], path: list[str], value: str) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SettingsError(".".join(path), value, "collides with a value in the config file")
    node[path[-1]] = value


def _env_overrides(data: dict[str, Any], env: Mapping[str, str]) -> None:
    """Apply SNAPYARD_<SECTION>__<KEY> (and the documented shortcuts) onto ``data``."""
    shortcuts = {
        "SNAPYARD_DATA_DIR": ["supervisor", "data_dir"],
        "SNAPYARD_API_TOKEN": ["api", "token"],
        "SENTRY_DSN": ["sentry", "dsn"],
    }
    for var, path in shortcuts.items():
        if env.get(var):
            _set_path(data, path, env[var])
    if env.get("SNAPYARD_API"):
        host, sep, port = env["SNAPYARD_API"].rpartition(":")
        if not sep or not host:
            raise SettingsError("SNAPYARD_API", env["SNAPYARD_API"], "must be host:port")
        _set_path(data, ["api", "host"], host.strip("[]"))
        _set_path(data, ["api", "port"], port)
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX) or "__" not in var:
            continue
        parts = [p.lower() for p in var[len(ENV_PREFIX) :].split("__")]
        if parts[0] in _TABLES and len(parts) == 3:
            # Table keys (project names) keep their case from the variable.
            parts[1] = var[len(ENV_PREFIX) :].split("__")[1]
        elif len(parts) != 2:
            raise SettingsError(var, value, "must be SNAPYARD_<SECTION>__<KEY>")
        _set_path(data, parts, value)


def config_path_from_env(
    explicit: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
) -> Path | None:
    """--config, else SNAPYARD_CONFIG; None means the packaged defaults."""
    if explicit:
        return Path(explicit)
    env = os.environ if env is None else env
    if env.get("SNAPYARD_CONFIG"):
        return Path(env["SNAPYARD_CONFIG"])
    return None


def load_settings(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Load settings from ``path`` (or the usual places) with env overrides applied."""
    env = os.environ if env is None else env
    config = config_path_from_env(path, env)
    data: dict[str, Any]
    if config is None:
        data = tomllib.loads(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    else:
        try:
            data = tomllib.loads(Path(config).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SettingsError("--config", str(config), "no such file") from None
        except OSError as exc:  # a directory, no permission, ...
            raise SettingsError("--config", str(config), f"cannot be read: {exc}") from None
        except UnicodeDecodeError as exc:
            raise SettingsError("--config", str(config), f"not UTF-8 text: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError("--config", str(config), f"not valid TOML: {exc}") from None
    _env_overrides(data, env)
    settings = _from_mapping(data)
    if not settings.engine.url:
        url = env.get("DOCKER_HOST") or DEFAULT_ENGINE_URL
        settings = settings.replace(engine={"url": url})
    return settings
