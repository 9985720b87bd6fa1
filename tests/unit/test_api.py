"""The HTTP API over loopback on an ephemeral port.

Most tests drive the real supervisor (``Snapyard`` on the MemoryEngine); a
small fake facade covers what the real one cannot be made to do on demand
(a dead actor system, a failing health check).
"""

from __future__ import annotations

import dataclasses
import gc
import http.client
import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pykka
import pytest
from api_kit import BASE_TAG, WAIT_S, Served, served
from prometheus_client import CONTENT_TYPE_LATEST

from actors.api import ApiServer, check_bind_allowed, is_loopback
from actors.api_routes import MAX_BODY_BYTES
from actors.api_schema import openapi_document
from actors.cli import EXIT_UNREACHABLE
from actors.cli import main as cli_main
from actors.client import ApiClient, ApiError, ApiUnreachable
from actors.metrics import Metrics
from actors.model import Job, JobSpec, JobState, Snapshot, SnapshotKey, validate_spec
from actors.settings import (
    AgentTypeSettings,
    ApiSettings,
    SentrySettings,
    Settings,
    SettingsError,
)
from actors.store import StoreUnavailable, new_job_id
from actors.telemetry import RecordingTransport, close_sentry, flush_sentry, setup_sentry
from actors.wire import JOB_FIELDS, SNAPSHOT_FIELDS, iso_time, job_json, snapshot_json

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
        self.metrics = Metrics.unscraped()
        self.settings = Settings(agent_types={"review": AgentTypeSettings()})
        self.health_checks = 0

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

    def prune_jobs(self) -> int:
        return 0

    def prune_snapshots(self) -> list[Snapshot]:
        evicted = list(self.snaps.values())
        self.snaps.clear()
        return evicted

    def health(self) -> tuple[bool, str]:
        self.health_checks += 1
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
        own_bytes=234,
    )


@pytest.fixture
def thawed_heap() -> Iterator[None]:
    """Attaching an app freezes the heap (``freeze_startup_heap``), as it must in
    ``snapyard run``; a test process thaws it again so its garbage is collected."""
    yield
    gc.unfreeze()


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


def test_snapshot_json_says_null_when_its_own_bytes_are_unknown() -> None:
    unknown = dataclasses.replace(make_snapshot(), own_bytes=None)
    assert snapshot_json(unknown)["own_bytes"] is None


def test_snapshot_json_has_the_stable_fields() -> None:
    body = snapshot_json(make_snapshot())
    assert tuple(body) == SNAPSHOT_FIELDS
    assert body["project"] == "p"
    assert body["work_item"] == "w"
    assert body["image_id"] == "sha256:" + "a" * 64
    assert body["tag"] == "snapyard-snapshot/p.w:k123"
    assert body["base_image_id"] == "sha256:" + "b" * 64
    assert body["size_bytes"] == 1234
    assert body["own_bytes"] == 234
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


STORE_AWAY = (
    "the cluster database 127.0.0.1:5432/snapyard cannot be reached (connection refused). "
    "Check that PostgreSQL runs and that [cluster] database_url is right."
)


def test_an_unreachable_store_is_503_with_its_message_and_the_cli_exits_3(
    fake: FakeApp,
    fake_server: ApiServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cluster's PostgreSQL away is expected and retryable: not a 500 "internal error"."""
    fake.raise_on_get = StoreUnavailable(STORE_AWAY)
    status, _, body = raw(fake_server, "GET", "/jobs/x")
    assert status == 503
    assert body["error"] == STORE_AWAY
    responses = openapi_document()["paths"]["/jobs/{id}"]["get"]["responses"]
    assert "job store" in responses["503"]["description"]
    monkeypatch.setenv("SNAPYARD_API", f"127.0.0.1:{fake_server.port}")
    out, err = io.StringIO(), io.StringIO()
    assert cli_main(["job", "x"], out=out, err=err) == EXIT_UNREACHABLE
    assert STORE_AWAY in err.getvalue()
    assert "internal error" not in err.getvalue()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_the_api_logs_a_store_outage_once_and_its_end_once(
    fake: FakeApp, fake_server: ApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="actors.api")
    fake.raise_on_get = StoreUnavailable(STORE_AWAY)
    for _ in range(3):
        assert raw(fake_server, "GET", "/jobs/x")[0] == 503
    fake.raise_on_get = None
    for _ in range(2):
        assert raw(fake_server, "GET", "/jobs/x")[0] == 404
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "actors.api"]
    assert said == [
        (
            logging.WARNING,
            f"api: the job store is unavailable; retrying quietly until it answers: {STORE_AWAY}",
        ),
        (logging.INFO, "api: the job store answers again"),
    ]


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


