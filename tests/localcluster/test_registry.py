"""The throwaway registry: a real ``docker-registry`` that tests can stop and start again."""

from __future__ import annotations

import hashlib
import http.client
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from actors.localcluster.registry import LocalRegistry


@pytest.fixture
def registry() -> Iterator[LocalRegistry]:
    with LocalRegistry() as started:
        yield started


def upload_blob(registry: LocalRegistry, name: str, data: bytes) -> str:
    """A two-step blob upload (POST, then PUT with the digest), as a client does it."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    conn = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=10)
    try:
        conn.request("POST", f"/v2/{name}/blobs/uploads/")
        started = conn.getresponse()
        started.read()
        assert started.status == 202
        location = urlsplit(started.getheader("Location") or "")
        conn.request(
            "PUT",
            f"{location.path}?{location.query}&digest={digest}",
            body=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        done = conn.getresponse()
        done.read()
        assert done.status == 201, done.status
    finally:
        conn.close()
    return digest


def test_the_registry_serves_on_loopback_and_answers_the_v2_ping(registry: LocalRegistry) -> None:
    assert registry.address.startswith("127.0.0.1:")
    assert registry.answers()
    assert registry.repository("snap/x") == f"127.0.0.1:{registry.port}/snap/x"
    assert "delete:\n    enabled: true" in registry.config_path.read_text()


def test_stopped_and_started_again_it_keeps_its_port_and_its_blobs(
    registry: LocalRegistry,
) -> None:
    digest = upload_blob(registry, "snap/x", b"a layer")
    assert digest in registry.blobs()
    port = registry.port
    registry.stop()
    assert not registry.running
    assert not registry.answers()
    registry.start()
    assert registry.port == port
    assert registry.answers()
    assert digest in registry.blobs()


def test_killed_it_stops_answering_at_once(registry: LocalRegistry) -> None:
    registry.kill()
    assert not registry.answers()
    registry.start()
    assert registry.answers()


def test_close_deletes_its_directory() -> None:
    registry = LocalRegistry()
    with registry:
        assert registry.storage.is_dir()
    assert not registry.directory.exists()
    assert not registry.answers()
