"""``GET /hosts`` and ``snapyard hosts``: the cluster's hosts from any host.

On one host (no [cluster]) the list is empty and the CLI says why; with a
cluster store the facade reads the shared hosts table (test_cluster_hosts.py
runs that on PostgreSQL). Here the facade is the real Snapyard, given a store
that also answers ``hosts()``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_kit import Served, served

from actors.api_schema import openapi_document
from actors.cli import main
from actors.client import ApiClient
from actors.store.cluster import HostInfo

NOW = 1_700_000_000.0


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


def test_hosts_show_each_lease(live: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    hosts = [
        HostInfo("host-a", NOW - 60, NOW - 1, 4e9, "10.0.0.1:8750", 4, 2, False),
        HostInfo("host-b", NOW - 60, NOW - 30, NOW - 20, "10.0.0.2:8750", 4, 0, False),
    ]
    monkeypatch.setattr(live.app, "hosts", lambda: hosts)
    listed: list[dict[str, Any]] = ApiClient(live.url).hosts()
    assert [(h["host_id"], h["live"], h["running"]) for h in listed] == [
        ("host-a", True, 2),
        ("host-b", False, 0),
    ]
    assert set(listed[0]) == set(openapi_document()["components"]["schemas"]["Host"]["required"])
    code, out = cli("hosts")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["HOST", "STATE", "RUNNING"]
    assert "host-a  live" in lines[1]
    assert "2/4" in lines[1]
    assert "lease ended" in lines[2]
    code, out = cli("hosts", "--json")
    assert [h["host_id"] for h in json.loads(out)] == ["host-a", "host-b"]


def test_the_openapi_document_names_hosts() -> None:
    doc = openapi_document()
    assert "get" in doc["paths"]["/hosts"]