def test_a_key_given_twice_is_400_naming_it(fake_server: ApiServer, fake: FakeApp) -> None:
    """Found by a newcomer: ``{"project": "a", "project": "b"}`` queued a job for
    "b" (the last one won), which a proxy or reader keeping the first calls "a"."""
    for body, key in (
        (b'{"project": "a", "work_item": "w", "project": "b"}', "project"),
        (b'{"project": "p", "work_item": "w", "env": {"K": "1", "K": "2"}}', "K"),
    ):
        status, _, answer = raw(
            fake_server, "POST", "/jobs", body, {"Content-Type": "application/json"}
        )
        assert status == 400, answer
        assert answer == {
            "error": f"the body gives the key {key!r} more than once; give each key once",
            "field": key,
        }
    assert fake.submitted == []


def test_an_unknown_agent_type_is_422_listing_the_known_ones(
    fake_server: ApiServer, fake: FakeApp
) -> None:
    """Found by a newcomer: agent_type "reveiw" (no [agent_types.reveiw] table)
    ran silently on the default image and limits."""
    status, _, body = post_json(
        fake_server, "/jobs", {"project": "p", "work_item": "w", "agent_type": "reveiw"}
    )
    assert status == 422
    assert body == {
        "error": "agent_type 'reveiw' is not a configured agent type: add an "
        "[agent_types.reveiw] table to the configuration (an empty one runs it on the "
        "defaults); known agent types: default, review",
        "field": "agent_type",
    }
    assert fake.submitted == []
    for known in ("default", "review"):  # default needs no table
        status, _, body = post_json(
            fake_server, "/jobs", {"project": "p", "work_item": "w", "agent_type": known}
        )
        assert status == 201, body
    assert [spec.agent_type for spec in fake.submitted] == ["default", "review"]


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


# --- the real supervisor (MemoryEngine) over loopback ---------------------------------

SECRET = "hunter2-very-secret-value"


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Served]:
    with served(tmp_path, agent_types={"review": AgentTypeSettings()}) as s:
        yield s


def submit(live: Served, **body: Any) -> dict[str, Any]:
    status, _, job = post_json(live.server, "/jobs", body)
    assert status == 201, job
    return dict(job)


def finished(live: Served, job_id: str) -> dict[str, Any]:
    live.app.wait(job_id, WAIT_S)
    status, _, job = raw(live.server, "GET", f"/jobs/{job_id}")
    assert status == 200
    return dict(job)


def assert_iso(value: object) -> None:
    assert isinstance(value, str)
    assert value.endswith("Z")
    datetime.fromisoformat(value)


def test_submit_answers_201_with_the_queued_job(live: Served) -> None:
    status, headers, job = post_json(
        live.server,
        "/jobs",
        {
            "project": "proj",
            "work_item": "item-1",
            "agent_type": "review",
            "command": ["sh", "-c", "echo hi"],
            "env": {"API_TOKEN": SECRET},
            "timeout_s": 60,
        },
    )
    assert status == 201
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert tuple(job) == JOB_FIELDS
    assert isinstance(job["id"], str)
    assert job["id"]
    assert job["state"] in ("queued", "starting", "running", "succeeded")
    assert job["project"] == "proj"
    assert job["work_item"] == "item-1"
    assert job["agent_type"] == "review"
    assert job["exit_code"] is None or job["exit_code"] == 0
    assert job["error"] is None
    assert_iso(job["created_at"])
    assert SECRET not in json.dumps(job)


