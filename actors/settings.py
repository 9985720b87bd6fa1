"""Typed settings: the one place that reads configuration.

Settings come from three layers, later ones winning: the dataclass defaults
below, a TOML file, and ``SNAPYARD_*`` environment variables. Every error
names the key, the value and what is allowed, because a supervisor that
refuses to start must tell its operator exactly what to fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Union

from actors.layers import ENGINE_MAX_LAYERS, MIN_MAX_LAYERS

__all__ = [
    "AgentTypeSettings",
    "ApiSettings",
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
    "config_path_from_env",
    "load_settings",
]

ENV_PREFIX = "SNAPYARD_"
# The shipped default configuration, every key with its default: package data,
# found the same way from a checkout or an installed wheel, whatever the cwd.
# config/snapyard.toml in the repository is a symlink to it.
DEFAULT_CONFIG: Traversable = files("actors") / "defaults" / "snapyard.toml"
DEFAULT_ENGINE_URL = "unix:///var/run/docker.sock"


class SettingsError(ValueError):
    """A configuration value is missing, unknown or out of range."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid setting {key} = {value!r}: {allowed}")


def _min(value: float) -> dict[str, Any]:
    return {"min": value}


def _choice(*values: str) -> dict[str, Any]:
    return {"choices": values}


# Docker's repository grammar (distribution/reference): lowercase path
# components, an optional registry host[:port] first. "Snap" passed before and
# then failed every commit ("repository name must be lowercase").
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
_REPOSITORY = rf"(?:{_HOST}(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
# Room for the "/<slug>" a snapshot name adds within Docker's 255 characters.
_MAX_REPOSITORY = 128


# An instance ID is a Docker label value and a file's content: keep it plain.
_INSTANCE_ID = r"(?:[A-Za-z0-9][A-Za-z0-9_.-]*)?"


def _docker_repository() -> dict[str, Any]:
    return {
        "pattern": _REPOSITORY,
        "max_length": _MAX_REPOSITORY,
        "allowed": (
            "must be a Docker repository name: lowercase letters, digits and "
            "'.', '_', '-' between them, '/' between parts (e.g. snapyard-snapshot), "
            f"at most {_MAX_REPOSITORY} characters"
        ),
    }


@dataclass(frozen=True)
class EngineSettings:
    # Empty means DOCKER_HOST, else the local socket; load_settings resolves it.
    url: str = ""
    timeout_s: float = field(default=60.0, metadata=_min(1))


@dataclass(frozen=True)
class WorkerSettings:
    image: str = "snapyard-worker:latest"
    command: tuple[str, ...] = ("sh", "-c", "echo job done")
    network: str = "none"
    memory_mb: int = field(default=512, metadata=_min(6))
    pids_limit: int = field(default=256, metadata=_min(8))
    drop_all_capabilities: bool = True
    # Passed to the demo worker as SNAPYARD_SETUP_SECONDS: what a snapshot saves.
    setup_seconds: float = field(default=2.0, metadata=_min(0))


@dataclass(frozen=True)
class SnapshotSettings:
    enabled: bool = True
    repository: str = field(default="snapyard-snapshot", metadata=_docker_repository())
    ttl_s: float = field(default=7 * 86400.0, metadata=_min(1))
    max_count: int = field(default=100, metadata=_min(1))
    max_total_bytes: int = field(default=20 * 1024**3, metadata=_min(1))
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
    sweep_interval_s: float = field(default=300.0, metadata=_min(1))


@dataclass(frozen=True)
class RetrySettings:
    attempts: int = field(default=8, metadata=_min(1))
    backoff_initial_s: float = field(default=0.5, metadata=_min(0))
    backoff_max_s: float = field(default=30.0, metadata=_min(0))


@dataclass(frozen=True)
class SupervisorSettings:
    data_dir: str = "~/.local/share/snapyard"
    max_workers: int = field(default=4, metadata=_min(1))
    spawners: int = field(default=4, metadata=_min(1))
    default_timeout_s: float = field(default=3600.0, metadata=_min(1))
    watchdog_buffer_s: float = field(default=60.0, metadata=_min(0))
    stop_grace_s: float = field(default=10.0, metadata=_min(0))
    orphan_grace_s: float = field(default=300.0, metadata=_min(0))
    orphan_sweep_interval_s: float = field(default=60.0, metadata=_min(1))
    tick_interval_s: float = field(default=1.0, metadata=_min(0.01))
    restart_max: int = field(default=5, metadata=_min(1))
    restart_window_s: float = field(default=60.0, metadata=_min(1))
    shutdown_timeout_s: float = field(default=30.0, metadata=_min(1))
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
    retention_s: float = field(default=30 * 86400.0, metadata=_min(1))


@dataclass(frozen=True)
class ApiSettings:
    host: str = "127.0.0.1"
    port: int = field(default=8750, metadata={"min": 0, "max": 65535})
    token: str = ""


@dataclass(frozen=True)
class SentrySettings:
    dsn: str = ""
    environment: str = "production"
    release: str = ""


