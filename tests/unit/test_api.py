"""The HTTP API over loopback on an ephemeral port.

Most tests drive the real supervisor (``Snapyard`` on the MemoryEngine); a
small fake facade covers what the real one cannot be made to do on demand
(a dead actor system, a failing health check).
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pykka
import pytest

from actors.api import (
    JOB_FIELDS,
    MAX_BODY_BYTES,
    SNAPSHOT_FIELDS,
    ApiServer,
    check_bind_allowed,
    is_loopback,
    iso_time,
    job_json,
    snapshot_json,
)
from actors.client import ApiClient, ApiError, ApiUnreachable
from actors.model import Job, JobSpec, JobState, Snapshot, SnapshotKey
from actors.settings import ApiSettings, SettingsError

T0 = 1_700_000_000.0


class FakeApp:
    """A facade with canned answers, for failure modes the real one won't show on cue."""

    def __init__(self) -> None:
        self.jobs_by_id: dict[str, Job] = {}
        self.snaps: dict[SnapshotKey, Snapshot] = {}
        self.healthy = (True, "engine answers; actors alive")
        self.raise_on_get: BaseException | None = None
        self.submitted: list[JobSpec] = []
        self.lock = threading.Lock()

    def submit(self, spec: JobSpec) -> Job:
        with self.lock:
            self.submitted.append(spec)
            job = Job(
                id=f"job-{len(self.submitted)}", spec=spec, state=JobState.QUEUED, created_at=T0
            )
            self.jobs_by_id[job.id] = job
            return job

    def get(self, job_id: str) -> Job | None:
        if self.raise_on_get is not None:
            raise self.raise_on_get
        return self.jobs_by_id.get(job_id)

    def jobs(
        self, state: JobState | None = None, project: str | None = None, limit: int = 100
    ) -> list[Job]:
        found = [
            j
            for j in self.jobs_by_id.values()
            if (state is None or j.state == state)
            and (project is None or j.spec.project == project)
        ]
        return found[:limit]

    def cancel(self, job_id: str) -> Job | None:
        job = self.jobs_by_id.get(job_id)
        if job is None:
            return None
        job = replace(job, state=JobState.CANCELLED, finished_at=T0 + 5)
        self.jobs_by_id[job_id] = job
        return job

    def snapshots(self) -> list[Snapshot]:
        return list(self.snaps.values())

    def remove_snapshot(self, key: SnapshotKey) -> bool:
        return self.snaps.pop(key, None) is not None

    def prune_snapshots(self) -> list[Snapshot]:
        evicted = list(self.snaps.values())
        self.snaps.clear()
        return evicted

    def health(self) -> tuple[bool, str]:
        return self.healthy


def make_snapshot(project: str = "p", work_item: str = "w") -> Snapshot:
    return Snapshot(
        key=SnapshotKey(project, work_item),
        image_id="sha256:" + "a" * 64,
        tag="snapyard-snapshot/p.w:k123",
        base_image_id="sha256:" + "b" * 64,
        created_at=T0,
        last_used_at=T0 + 60,
        size_bytes=1234,
        layers=3,
    )


@pytest.fixture
def fake() -> FakeApp:
    return FakeApp()


@pytest.fixture
def fake_server(fake: FakeApp) -> Iterator[ApiServer]:
    with ApiServer(fake, ApiSettings(host="127.0.0.1", port=0)) as server:
        yield server


def raw(
    server: ApiServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One request with full control over headers and body; returns decoded JSON when JSON."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()
    if hdrs.get("content-type", "").startswith("application/json"):
        return resp.status, hdrs, json.loads(data)
    return resp.status, hdrs, data.decode()


def post_json(server: ApiServer, path: str, body: object) -> tuple[int, dict[str, str], Any]:
    return raw(
        server,
        "POST",
        path,
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )


# --- shapes -------------------------------------------------------------------


def test_job_json_has_the_stable_fields_and_never_env() -> None:
    spec = JobSpec("proj", "item", "review", ("echo", "hi"), {"TOKEN": "s3cret"}, 30.0)
    job = Job(
        id="j1",
        spec=spec,
        state=JobState.SUCCEEDED,
        created_at=T0,
        image_id="sha256:abc",
        from_snapshot=True,
        snapshot_committed=True,
        exit_code=0,
        started_at=T0 + 1.5,
        finished_at=T0 + 2.25,
    )
    body = job_json(job)
    assert tuple(body) == JOB_FIELDS
    assert body["id"] == "j1"
    assert body["state"] == "succeeded"
    assert body["project"] == "proj"
    assert body["work_item"] == "item"
    assert body["agent_type"] == "review"
    assert body["image_id"] == "sha256:abc"
    assert body["from_snapshot"] is True
    assert body["snapshot_committed"] is True
    assert body["exit_code"] == 0
    assert body["error"] is None
    assert body["created_at"] == "2023-11-14T22:13:20.000Z"
    assert body["started_at"] == "2023-11-14T22:13:21.500Z"
    assert body["finished_at"] == "2023-11-14T22:13:22.250Z"
    assert "s3cret" not in json.dumps(body)
    assert "env" not in body


def test_snapshot_json_has_the_stable_fields() -> None:
    body = snapshot_json(make_snapshot())
    assert tuple(body) == SNAPSHOT_FIELDS
    assert body["project"] == "p"
    assert body["work_item"] == "w"
    assert body["image_id"] == "sha256:" + "a" * 64
    assert body["tag"] == "snapyard-snapshot/p.w:k123"
    assert body["base_image_id"] == "sha256:" + "b" * 64
    assert body["size_bytes"] == 1234
    assert body["layers"] == 3
    assert body["created_at"] == "2023-11-14T22:13:20.000Z"
    assert body["last_used_at"] == "2023-11-14T22:14:20.000Z"


def test_iso_time_of_none_is_none() -> None:
    assert iso_time(None) is None


# --- bind safety ----------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"])
def test_loopback_addresses_are_recognised(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "example.com", ""])
def test_other_addresses_are_not_loopback(host: str) -> None:
    assert not is_loopback(host)


