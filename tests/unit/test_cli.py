"""The ``snapyard`` command against a real supervisor (MemoryEngine) over loopback.

``main`` is called in-process with the API address in the environment, as a
user's shell would set it; its output streams are captured. The ``--json``
shapes are asserted field by field, and every documented exit code has a test:
0 ok, 1 failed job / refused request, 2 usage or config, 3 unreachable.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_kit import BASE_TAG, WAIT_S, Served, served

from actors.cli import main
from actors.model import Job, JobState, validate_spec
from actors.settings import AgentTypeSettings
from actors.store import new_job_id
from actors.wire import JOB_FIELDS, SNAPSHOT_FIELDS

SECRET = "cli-secret-value-0451"


class Run:
    """One finished CLI invocation."""

    def __init__(self, code: int, out: str, err: str) -> None:
        self.code = code
        self.out = out
        self.err = err

    def json(self) -> Any:
        return json.loads(self.out)


def cli(*argv: str) -> Run:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return Run(code, out.getvalue(), err.getvalue())


@pytest.fixture
def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    with served(tmp_path, agent_types={"review": AgentTypeSettings()}) as s:
        for name, value in s.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("SNAPYARD_API_TOKEN", raising=False)
        yield s


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def submit_wait(*extra: str) -> Run:
    return cli("submit", "--project", "p", "--work-item", "w", "--wait", "--json", *extra)


# --- submit -----------------------------------------------------------------------


def test_submit_json_prints_one_job_object(live: Served) -> None:
    run = cli("submit", "--project", "p", "--work-item", "w1", "--agent-type", "review", "--json")
    assert run.code == 0
    job = run.json()
    assert tuple(job) == JOB_FIELDS
    assert job["project"] == "p"
    assert job["work_item"] == "w1"
    assert job["agent_type"] == "review"
    assert job["state"] in ("queued", "starting", "running", "succeeded")
    assert job["error"] is None
    assert live.app.get(job["id"]) is not None
    live.app.wait(job["id"], WAIT_S)


def test_submit_wait_exits_0_on_success_with_the_final_job(live: Served) -> None:
    run = submit_wait("--env", f"API_TOKEN={SECRET}", "--timeout", "60")
    assert run.code == 0
    job = run.json()
    assert tuple(job) == JOB_FIELDS
    assert job["state"] == "succeeded"
    assert job["project"] == "p"
    assert job["work_item"] == "w"
    assert job["agent_type"] == "default"
    assert job["image_id"] == live.engine.inspect_image(BASE_TAG).id
    assert job["from_snapshot"] is False
    assert job["snapshot_committed"] is True
    assert job["exit_code"] == 0
    assert job["error"] is None
    assert job["created_at"] is not None
    assert job["started_at"] is not None
    assert job["finished_at"] is not None
    assert SECRET not in run.out
    assert SECRET not in run.err
    stored = live.app.get(job["id"])
    assert stored is not None
    assert stored.spec.env == {}  # the job ended: its secrets left the store (issue 11, 4)
    assert stored.spec.timeout_s == 60.0


def test_submit_wait_exits_1_when_the_job_fails(live: Served) -> None:
    run = submit_wait("--", "sh", "-c", "exit 3")
    assert run.code == 1
    job = run.json()
    assert job["state"] == "failed"
    assert job["exit_code"] == 3
    assert job["snapshot_committed"] is False
    stored = live.app.get(job["id"])
    assert stored is not None
    assert stored.spec.command == ("sh", "-c", "exit 3")


def test_submit_wait_human_output_names_the_outcome(live: Served) -> None:
    run = cli("submit", "--project", "p", "--work-item", "human", "--wait")
    assert run.code == 0
    fields = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in run.out.splitlines())
    assert fields["state"] == "succeeded"
    assert fields["project"] == "p"
    assert fields["work item"] == "human"
    assert fields["from snapshot"] == "no"
    assert fields["snapshot committed"] == "yes"
    assert fields["exit code"] == "0"
    assert fields["error"] == "-"
    # Aligned: every value starts in the same column.
    starts = {len(line) - len(fields[line.split("  ")[0]]) for line in run.out.splitlines()}
    assert starts == {len("snapshot committed  ")}


def test_second_submit_starts_from_the_snapshot(live: Served) -> None:
    assert submit_wait().json()["from_snapshot"] is False
    second = submit_wait().json()
    assert second["from_snapshot"] is True
    assert second["state"] == "succeeded"


def test_invalid_input_is_a_usage_error_naming_the_field(live: Served) -> None:
    run = cli("submit", "--project", "", "--work-item", "w")
    assert run.code == 2
    assert run.err == "snapyard: project must not be empty\n"
    run = cli("submit", "--project", "p", "--work-item", "w", "--env", "NOEQUALS")
    assert run.code == 2
    assert run.err == "snapyard: --env #1: expected NAME=VALUE\n"
    run = cli("submit", "--project", "p", "--work-item", "w", "--env", "SNAPYARD_X=1")
    assert run.code == 2
    assert "SNAPYARD_X is reserved" in run.err
    run = cli("submit", "--project", "p", "--work-item", "w", "--env", "K=1", "--env", "K=2")
    assert run.code == 2  # as the API refuses a key given twice; last-wins was a guess
    assert run.err == "snapyard: --env #2: K is already set by --env #1; give it once\n"
    assert live.app.jobs() == []


def test_an_unknown_agent_type_is_refused_listing_the_known_ones(live: Served) -> None:
    """Found by a newcomer: --agent-type with no [agent_types.NAME] table ran
    silently on the defaults. The API refuses it; the CLI says so, exit 2."""
    run = cli("submit", "--project", "p", "--work-item", "w", "--agent-type", "reveiw")
    assert run.code == 2
    assert "'reveiw' is not a configured agent type" in run.err
    assert "known agent types: default, review" in run.err
    run = cli("submit", "--project", "p", "--work-item", "w", "--agent-type", "reveiw", "--json")
    assert run.code == 2
    assert json.loads(run.err)["field"] == "agent_type"
    assert live.app.jobs() == []


def test_missing_required_option_is_usage_exit_2() -> None:
    run = cli("submit", "--work-item", "w")
    assert run.code == 2
    assert "the following arguments are required: --project" in run.err
    assert "usage: snapyard submit" in run.err
    assert cli().code == 2
    assert cli("frobnicate").code == 2


# --- jobs, job, cancel -----------------------------------------------------------------


def test_jobs_table_and_json(live: Served) -> None:
    ok = submit_wait().json()
    bad = submit_wait("--", "sh", "-c", "exit 4").json()
    run = cli("jobs")
    assert run.code == 0
    header, *rows = run.out.splitlines()
    assert header.split() == [
        "ID",
        "STATE",
        "PROJECT",
        "WORK",
        "ITEM",
        "AGENT",
        "IMAGE",
        "EXIT",
        "TOOK",
        "CREATED",
    ]
    assert len(rows) == 2
    # Aligned: every row's STATE column starts where the header's does.
    col = header.index("STATE")
    assert sorted(r[col:].split()[0] for r in rows) == ["failed", "succeeded"]
    listed = cli("jobs", "--json").json()
    assert sorted(j["id"] for j in listed) == sorted([ok["id"], bad["id"]])
    for job in listed:
        assert tuple(job) == JOB_FIELDS
    failed = cli("jobs", "--state", "failed", "--json").json()
    assert [j["id"] for j in failed] == [bad["id"]]
    assert failed[0]["exit_code"] == 4
    assert cli("jobs", "--state", "nonsense").code == 2


def test_job_shows_one_job_and_its_logs(live: Served) -> None:
    job = submit_wait().json()
    run = cli("job", job["id"], "--json", "--logs")
    assert run.code == 0
    body = run.json()
    assert tuple(body) == (*JOB_FIELDS, "logs")
    assert body["id"] == job["id"]
    assert body["state"] == "succeeded"
    assert "worker: setup starting" in body["logs"]
    plain = cli("job", job["id"], "--logs")
    assert plain.code == 0
    assert f"id                  {job['id']}" in plain.out
    assert "--- logs (tail) ---" in plain.out
    assert "job done" in plain.out
    assert cli("job", job["id"], "--json").json() == job


def test_unknown_job_is_exit_1(live: Served) -> None:
    run = cli("job", "nope")
    assert run.code == 1
    assert run.err == "snapyard: no job with id 'nope'\n"
    assert cli("cancel", "nope").code == 1


def test_cancel_a_running_job(live: Served) -> None:
    job = cli(
        "submit", "--project", "p", "--work-item", "long", "--json", "--", "sleep", "600"
    ).json()
    run = cli("cancel", job["id"])
    assert run.code == 0
    assert run.out.startswith(f"job {job['id']}: ")
    done = live.app.wait(job["id"], WAIT_S)
    assert done.state == "cancelled"
    again = cli("cancel", job["id"])
    assert again.code == 1
    assert again.err == f"snapyard: job {job['id']} already ended (cancelled); nothing to cancel\n"


def test_jobs_prune_deletes_finished_jobs_past_retention(live: Served) -> None:
    now = time.time()
    old = Job(new_job_id(), validate_spec("p", "old"), JobState.FAILED, now - 10**7)
    live.app.store.add(dataclasses.replace(old, finished_at=now - 10**7))  # > 30 days
    submit_wait()
    pruned = cli("jobs", "prune")
    assert pruned.code == 0
    assert pruned.out == "deleted 1 finished job(s)\n"
    assert cli("jobs", "prune", "--json").json() == {"deleted": 0}
    assert [j["work_item"] for j in cli("jobs", "--json").json()] == ["w"]


# --- snapshots ----------------------------------------------------------------------


def test_snapshots_list_rm_and_prune(live: Served) -> None:
    submit_wait()
    cli("submit", "--project", "team/a", "--work-item", "issue #7", "--wait")
    listed = cli("snapshots", "--json").json()
    assert [(s["project"], s["work_item"]) for s in listed] == [("p", "w"), ("team/a", "issue #7")]
    snap = listed[0]
    assert tuple(snap) == SNAPSHOT_FIELDS
    assert snap["base_image_id"] == live.engine.inspect_image(BASE_TAG).id
    assert snap["layers"] >= 1
    assert snap["size_bytes"] > 0
    # Its own layer, not the 5 MB base every snapshot shares.
    assert 0 < snap["own_bytes"] < 100_000 < snap["size_bytes"]
    table = cli("snapshots")
    assert table.code == 0
    assert table.out.splitlines()[0].split() == [
        "PROJECT",
        "WORK",
        "ITEM",
        "IMAGE",
        "OWN",
        "SIZE",
        "LAYERS",
        "CREATED",
        "LAST",
        "USED",
    ]
    rm = cli("snapshots", "rm", "team/a", "issue #7")
    assert rm.code == 0
    assert rm.out == "removed the snapshot of team/a/issue #7 and its image\n"
    assert [s["work_item"] for s in cli("snapshots", "--json").json()] == ["w"]
    again = cli("snapshots", "rm", "team/a", "issue #7")
    assert again.code == 1
    assert again.err == "snapyard: no snapshot for team/a/issue #7\n"
    prune = cli("snapshots", "prune")
    assert prune.code == 0
    assert prune.out == "nothing to evict\n"
    assert cli("snapshots", "prune", "--json").json() == []


# --- configuration and reachability --------------------------------------------------


def test_unreachable_supervisor_is_exit_3_naming_the_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    monkeypatch.setenv("SNAPYARD_API", f"127.0.0.1:{port}")
    for argv in (
        ("jobs",),
        ("job", "x"),
        ("snapshots",),
        ("submit", "--project", "p", "--work-item", "w"),
    ):
        run = cli(*argv)
        assert run.code == 3, argv
        assert f"http://127.0.0.1:{port}" in run.err
        assert "snapyard run" in run.err


def test_invalid_config_is_exit_2_naming_key_value_and_allowed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SNAPYARD_API__PORT", "eighty")
    run = cli("jobs")
    assert run.code == 2
    assert run.err == (
        "snapyard: configuration error: api.port = 'eighty': must be a whole number\n"
    )
    monkeypatch.delenv("SNAPYARD_API__PORT")
    bad = tmp_path / "bad.toml"
    bad.write_text("[snapshots]\nmax_count = 0\n")
    run = cli("run", "--config", str(bad))
    assert run.code == 2
    assert run.err == "snapyard: configuration error: snapshots.max_count = 0: must be >= 1\n"
    assert "Traceback" not in run.err
    run = cli("--config", str(tmp_path / "missing.toml"), "jobs")
    assert run.code == 2
    assert "no such file" in run.err


def test_run_refuses_a_non_loopback_address_without_a_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SNAPYARD_API", "0.0.0.0:0")
    monkeypatch.delenv("SNAPYARD_API_TOKEN", raising=False)
    run = cli("run")
    assert run.code == 2
    assert run.err.startswith("snapyard: configuration error: api.host = '0.0.0.0': ")
    assert "SNAPYARD_API_TOKEN" in run.err


def test_run_refuses_a_port_already_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        monkeypatch.setenv("SNAPYARD_API", f"127.0.0.1:{port}")
        run = cli("run")
    assert run.code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in run.err


def test_token_from_the_environment_is_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "cli-token-" + "z" * 16
    with served(tmp_path, api={"token": token}) as live:
        monkeypatch.setenv("SNAPYARD_API", f"127.0.0.1:{live.server.port}")
        monkeypatch.delenv("SNAPYARD_API_TOKEN", raising=False)
        refused = cli("jobs")
        monkeypatch.setenv("SNAPYARD_API_TOKEN", token)
        allowed = cli("jobs", "--json")
    assert refused.code == 2
    assert refused.err == (
        "snapyard: the supervisor refused the request: a bearer token is required: "
        "Authorization: Bearer <api.token> (set SNAPYARD_API_TOKEN or [api] token)\n"
    )
    assert allowed.code == 0
    assert allowed.json() == []


def test_env_without_a_value_is_exit_2_and_never_echoes_the_argument() -> None:
    """Found in review: `--env "$TOKEN"` printed the token in the error."""
    run = cli("submit", "--project", "p", "--work-item", "w", "--env", "hunter2SECRETVALUE")
    assert run.code == 2
    assert "--env #1: expected NAME=VALUE" in run.err
    assert "hunter2SECRETVALUE" not in run.err + run.out


def test_an_id_that_cannot_go_into_a_url_is_exit_2_not_a_traceback(live: Served) -> None:
    run = cli("job", "\udcff")
    assert run.code == 2
    assert "cannot send that request" in run.err


def test_a_supervisor_that_answers_503_is_exit_3(monkeypatch: pytest.MonkeyPatch) -> None:
    """A supervisor that is starting or stopping is not serving: 'unreachable', not 'job failed'."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Busy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"error": "the supervisor is not running: stopping"}'
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("SNAPYARD_API", f"127.0.0.1:{server.server_address[1]}")
        run = cli("jobs")
    finally:
        server.shutdown()
        thread.join()
    assert run.code == 3
    assert "the supervisor is not running: stopping" in run.err