def test_a_finished_job_reads_back_field_by_field_and_never_shows_env(live: Served) -> None:
    job = submit(live, project="proj", work_item="item-1", env={"API_TOKEN": SECRET})
    status, _, _ = raw(live.server, "GET", f"/jobs/{job['id']}")
    assert status == 200
    done = finished(live, job["id"])
    base_id = live.engine.inspect_image(BASE_TAG).id
    assert tuple(done) == JOB_FIELDS
    assert done["id"] == job["id"]
    assert done["state"] == "succeeded"
    assert done["project"] == "proj"
    assert done["work_item"] == "item-1"
    assert done["agent_type"] == "default"
    assert done["image_id"] == base_id
    assert done["from_snapshot"] is False
    assert done["snapshot_committed"] is True
    assert done["exit_code"] == 0
    assert done["error"] is None
    assert done["created_at"] == job["created_at"]
    assert_iso(done["started_at"])
    assert_iso(done["finished_at"])
    assert done["started_at"] <= done["finished_at"]
    for path in (f"/jobs/{job['id']}", "/jobs", f"/jobs/{job['id']}/logs"):
        assert SECRET not in json.dumps(raw(live.server, "GET", path)[2])


def test_the_second_run_of_a_work_item_starts_from_its_snapshot(live: Served) -> None:
    first = finished(live, submit(live, project="p", work_item="w")["id"])
    status, _, snaps = raw(live.server, "GET", "/snapshots")
    assert status == 200
    assert len(snaps["snapshots"]) == 1
    snap = snaps["snapshots"][0]
    second = finished(live, submit(live, project="p", work_item="w")["id"])
    assert first["from_snapshot"] is False
    assert second["from_snapshot"] is True
    assert second["image_id"] == snap["image_id"]
    assert second["state"] == "succeeded"
    assert tuple(snap) == SNAPSHOT_FIELDS
    assert snap["project"] == "p"
    assert snap["work_item"] == "w"
    assert snap["image_id"] != first["image_id"]
    assert snap["base_image_id"] == live.engine.inspect_image(BASE_TAG).id
    assert snap["tag"].startswith("snapyard-snapshot/p.w:k")
    assert snap["size_bytes"] > 0
    assert snap["layers"] >= 1
    assert_iso(snap["created_at"])
    assert_iso(snap["last_used_at"])
    # The clean second run replaced the snapshot with a fresh commit.
    (latest,) = raw(live.server, "GET", "/snapshots")[2]["snapshots"]
    assert latest["image_id"] != snap["image_id"]


def test_logs_endpoint_returns_the_worker_output(live: Served) -> None:
    job = finished(live, submit(live, project="p", work_item="logs")["id"])
    status, _, body = raw(live.server, "GET", f"/jobs/{job['id']}/logs")
    assert status == 200
    assert body["id"] == job["id"]
    assert body["state"] == "succeeded"
    assert "worker: setup starting" in body["logs"]
    assert "job done" in body["logs"]


def test_a_stale_snapshot_is_recovered_on_the_base_image(live: Served) -> None:
    finished(live, submit(live, project="p", work_item="stale")["id"])
    (snap,) = live.app.snapshots()
    live.engine.delete_image_behind_back(snap.image_id)
    job = finished(live, submit(live, project="p", work_item="stale")["id"])
    assert job["state"] == "succeeded"
    assert job["from_snapshot"] is False
    assert job["image_id"] == live.engine.inspect_image(BASE_TAG).id
    assert job["snapshot_committed"] is True


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"work_item": "w"}, "project", "project is required"),
        ({"project": "p"}, "work_item", "work_item is required"),
        ({"project": "", "work_item": "w"}, "project", "project must not be empty"),
        ({"project": "p", "work_item": 7}, "work_item", "work_item must be a string"),
        (
            {"project": "p", "work_item": "w", "command": "echo hi"},
            "command",
            "command must be a list of strings",
        ),
        (
            {"project": "p", "work_item": "w", "env": {"A": 1}},
            "env",
            "env the value of A must be a string",
        ),
        (
            {"project": "p", "work_item": "w", "env": {"SNAPYARD_X": "1"}},
            "env",
            "env SNAPYARD_X is reserved: names starting with SNAPYARD_ are set by Snapyard",
        ),
        (
            {"project": "p", "work_item": "w", "timeout_s": -1},
            "timeout_s",
            "timeout_s must be a positive, finite number of seconds, not -1",
        ),
        (
            {"project": "p", "work_item": "\u200b\u200b"},
            "work_item",
            "work_item has no visible character (only spaces and invisible ones such as U+200B)",
        ),
        (
            {"project": "p", "work_item": "w", "workitem": "typo"},
            "workitem",
            "unknown field 'workitem'; known fields: agent_type, command, env, project, timeout_s, work_item",
        ),
    ],
)
def test_bad_input_is_422_naming_the_field(
    live: Served, body: dict[str, Any], field: str, message: str
) -> None:
    status, _, answer = post_json(live.server, "/jobs", body)
    assert status == 422
    assert answer["field"] == field
    assert answer["error"] == message
    assert live.app.jobs() == []