def test_non_loopback_without_token_is_refused_at_start_up(fake: FakeApp) -> None:
    with pytest.raises(SettingsError) as info:
        ApiServer(fake, ApiSettings(host="0.0.0.0", port=0))
    assert info.value.key == "api.host"
    assert info.value.value == "0.0.0.0"
    assert "SNAPYARD_API_TOKEN" in info.value.allowed


def test_non_loopback_with_token_is_allowed() -> None:
    check_bind_allowed(ApiSettings(host="0.0.0.0", port=0, token="t"))


# --- failure modes the fake makes easy ---------------------------------------------


def test_healthz_is_503_with_the_reason_when_unhealthy(
    fake: FakeApp, fake_server: ApiServer
) -> None:
    fake.healthy = (False, "engine unreachable at unix:///nowhere")
    status, _, body = raw(fake_server, "GET", "/healthz")
    assert status == 503
    assert body["ok"] is False
    assert body["reason"] == "engine unreachable at unix:///nowhere"
    assert ApiClient(fake_server.url).health() == (False, "engine unreachable at unix:///nowhere")


def test_a_dead_actor_system_answers_503_not_a_traceback(
    fake: FakeApp, fake_server: ApiServer
) -> None:
    fake.raise_on_get = pykka.ActorDeadError("supervisor stopped")
    status, _, body = raw(fake_server, "GET", "/jobs/x")
    assert status == 503
    assert body["error"] == "the supervisor is not answering: supervisor stopped"


def test_an_unexpected_error_is_500_and_names_no_internals(
    fake: FakeApp, fake_server: ApiServer
) -> None:
    fake.raise_on_get = RuntimeError("boom at /secret/path")
    status, _, body = raw(fake_server, "GET", "/jobs/x")
    assert status == 500
    assert body["error"] == "internal error (RuntimeError); see the supervisor's log"


def test_prune_returns_the_evicted_snapshots(fake: FakeApp, fake_server: ApiServer) -> None:
    fake.snaps[SnapshotKey("p", "w")] = make_snapshot()
    status, _, body = post_json(fake_server, "/snapshots/prune", {})
    assert status == 200
    assert [s["work_item"] for s in body["evicted"]] == ["w"]
    assert fake.snaps == {}


def test_unreachable_api_names_the_address_and_snapyard_run() -> None:
    client = ApiClient("http://127.0.0.1:9", timeout_s=2)
    with pytest.raises(ApiUnreachable) as info:
        client.jobs()
    assert info.value.url == "http://127.0.0.1:9"
    assert "snapyard run" in str(info.value)
    assert "http://127.0.0.1:9" in str(info.value)


# --- request handling, on the fake (protocol-level) --------------------------------


def test_malformed_json_is_400_with_a_clear_message(fake_server: ApiServer) -> None:
    status, _, body = raw(
        fake_server, "POST", "/jobs", b"{not json", {"Content-Type": "application/json"}
    )
    assert status == 400
    assert body["error"].startswith("the body is not valid JSON")


def test_wrong_content_type_is_400(fake_server: ApiServer) -> None:
    status, _, body = raw(
        fake_server, "POST", "/jobs", b"project=p", {"Content-Type": "text/plain"}
    )
    assert status == 400
    assert body["error"] == (
        "the body must be JSON with Content-Type: application/json, not 'text/plain'"
    )


def test_a_json_array_is_422(fake_server: ApiServer) -> None:
    status, _, body = post_json(fake_server, "/jobs", ["p", "w"])
    assert status == 422
    assert body["error"] == "the body must be a JSON object"


def test_oversized_bodies_are_refused_before_reading(fake_server: ApiServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", fake_server.port, timeout=10)
    try:
        conn.putrequest("POST", "/jobs")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
        conn.endheaders()
        resp = conn.getresponse()
        body = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 413
    assert body["error"] == (
        f"the body is {MAX_BODY_BYTES + 1} bytes; at most {MAX_BODY_BYTES} are accepted"
    )


def test_unknown_endpoint_is_404_and_wrong_method_405(fake_server: ApiServer) -> None:
    status, _, body = raw(fake_server, "GET", "/nope")
    assert status == 404
    assert body["error"] == "no such endpoint: /nope"
    status, headers, body = raw(fake_server, "PUT", "/jobs")
    assert status == 405
    assert headers["allow"] == "GET, POST"
    assert body["error"] == "PUT is not allowed on /jobs; allowed: GET, POST"


def test_client_does_not_use_an_http_proxy_from_the_environment(
    fake_server: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    assert ApiClient(fake_server.url).health() == (True, "engine answers; actors alive")


def test_client_error_carries_status_message_and_field(fake_server: ApiServer) -> None:
    client = ApiClient(fake_server.url)
    with pytest.raises(ApiError) as info:
        client.submit({"project": "", "work_item": "w"})
    assert info.value.status == 422
    assert info.value.field == "project"
    assert info.value.message == "project must not be empty"
