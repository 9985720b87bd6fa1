"""Registry references and Docker's push stream, read without a daemon."""

from __future__ import annotations

import pytest

from actors.engine._docker_registry import read_push, registry_error
from actors.engine.base import EngineError, ImageMissing, RegistryUnavailable
from actors.engine.references import push_tag, registry_of, split_digest

DIGEST = "sha256:" + "c3" * 32
# A second push of a child image, as Docker 20.10 streamed it (ids shortened).
CHILD_PUSH = [
    {"status": "The push refers to repository [127.0.0.1:5871/probe/x]"},
    {"status": "Preparing", "progressDetail": {}, "id": "aaa"},
    {"status": "Preparing", "progressDetail": {}, "id": "bbb"},
    {"status": "Preparing", "progressDetail": {}, "id": "ccc"},
    {"status": "Layer already exists", "progressDetail": {}, "id": "bbb"},
    {"status": "Layer already exists", "progressDetail": {}, "id": "ccc"},
    {"status": "Pushing", "progressDetail": {"current": 512, "total": 1284}, "id": "aaa"},
    {"status": "Pushed", "progressDetail": {}, "id": "aaa"},
    {"status": f"t1: digest: {DIGEST} size: 1150"},
    {"progressDetail": {}, "aux": {"Tag": "t1", "Digest": DIGEST, "Size": 1150}},
]


@pytest.mark.parametrize(
    ("repository", "registry"),
    [
        ("127.0.0.1:5000/snapyard/snapshots", "127.0.0.1:5000"),
        ("localhost/x", "localhost"),
        ("registry.internal/a/b@" + DIGEST, "registry.internal"),
        ("127.0.0.1:5000/x:tag", "127.0.0.1:5000"),
    ],
)
def test_the_registry_is_the_first_component_when_it_looks_like_a_host(
    repository: str, registry: str
) -> None:
    assert registry_of(repository) == registry


@pytest.mark.parametrize("repository", ["x", "library/ubuntu", "127.0.0.1:5000/A", "h.io/a//b"])
def test_a_name_docker_would_send_to_docker_hub_or_reject_is_refused(repository: str) -> None:
    with pytest.raises(EngineError) as caught:
        registry_of(repository)
    assert caught.value.status_code == 400


def test_a_pull_reference_must_carry_a_full_digest() -> None:
    assert split_digest(f"127.0.0.1:5000/x@{DIGEST}") == ("127.0.0.1:5000/x", DIGEST)
    for bad in ("127.0.0.1:5000/x:latest", "127.0.0.1:5000/x@sha256:abc", f"x@{DIGEST}"):
        with pytest.raises(EngineError):
            split_digest(bad)


def test_the_push_tag_is_the_image_ids_hex() -> None:
    assert push_tag("sha256:" + "ab" * 32) == "sha256-" + "ab" * 32
    assert len(push_tag("sha256:" + "ab" * 32)) <= 128  # Docker's tag limit


def test_a_push_stream_tells_uploaded_layers_from_those_already_there() -> None:
    report = read_push(CHILD_PUSH, "127.0.0.1:5871", "127.0.0.1:5871/probe/x:t1")
    assert report.digest == DIGEST
    assert report.uploaded == {"aaa"}
    assert report.present == {"bbb", "ccc"}


def test_a_push_stream_error_is_typed_by_what_it_says() -> None:
    refused = (
        'Get "http://127.0.0.1:5999/v2/": dial tcp 127.0.0.1:5999: connect: connection refused'
    )
    stream = [{"status": "The push refers to repository [x]"}, {"error": refused}]
    with pytest.raises(RegistryUnavailable) as caught:
        read_push(stream, "127.0.0.1:5999", "127.0.0.1:5999/x:t")
    assert caught.value.registry == "127.0.0.1:5999"
    missing = "manifest for r@sha256:00 not found: manifest unknown: manifest unknown"
    assert isinstance(registry_error("r", "r@sha256:00", missing), ImageMissing)
    other = registry_error("r", "ref", "denied: requested access to the resource is denied")
    assert type(other) is EngineError


def test_a_push_stream_without_a_digest_is_an_error() -> None:
    with pytest.raises(EngineError, match="without a digest"):
        read_push(CHILD_PUSH[:-2], "127.0.0.1:5871", "ref")