def test_unknown_job_is_404(live: Served) -> None:
    for method in ("GET", "DELETE"):
        status, _, body = raw(live.server, method, "/jobs/no-such-job")
        assert status == 404
        assert body["error"] == "no job with id 'no-such-job'"
        assert body["field"] == "id"


def test_list_jobs_filters_by_state_project_and_limit(live: Served) -> None:
    a = finished(live, submit(live, project="alpha", work_item="1")["id"])
    b = finished(
        live, submit(live, project="beta", work_item="1", command=["sh", "-c", "exit 3"])["id"]
    )
    c = finished(live, submit(live, project="alpha", work_item="2")["id"])
    status, _, body = raw(live.server, "GET", "/jobs?project=alpha")
    assert status == 200
    assert sorted(j["id"] for j in body["jobs"]) == sorted([a["id"], c["id"]])
    status, _, body = raw(live.server, "GET", "/jobs?state=failed")
    assert [j["id"] for j in body["jobs"]] == [b["id"]]
    assert body["jobs"][0]["exit_code"] == 3
    assert body["jobs"][0]["snapshot_committed"] is False
    status, _, body = raw(live.server, "GET", "/jobs?limit=2")
    assert len(body["jobs"]) == 2
    status, _, body = raw(live.server, "GET", "/jobs?state=done")
    assert status == 422
    assert body["field"] == "state"
    assert body["error"] == (
        "state 'done' is not one of queued, starting, running, succeeded, failed, timed_out, cancelled"
    )
    status, _, body = raw(live.server, "GET", "/jobs?limit=0")
    assert status == 422
    assert body["field"] == "limit"


def test_cancel_a_running_job_then_409_once_it_ended(live: Served) -> None:
    job = submit(live, project="p", work_item="long", command=["sleep", "600"])
    wait_until_running(live, job["id"])
    status, _, body = raw(live.server, "DELETE", f"/jobs/{job['id']}")
    assert status == 200
    assert body["id"] == job["id"]
    done = finished(live, job["id"])
    assert done["state"] == "cancelled"
    assert done["snapshot_committed"] is False
    status, _, body = raw(live.server, "DELETE", f"/jobs/{job['id']}")
    assert status == 409
    assert body["error"] == f"job {job['id']} already ended (cancelled); nothing to cancel"