@dataclass(frozen=True)
class LogSettings:
    level: str = field(default="INFO", metadata=_choice("DEBUG", "INFO", "WARNING", "ERROR"))
    format: str = field(default="auto", metadata=_choice("auto", "json", "text"))


@dataclass(frozen=True)
class ProjectSettings:
    """Per-project overrides; None means "use the global value"."""

    snapshots_enabled: bool | None = None
    ttl_s: float | None = field(default=None, metadata=_min(1))
    watchdog_s: float | None = field(default=None, metadata=_min(1))
    max_concurrent: int | None = field(default=None, metadata=_min(1))


@dataclass(frozen=True)
class AgentTypeSettings:
    max_concurrent: int | None = field(default=None, metadata=_min(1))
    timeout_s: float | None = field(default=None, metadata=_min(1))


@dataclass(frozen=True)
class Settings:
    engine: EngineSettings = EngineSettings()
    worker: WorkerSettings = WorkerSettings()
    snapshots: SnapshotSettings = SnapshotSettings()
    retry: RetrySettings = RetrySettings()
    supervisor: SupervisorSettings = SupervisorSettings()
    api: ApiSettings = ApiSettings()
    sentry: SentrySettings = SentrySettings()
    log: LogSettings = LogSettings()
    projects: Mapping[str, ProjectSettings] = field(default_factory=dict)
    agent_types: Mapping[str, AgentTypeSettings] = field(default_factory=dict)

    def project(self, name: str) -> ProjectSettings:
        return self.projects.get(name, ProjectSettings())

    def agent_type(self, name: str) -> AgentTypeSettings:
        return self.agent_types.get(name, AgentTypeSettings())

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
        return self.data_dir / "snapyard.db"

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


def _hint_parts(hint: Any) -> tuple[Any, bool]:
    """The concrete type behind a hint, and whether None is allowed."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def _coerce(key: str, raw: object, hint: Any, meta: Mapping[str, Any]) -> object:
    kind, optional = _hint_parts(hint)
    if raw is None:
        if optional:
            return None
        raise SettingsError(key, raw, "a value is required")
    value: object
    if kind is bool:
        if isinstance(raw, bool):
            value = raw
        elif isinstance(raw, str) and raw.lower() in {"1", "true", "yes", "on"}:
            value = True
        elif isinstance(raw, str) and raw.lower() in {"0", "false", "no", "off"}:
            value = False
        else:
            raise SettingsError(key, raw, "must be true or false")
    elif kind is int:
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            raise SettingsError(key, raw, "must be a whole number")
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(key, raw, "must be a whole number") from None
    elif kind is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise SettingsError(key, raw, "must be a number")
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(key, raw, "must be a number") from None
        except OverflowError:  # a TOML integer past the float range
            raise SettingsError(key, raw, "must be a finite number") from None
        if not math.isfinite(value):
            raise SettingsError(key, raw, "must be a finite number")
    elif kind is str:
        if not isinstance(raw, str):
            raise SettingsError(key, raw, "must be a string")
        value = raw
    elif typing.get_origin(kind) is tuple:
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError:
                raise SettingsError(
                    key, raw, 'must be a JSON list of strings: ["sh", "-c", "..."]'
                ) from None
        if not isinstance(raw, list | tuple) or not all(isinstance(x, str) for x in raw):
            raise SettingsError(key, raw, "must be a list of strings")
        value = tuple(raw)
    else:  # pragma: no cover - a programming error in this module
        raise TypeError(f"unsupported setting type {hint!r} for {key}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        why = f" ({meta['why']})" if "why" in meta else ""
        if "min" in meta and value < meta["min"]:
            raise SettingsError(key, raw, f"must be >= {meta['min']}{why}")
        if "max" in meta and value > meta["max"]:
            raise SettingsError(key, raw, f"must be <= {meta['max']}{why}")
    if "pattern" in meta and not (
        isinstance(value, str)
        and len(value) <= meta["max_length"]
        and re.fullmatch(meta["pattern"], value)
    ):
        raise SettingsError(key, raw, meta["allowed"])
    if "choices" in meta and value not in meta["choices"]:
        raise SettingsError(key, raw, f"must be one of {', '.join(meta['choices'])}")
    return value


def _build(cls: type[Any], prefix: str, values: Mapping[str, object]) -> Any:
    if not isinstance(values, Mapping):
        raise SettingsError(prefix, values, "must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SettingsError(
            f"{prefix}.{unknown[0]}",
            values[unknown[0]],
            f"unknown key; known keys: {', '.join(fields)}",
        )
    kwargs = {
        name: _coerce(f"{prefix}.{name}", raw, hints[name], fields[name].metadata)
        for name, raw in values.items()
    }
    return cls(**kwargs)


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
        kwargs[name] = _build(hints[name], name, data.get(name, {}))
    for name, cls in _TABLES.items():
        table = data.get(name, {})
        if not isinstance(table, Mapping):
            raise SettingsError(name, table, "must be a table of tables")
        kwargs[name] = {key: _build(cls, f"{name}.{key}", sub) for key, sub in table.items()}
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
