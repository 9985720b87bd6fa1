"""Settings: the shipped file matches the code, env wins, and every mistake is named."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest

from actors.settings import (
    DEFAULT_CONFIG,
    DEFAULT_ENGINE_URL,
    AgentTypeSettings,
    ProjectSettings,
    Settings,
    SettingsError,
    load_settings,
)

CONFIG = Path(str(DEFAULT_CONFIG))
SAMPLE = Path(__file__).resolve().parents[2] / "config" / "snapyard.toml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "snapyard.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --- drift guard ---------------------------------------------------------------


def test_shipped_config_equals_the_dataclass_defaults() -> None:
    loaded = load_settings(CONFIG, env={})
    assert loaded == Settings().replace(engine={"url": DEFAULT_ENGINE_URL})


def test_the_documented_sample_is_the_packaged_default() -> None:
    """One source of truth: config/snapyard.toml is the package's file, not a copy."""
    assert SAMPLE.read_bytes() == CONFIG.read_bytes()
    assert SAMPLE.resolve() == CONFIG.resolve()


def test_defaults_do_not_depend_on_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An installed snapyard run from any directory finds its packaged defaults."""
    stray = tmp_path / "config"
    stray.mkdir()
    (stray / "snapyard.toml").write_text("[supervisor]\nmax_workers = 9\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert load_settings(None, env={}) == load_settings(CONFIG, env={})


def test_shipped_config_shows_every_key() -> None:
    data = tomllib.loads(CONFIG.read_text(encoding="utf-8"))
    for section in dataclasses.fields(Settings):
        if section.name in ("projects", "agent_types"):
            continue
        keys = {f.name for f in dataclasses.fields(getattr(Settings(), section.name))}
        assert set(data[section.name]) == keys, section.name


# --- environment -----------------------------------------------------------------


def test_section_key_env_overrides_file_and_is_coerced(tmp_path: Path) -> None:
    path = _write(tmp_path, "[snapshots]\nmax_count = 5\n")
    env = {
        "SNAPYARD_SNAPSHOTS__MAX_COUNT": "2",
        "SNAPYARD_SNAPSHOTS__ENABLED": "false",
        "SNAPYARD_SNAPSHOTS__TTL_S": "60.5",
        "SNAPYARD_WORKER__COMMAND": '["python", "-c", "print(1)"]',
        "SNAPYARD_LOG__FORMAT": "json",
    }
    settings = load_settings(path, env=env)
    assert settings.snapshots.max_count == 2
    assert settings.snapshots.enabled is False
    assert settings.snapshots.ttl_s == 60.5
    assert settings.worker.command == ("python", "-c", "print(1)")
    assert settings.log.format == "json"


def test_file_value_is_used_without_env(tmp_path: Path) -> None:
    path = _write(tmp_path, "[snapshots]\nmax_count = 5\n")
    assert load_settings(path, env={}).snapshots.max_count == 5


def test_shortcut_env_variables(tmp_path: Path) -> None:
    env = {
        "SNAPYARD_API": "0.0.0.0:9000",
        "SNAPYARD_DATA_DIR": str(tmp_path / "data"),
        "SNAPYARD_API_TOKEN": "t0ken-value",
        "SENTRY_DSN": "https://key@sentry.example/1",
        "DOCKER_HOST": "tcp://127.0.0.1:2375",
    }
    settings = load_settings(_write(tmp_path, ""), env=env)
    assert (settings.api.host, settings.api.port) == ("0.0.0.0", 9000)
    assert settings.data_dir == tmp_path / "data"
    assert settings.api.token == "t0ken-value"
    assert settings.sentry.dsn == "https://key@sentry.example/1"
    assert settings.engine.url == "tcp://127.0.0.1:2375"


def test_ipv6_api_address(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, ""), env={"SNAPYARD_API": "[::1]:8751"})
    assert (settings.api.host, settings.api.port) == ("::1", 8751)


def test_engine_url_from_config_beats_docker_host(tmp_path: Path) -> None:
    path = _write(tmp_path, '[engine]\nurl = "unix:///tmp/other.sock"\n')
    settings = load_settings(path, env={"DOCKER_HOST": "tcp://127.0.0.1:2375"})
    assert settings.engine.url == "unix:///tmp/other.sock"
    assert load_settings(_write(tmp_path, ""), env={}).engine.url == DEFAULT_ENGINE_URL


def test_snapyard_config_env_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[supervisor]\nmax_workers = 9\n")
    assert load_settings(None, env={"SNAPYARD_CONFIG": str(path)}).supervisor.max_workers == 9


def test_project_and_agent_type_tables_from_file_and_env(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "[snapshots]\nttl_s = 100.0\n"
        '[projects."My-Proj"]\nsnapshots_enabled = false\nttl_s = 10.0\n'
        "[agent_types.review]\nmax_concurrent = 1\n",
    )
    env = {"SNAPYARD_PROJECTS__Other__TTL_S": "20", "SNAPYARD_AGENT_TYPES__review__TIMEOUT_S": "9"}
    settings = load_settings(path, env=env)
    assert settings.projects["My-Proj"] == ProjectSettings(snapshots_enabled=False, ttl_s=10.0)
    assert settings.ttl_for("My-Proj") == 10.0
    assert settings.ttl_for("Other") == 20.0
    assert settings.ttl_for("unlisted") == 100.0
    assert settings.snapshots_enabled_for("My-Proj") is False
    assert settings.snapshots_enabled_for("Other") is True
    assert settings.snapshots_enabled_for("unlisted") is True
    assert settings.agent_type("review") == AgentTypeSettings(max_concurrent=1, timeout_s=9.0)
    assert settings.agent_type("other") == AgentTypeSettings()


def test_project_override_can_enable_snapshots_when_off_globally(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "[snapshots]\nenabled = false\n[projects.p]\nsnapshots_enabled = true\n"
    )
    settings = load_settings(path, env={})
    assert settings.snapshots_enabled_for("p") is True
    assert settings.snapshots_enabled_for("q") is False


# --- errors: key, value and what is allowed ----------------------------------------


def _error(tmp_path: Path, text: str = "", env: dict[str, str] | None = None) -> SettingsError:
    with pytest.raises(SettingsError) as info:
        load_settings(_write(tmp_path, text), env=env or {})
    return info.value


@pytest.mark.parametrize(
    ("text", "env", "key", "value", "allowed"),
    [
        ("[snapshots]\nbogus = 1\n", {}, "snapshots.bogus", 1, "unknown key"),
        ("[nonsense]\nx = 1\n", {}, "nonsense", {"x": 1}, "unknown section"),
        ("", {"SNAPYARD_NONSENSE__X": "1"}, "nonsense", {"x": "1"}, "unknown section"),
        ("", {"SNAPYARD_WORKER__BOGUS": "1"}, "worker.bogus", "1", "unknown key"),
        ('[worker]\nmemory_mb = "lots"\n', {}, "worker.memory_mb", "lots", "whole number"),
        ("[worker]\nmemory_mb = 2.5\n", {}, "worker.memory_mb", 2.5, "whole number"),
        ("[worker]\nmemory_mb = true\n", {}, "worker.memory_mb", True, "whole number"),
        ("[worker]\nimage = 5\n", {}, "worker.image", 5, "string"),
        ('[worker]\ncommand = "sh"\n', {}, "worker.command", "sh", "JSON list"),
        ("[worker]\ncommand = [1]\n", {}, "worker.command", [1], "list of strings"),
        ('[snapshots]\nenabled = "maybe"\n', {}, "snapshots.enabled", "maybe", "true or false"),
        ("[snapshots]\nttl_s = nan\n", {}, "snapshots.ttl_s", None, "finite"),
        ("", {"SNAPYARD_SNAPSHOTS__TTL_S": "inf"}, "snapshots.ttl_s", "inf", "finite"),
        ("[snapshots]\nmax_count = 0\n", {}, "snapshots.max_count", 0, ">= 1"),
        ("[worker]\nmemory_mb = -5\n", {}, "worker.memory_mb", -5, ">= 6"),
        ("[api]\nport = 70000\n", {}, "api.port", 70000, "<= 65535"),
        ("", {"SNAPYARD_API": "localhost:99999"}, "api.port", "99999", "<= 65535"),
        ("", {"SNAPYARD_API": "localhost"}, "SNAPYARD_API", "localhost", "host:port"),
        ('[log]\nlevel = "LOUD"\n', {}, "log.level", "LOUD", "DEBUG, INFO, WARNING, ERROR"),
        ('[log]\nformat = "xml"\n', {}, "log.format", "xml", "auto, json, text"),
        ("[projects.p]\nttl_s = 0.5\n", {}, "projects.p.ttl_s", 0.5, ">= 1"),
        ("[projects.p]\nbogus = 1\n", {}, "projects.p.bogus", 1, "unknown key"),
        ("projects = 3\n", {}, "projects", 3, "table"),
        ("[snapshots]\nttl_s = 1" + "0" * 400 + "\n", {}, "snapshots.ttl_s", None, "finite"),
        ("", {"SNAPYARD_A__B__C__D": "1"}, "SNAPYARD_A__B__C__D", "1", "SNAPYARD_<SECTION>__<KEY>"),
        # Regression: accepted, then every commit failed "repository name must be lowercase".
        ('[snapshots]\nrepository = "Snap"\n', {}, "snapshots.repository", "Snap", "lowercase"),
        ("", {"SNAPYARD_SNAPSHOTS__REPOSITORY": "a//b"}, "snapshots.repository", "a//b", "Docker"),
        ("", {"SNAPYARD_SNAPSHOTS__REPOSITORY": "-a"}, "snapshots.repository", "-a", "Docker"),
        ("", {"SNAPYARD_SNAPSHOTS__REPOSITORY": "a:1"}, "snapshots.repository", "a:1", "Docker"),
        ("", {"SNAPYARD_SNAPSHOTS__REPOSITORY": "a" * 129}, "snapshots.repository", None, "128"),
        # A cap of 1 flattens every commit; past 124 Docker refuses the chain first.
        ("[snapshots]\nmax_layers = 1\n", {}, "snapshots.max_layers", 1, ">= 2 (layers"),
        ("", {"SNAPYARD_SNAPSHOTS__MAX_LAYERS": "125"}, "snapshots.max_layers", "125", "<= 124"),
    ],
)
def test_bad_values_name_key_value_and_allowed(
    tmp_path: Path, text: str, env: dict[str, str], key: str, value: Any, allowed: str
) -> None:
    error = _error(tmp_path, text, env)
    assert error.key == key
    if value is not None:  # NaN and huge ints do not compare equal to themselves usefully
        assert error.value == value
    assert allowed in error.allowed
    assert key in str(error)
    assert allowed in str(error)


def test_bad_toml_is_named(tmp_path: Path) -> None:
    error = _error(tmp_path, "[snapshots\nmax_count = ")
    assert error.key == "--config"
    assert error.value == str(tmp_path / "snapyard.toml")
    assert "not valid TOML" in error.allowed


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(tmp_path / "absent.toml", env={})
    assert info.value.key == "--config"
    assert info.value.value == str(tmp_path / "absent.toml")
    assert "no such file" in info.value.allowed


def test_unreadable_file_is_a_settings_error(tmp_path: Path) -> None:
    """Regression: a directory or non-UTF-8 file escaped as IsADirectoryError/UnicodeDecodeError."""
    with pytest.raises(SettingsError, match="cannot be read"):
        load_settings(tmp_path, env={})
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"x = \xff\xfe")
    with pytest.raises(SettingsError, match="not UTF-8"):
        load_settings(binary, env={})


def test_env_value_colliding_with_a_file_value(tmp_path: Path) -> None:
    error = _error(tmp_path, "snapshots = 1\n", {"SNAPYARD_SNAPSHOTS__MAX_COUNT": "2"})
    assert error.key == "snapshots.max_count"
    assert "collides" in error.allowed


@pytest.mark.parametrize(
    "repository",
    ["snapyard-snapshot", "team/snaps", "a.b_c__d-e", "127.0.0.1:5000/team/snaps", "reg.io/x"],
)
def test_docker_repository_names_are_accepted(repository: str) -> None:
    settings = load_settings(env={"SNAPYARD_SNAPSHOTS__REPOSITORY": repository})
    assert settings.snapshots.repository == repository


@pytest.mark.parametrize("instance_id", ["", "host-a", "sy-0123abcd", "A_1.b"])
def test_instance_ids_are_accepted(instance_id: str) -> None:
    settings = load_settings(env={"SNAPYARD_SUPERVISOR__INSTANCE_ID": instance_id})
    assert settings.supervisor.instance_id == instance_id


@pytest.mark.parametrize("instance_id", ["-a", "a b", "a/b", "x" * 65, "\u200b"])
def test_an_instance_id_that_is_no_plain_label_value_is_refused(instance_id: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(env={"SNAPYARD_SUPERVISOR__INSTANCE_ID": instance_id})
    assert info.value.key == "supervisor.instance_id"


@pytest.mark.parametrize(
    "url",
    ["mysql://x:SecretPw1@y/z", "redis://:SecretPw1@127.0.0.1:6379/0", "just-a-hostname"],
)
def test_a_database_url_that_is_not_postgresql_is_refused_without_its_password(url: str) -> None:
    with pytest.raises(SettingsError) as refused:
        load_settings(env={"SNAPYARD_CLUSTER__DATABASE_URL": url})
    assert refused.value.key == "cluster.database_url"
    assert "SecretPw1" not in str(refused.value)
    assert "PostgreSQL URL" in str(refused.value)


@pytest.mark.parametrize(
    "url",
    ["postgresql://snapyard@db:5432/snapyard", "postgres://u:p@127.0.0.1/d", "host=db dbname=s"],
)
def test_postgresql_urls_and_key_value_strings_are_accepted(url: str) -> None:
    settings = load_settings(env={"SNAPYARD_CLUSTER__DATABASE_URL": url})
    assert settings.cluster.database_url == url
    assert settings.cluster.enabled


def test_a_heartbeat_longer_than_half_the_lease_is_refused() -> None:
    with pytest.raises(SettingsError, match=r"at most half of cluster\.lease_s"):
        load_settings(env={"SNAPYARD_CLUSTER__HEARTBEAT_S": "6", "SNAPYARD_CLUSTER__LEASE_S": "10"})