def wait_until_running(live: Served, job_id: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        job = live.app.get(job_id)
        assert job is not None
        if job.state is JobState.RUNNING:
            return
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never ran")


def test_delete_snapshot_takes_url_encoded_parts_and_deletes_the_image(live: Served) -> None:
    finished(live, submit(live, project="team/a", work_item="issue #7")["id"])
    (snap,) = live.app.snapshots()
    path = "/snapshots/" + quote("team/a", safe="") + "/" + quote("issue #7", safe="")
    status, _, body = raw(live.server, "DELETE", path)
    assert status == 200
    assert body == {"removed": True, "project": "team/a", "work_item": "issue #7"}
    assert live.app.snapshots() == []
    wait_image_gone(live, snap.image_id)
    status, _, body = raw(live.server, "DELETE", path)
    assert status == 404
    assert body["error"] == "no snapshot for team/a/issue #7"


def wait_image_gone(live: Served, image_id: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if not any(i.id == image_id for i in live.engine.list_images({})):
            return
        time.sleep(0.02)
    raise AssertionError(f"image {image_id} is still there")


def test_prune_runs_the_eviction_sweep_now(tmp_path: Path) -> None:
    with served(tmp_path, snapshots={"max_count": 1, "sweep_interval_s": 3600.0}) as live:
        finished(live, submit(live, project="p", work_item="old")["id"])
        finished(live, submit(live, project="p", work_item="new")["id"])
        before = {s.key.work_item for s in live.app.snapshots()}
        status, _, body = post_json(live.server, "/snapshots/prune", {})
        after = {s.key.work_item for s in live.app.snapshots()}
    assert status == 200
    assert after == {"new"}
    assert [s["work_item"] for s in body["evicted"]] == sorted(before - after)


def test_post_jobs_prune_deletes_finished_jobs_past_retention(tmp_path: Path) -> None:
    """Retention now: ``POST /jobs/prune`` -> 200 {"deleted": N}."""
    with served(tmp_path, supervisor={"retention_s": 3600.0}) as live:
        now = time.time()
        old = Job(new_job_id(), validate_spec("p", "old"), JobState.SUCCEEDED, now - 7300)
        live.app.store.add(dataclasses.replace(old, finished_at=now - 7200))
        kept = finished(live, submit(live, project="p", work_item="new")["id"])
        status, _, body = post_json(live.server, "/jobs/prune", {})
        assert status == 200
        assert body == {"deleted": 1}
        assert live.app.get(old.id) is None
        assert live.app.get(kept["id"]) is not None
        assert post_json(live.server, "/jobs/prune", {})[2] == {"deleted": 0}


def test_healthz_is_200_when_engine_and_actors_answer(live: Served) -> None:
    status, _, body = raw(live.server, "GET", "/healthz")
    assert status == 200
    assert body["ok"] is True
    assert body["reason"].startswith("ok:")


def test_healthz_is_503_when_the_engine_is_down(live: Served) -> None:
    live.engine.set_unavailable(True)
    status, _, body = raw(live.server, "GET", "/healthz")
    live.engine.set_unavailable(False)
    assert status == 503
    assert body["ok"] is False
    assert body["reason"]


def test_metrics_exposes_the_documented_families(live: Served) -> None:
    finished(live, submit(live, project="p", work_item="m")["id"])
    status, headers, text = raw(live.server, "GET", "/metrics")
    assert status == 200
    assert headers["content-type"] == CONTENT_TYPE_LATEST
    for family in (
        "snapyard_jobs",
        "snapyard_spawn_seconds",
        "snapyard_snapshot_hits_total",
        "snapyard_snapshot_misses_total",
        "snapyard_stale_snapshot_fallbacks_total",
        "snapyard_snapshot_evictions_total",
        "snapyard_running_workers",
        "snapyard_engine_errors_total",
    ):
        assert f"# TYPE {family} " in text
    assert 'snapyard_jobs{state="succeeded"} ' in text
    assert "snapyard_spawn_seconds_bucket{le=" in text
    assert (
        live.app.metrics.value("snapyard_api_requests_total", route="/metrics", method="GET") == 1
    )


def test_requests_are_counted_by_route_template_once_the_app_is_attached(
    fake: FakeApp, thawed_heap: None
) -> None:
    with ApiServer(None, ApiSettings(host="127.0.0.1", port=0)) as server:
        status, _, _ = raw(server, "GET", "/jobs")
        assert status == 503  # still starting: no app, so no registry to count in
        server.attach(fake)
        for path in ("/jobs/a", "/jobs/b", "/nowhere"):
            raw(server, "GET", path)
    requests = "snapyard_api_requests_total"
    assert fake.metrics.value(requests, route="/jobs/{id}", method="GET") == 2
    assert fake.metrics.value(requests, route="?", method="GET") == 1
    assert fake.metrics.value(requests, route="/jobs", method="GET") == 0


def test_bearer_token_guards_every_endpoint_but_healthz(tmp_path: Path) -> None:
    token = "t0ken-" + "x" * 20
    with served(tmp_path, api={"token": token}) as live:
        for method, path in (
            ("GET", "/jobs"),
            ("GET", "/jobs/x"),
            ("DELETE", "/jobs/x"),
            ("GET", "/snapshots"),
            ("POST", "/snapshots/prune"),
            ("POST", "/jobs/prune"),
            ("GET", "/metrics"),
            ("POST", "/jobs"),
            ("GET", "/events"),
            ("GET", "/jobs/x/logs?follow=true"),
            ("GET", "/openapi.json"),
            ("GET", "/no-such-endpoint"),
        ):
            status, headers, body = raw(live.server, method, path)
            assert status == 401, path
            assert headers["www-authenticate"] == 'Bearer realm="snapyard"'
            assert body["error"] == "a bearer token is required: Authorization: Bearer <api.token>"
        status, _, _ = raw(live.server, "GET", "/jobs", headers={"Authorization": "Bearer wrong"})
        assert status == 401
        status, _, _ = raw(live.server, "GET", "/jobs", headers={"Authorization": token})
        assert status == 401
        status, _, body = raw(
            live.server, "GET", "/jobs", headers={"Authorization": f"Bearer {token}"}
        )
        assert status == 200
        assert body == {"jobs": []}
        status, _, body = raw(live.server, "GET", "/healthz")
        assert status == 200
        assert ApiClient(live.url, token=token).jobs() == []


def test_sentry_gets_a_tagged_event_without_the_secret_when_the_base_image_is_gone(
    tmp_path: Path,
) -> None:
    transport = RecordingTransport()
    try:
        with served(tmp_path, agent_types={"review": AgentTypeSettings()}) as live:
            sentry = SentrySettings(dsn="https://public@127.0.0.1/1")
            setup_sentry(sentry, transport=transport, secrets=live.app.secrets)
            live.engine.delete_image_behind_back(BASE_TAG)
            job = submit(
                live,
                project="p",
                work_item="no-base",
                agent_type="review",
                env={"API_TOKEN": SECRET},
            )
            done = finished(live, job["id"])
        flush_sentry(5.0)
        events = [e for e in transport.events if e.get("tags", {}).get("source") == "spawner"]
    finally:
        close_sentry()
    assert done["state"] == "failed"
    assert done["from_snapshot"] is False
    assert done["error"] is not None
    assert done["error"].startswith("the worker base image 'snapyard-worker:latest' does not exist")
    assert SECRET not in json.dumps(done)
    assert len(events) == 1
    assert events[0]["tags"]["source"] == "spawner"
    assert events[0]["tags"]["job_type"] == "review"
    assert events[0]["extra"]["job_id"] == job["id"]
    assert transport.raw
    assert all(SECRET.encode() not in raw for raw in transport.raw)


def test_bodies_that_break_the_json_parser_are_400_not_500(fake_server: ApiServer) -> None:
    """Found in review: a 5,000-digit number, or nesting past the recursion
    limit, raised outside JSONDecodeError: a 500, with the body in a frame local."""
    for body in (
        b'{"project": "p", "work_item": "w", "timeout_s": ' + b"1" * 5000 + b"}",
        b"[" * 200_000,
    ):
        status, _, answer = raw(
            fake_server, "POST", "/jobs", body, {"Content-Type": "application/json"}
        )
        assert status == 400, answer


def test_a_path_that_is_not_utf8_is_400(fake_server: ApiServer) -> None:
    status, _, answer = raw(fake_server, "GET", "/healthz/%ff")
    assert status == 400
    assert answer["error"] == "the path is not valid UTF-8"


def test_a_refused_request_with_a_body_closes_the_connection(fake_server: ApiServer) -> None:
    """Found in review: the unread body of a 401/404 was parsed as the next request."""
    status, headers, _ = raw(
        fake_server,
        "POST",
        "/nowhere",
        b'{"env": {"API_KEY": "hunter2-secret"}}',
        {"Content-Type": "application/json"},
    )
    assert status == 404
    assert headers.get("connection") == "close"
