"""``GET /hosts`` and ``snapyard hosts``: the cluster's hosts from any host.

On one host (no [cluster]) the list is empty and the CLI says why; with a
cluster store the facade reads the shared hosts table (test_cluster_hosts.py
runs that on PostgreSQL). Here the facade is the real Snapyard, given a store
that also answers ``hosts()``.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_kit import Served, served
from waiting import eventually

from actors.api_schema import openapi_document
from actors.cli import main
from actors.client import ApiClient
from actors.messages import Fence
from actors.model import SnapshotKey
from actors.store.cluster import SnapshotRecord
from actors.store.postgres import PostgresStore


def cli(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue()


@pytest.fixture
def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    with served(tmp_path) as s:
        for name, value in s.env().items():
            monkeypatch.setenv(name, value)
        yield s


def test_a_single_host_lists_no_hosts(live: Served) -> None:
    assert ApiClient(live.url).hosts() == []
    code, out = cli("hosts")
    assert code == 0
    assert "a single host" in out


@pytest.fixture
def cluster_live(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, postgres_url: str
) -> Iterator[Served]:
    """A Snapyard that is host-a of a cluster (its own lease), on the real database."""
    with served(tmp_path, cluster={"database_url": postgres_url, "host_id": "host-a"}) as s:
        for name, value in s.env().items():
            monkeypatch.setenv(name, value)
        yield s


def test_any_host_shows_the_clusters_hosts_and_snapshots(
    cluster_live: Served, postgres_url: str
) -> None:
    now = time.time()
    with PostgresStore(postgres_url, "host-b") as other:
        other.heartbeat(now - 60, 10.0, api="10.0.0.2:8750", max_workers=4, running=0)
        other.record_snapshot(
            SnapshotRecord(SnapshotKey("p", "far"), "", "host-b", "sha256:" + "b" * 64, now, None)
        )
    listed: list[dict[str, Any]] = ApiClient(cluster_live.url).hosts()
    assert [(h["host_id"], h["live"]) for h in listed] == [("host-a", True), ("host-b", False)]
    assert listed[0]["max_workers"] == cluster_live.settings.supervisor.max_workers
    assert set(listed[0]) == set(openapi_document()["components"]["schemas"]["Host"]["required"])
    code, out = cli("hosts")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["HOST", "STATE", "RUNNING"]
    assert lines[1].startswith("host-a  live")
    assert "lease ended" in lines[2]
    code, out = cli("hosts", "--json")
    assert [h["host_id"] for h in json.loads(out)] == ["host-a", "host-b"]
    snaps = ApiClient(cluster_live.url).snapshots()
    assert [(s["work_item"], s["host"]) for s in snaps] == [("far", "host-b")]
    code, out = cli("snapshots")
    assert out.splitlines()[0].split()[-1] == "HOST"
    assert out.splitlines()[1].split()[-1] == "host-b"


def test_the_openapi_document_names_hosts() -> None:
    doc = openapi_document()
    assert "get" in doc["paths"]["/hosts"]


def test_a_fenced_host_answers_unhealthy(cluster_live: Served) -> None:
    assert cluster_live.app.health()[0]
    ref = cluster_live.app.supervisor_ref
    assert ref is not None
    ref.tell(Fence("test: the lease is not renewed"))
    _ok, reason = eventually(cluster_live.app.health, lambda h: not h[0], "unhealthy")
    assert reason.startswith("fenced")