# --- errors for scripts, and pipes ------------------------------------------------


def test_json_errors_are_the_apis_error_shape(live: Served) -> None:
    """Regression: with --json, errors were still prose, so a script could not read them."""
    missing = cli("job", "j-does-not-exist", "--json")
    assert missing.code == 1
    assert missing.out == ""
    error = json.loads(missing.err)
    assert set(error) == {"error", "field"}
    assert "j-does-not-exist" in error["error"]
    assert error["field"] == "id"  # as the API's 404 names it

    refused = cli("submit", "--project", "\u200b", "--work-item", "w", "--json")
    assert refused.code == 2
    assert json.loads(refused.err)["field"] == "project"


def test_json_errors_when_the_supervisor_is_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPYARD_API", f"127.0.0.1:{free_port()}")
    run = cli("jobs", "--json")
    assert run.code == 3
    assert "cannot reach the Snapyard supervisor" in json.loads(run.err)["error"]


def test_output_piped_into_head_exits_quietly(live: Served) -> None:
    """Regression: `snapyard jobs | head -1` ended in a BrokenPipeError traceback, exit 1."""
    for index in range(600):  # ~70 KB of table: more than a pipe buffer holds
        live.app.submit(validate_spec("p", f"w{index:04}"))
    process = subprocess.Popen(
        [sys.executable, "-m", "actors.cli", "jobs", "--limit", "1000"],
        env={**os.environ, **live.env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    assert process.stdout.readline().split()[0] == b"ID"  # the table's header: then hang up
    process.stdout.close()
    assert process.wait(timeout=60) == 0
    assert process.stderr.read() == b""


def test_an_oversized_submit_is_refused_as_input_never_as_unreachable(live: Served) -> None:
    """Regression: 2 of 9 tries said 'cannot reach the supervisor ([Errno 32] Broken pipe)',
    exit 3: the server answered 413 and closed while the body was still being sent."""
    values = [f"V{n}={'x' * 4500}" for n in range(250)]  # ~1.1 MB of env
    argv = ["submit", "--project", "p", "--work-item", "big"]
    for value in values:
        argv += ["--env", value]
    for _ in range(3):
        run = cli(*argv)
        assert run.code == 2, run.err
        assert "at most 1048576 are accepted" in run.err
    assert live.app.jobs() == []


def test_json_usage_errors_are_json_too() -> None:
    """Regression: `jobs --limit abc --json` printed argparse's usage text."""
    run = cli("jobs", "--limit", "abc", "--json")
    assert run.code == 2
    error = json.loads(run.err)
    assert "--limit" in error["error"]
    assert error["field"] is None
