"""``snapyard doctor`` with [cluster]: the database, the registry and this host's lease.

A real PostgreSQL and a real ``docker-registry`` on loopback; a stopped one
must make its check fail with what to do.
"""

from __future__ import annotations

import io
import socket

import pytest
from actor_kit import kit_settings
from registry_kit import local_registry

from actors.clock import FakeClock
from actors.doctor_cluster import cluster_checks
from actors.localcluster.registry import LocalRegistry
from actors.settings import Settings
from actors.store.base import StoreUnavailable
from actors.store.postgres import PostgresStore

__all__ = ["local_registry"]

NOW = 1_700_000_000.0


def settings_for(url: str, registry: str = "") -> Settings:
    return kit_settings(cluster={"database_url": url, "host_id": "host-a", "registry": registry})


def by_name(checks: list[tuple[str, bool, str, str]]) -> dict[str, tuple[bool, str, str]]:
    return {name: (ok, found, fix) for name, ok, found, fix in checks}


def test_a_host_with_a_live_lease_and_a_registry_passes(
    postgres_url: str, local_registry: LocalRegistry
) -> None:
    with PostgresStore(postgres_url, "host-a", FakeClock(NOW)) as store:
        store.heartbeat(NOW, 10.0, api="a:8750", max_workers=2, running=0)
    checks = by_name(cluster_checks(settings_for(postgres_url, local_registry.address), NOW + 1))
    assert checks["database"][0]
    assert "1 host(s), 1 live" in checks["database"][1]
    assert checks["lease"][:2] == (True, "host-a: live, lease renewed, 9.0s left")
    assert checks["registry"][0]


def test_an_ended_lease_fails_and_says_what_it_means(postgres_url: str) -> None:
    with PostgresStore(postgres_url, "host-a", FakeClock(NOW)) as store:
        store.heartbeat(NOW, 10.0, api="a:8750", max_workers=2, running=0)
    ok, found, fix = by_name(cluster_checks(settings_for(postgres_url), NOW + 40))["lease"]
    assert not ok
    assert found == "host-a: lease ended 30s ago"
    assert "cannot reach the database" in fix


def test_a_host_that_never_joined_has_no_lease_yet(postgres_url: str) -> None:
    checks = by_name(cluster_checks(settings_for(postgres_url), NOW))
    assert checks["lease"][:2] == (True, "host-a: no lease yet (`snapyard run` has not joined)")
    assert checks["registry"][0]  # none configured: fine, and said so
    assert "start from base" in checks["registry"][1]


def test_a_database_nobody_serves_fails_and_names_the_fix() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://snap:s3cret@127.0.0.1:{port}/snapyard"
    checks = by_name(cluster_checks(settings_for(url), NOW))
    ok, found, fix = checks["database"]
    assert not ok
    assert "s3cret" not in found
    assert "database_url" in fix
    # Said once: what is wrong in `found`, what to do in `fix` (not both in both).
    assert found.startswith(f"the cluster database snap@127.0.0.1:{port}/snapyard")
    assert "cannot be reached (" in found
    assert "database_url" not in found
    assert checks["lease"][:2] == (False, "host-a: not checked, no database")
    # What `snapyard run` prints as it exits: no "reconnects on its next use".
    with pytest.raises(StoreUnavailable) as caught:
        PostgresStore(url, "host-a", FakeClock(NOW))
    message = str(caught.value)
    assert message.startswith(found.split(" (")[0])
    assert message.endswith(": check that PostgreSQL runs and that [cluster] database_url is right")
    assert "reconnect" not in message


def test_a_stopped_registry_fails(postgres_url: str, local_registry: LocalRegistry) -> None:
    local_registry.stop()
    try:
        ok, found, fix = by_name(
            cluster_checks(settings_for(postgres_url, local_registry.address), NOW)
        )["registry"]
    finally:
        local_registry.start()
    assert not ok
    assert found.startswith(f"{local_registry.address}: does not answer (")
    assert found.count(local_registry.address) >= 1
    assert "start it" not in found  # the fix says what to do, once
    assert "docker-registry" in fix


def test_doctor_prints_the_cluster_checks(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    from actors.cli import main

    monkeypatch.setenv("SNAPYARD_CLUSTER__DATABASE_URL", postgres_url)
    monkeypatch.setenv("SNAPYARD_DATA_DIR", str(tmp_path))
    # No Docker in a unit test: the engine check fails, the cluster checks still run.
    monkeypatch.setenv("SNAPYARD_ENGINE__URL", f"unix://{tmp_path}/no-docker.sock")
    out = io.StringIO()
    main(["doctor"], out=out, err=io.StringIO())
    lines = out.getvalue().splitlines()
    assert any(line.startswith("ok") and " database " in line for line in lines)
    assert any(" lease " in line for line in lines)
    assert not any(" store " in line for line in lines)  # no SQLite file in a cluster
