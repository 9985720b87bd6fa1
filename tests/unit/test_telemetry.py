"""Telemetry: what operators see in logs and Sentry, and what they never see."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator

import pytest

from actors.model import Job, JobSpec, JobState
from actors.settings import LogSettings, SentrySettings
from actors.telemetry import (
    REDACTED,
    RecordingTransport,
    Secrets,
    capture_error,
    close_sentry,
    flush_sentry,
    install_thread_dump_signal,
    job_log,
    setup_logging,
    setup_sentry,
)

SECRET = "tok-9f8e7d6c5b4a"
DSN = "https://public@127.0.0.1/1"  # never contacted: every test passes a transport


@pytest.fixture(autouse=True)
def _close_sentry() -> Iterator[None]:
    # The root logger is restored by tests/conftest.py; Sentry's client is process-wide.
    yield
    close_sentry()


class _TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def _secret_job() -> Job:
    spec = JobSpec("proj", "item-7", agent_type="review", env={"API_TOKEN": SECRET})
    return Job(id="j-1", spec=spec, state=JobState.RUNNING, created_at=1.0)


# --- logging -----------------------------------------------------------------


def test_json_lines_carry_job_fields_when_not_a_tty() -> None:
    stream = io.StringIO()
    setup_logging(LogSettings(level="DEBUG", format="auto"), stream=stream)
    log = job_log(logging.getLogger("actors.spawner"), "j-1", "proj", "item-7", "c-1", "sha256:i")
    log.info("started in %.1fs", 1.25)
    logging.getLogger("actors.other").warning("plain line")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "started in 1.2s"
    assert first["level"] == "INFO"
    assert first["logger"] == "actors.spawner"
    assert {k: first[k] for k in ("job_id", "project", "work_item", "container", "image")} == {
        "job_id": "j-1",
        "project": "proj",
        "work_item": "item-7",
        "container": "c-1",
        "image": "sha256:i",
    }
    assert second["message"] == "plain line"
    assert "job_id" not in second


def test_text_format_on_a_tty_shows_job_fields() -> None:
    stream = _TtyStream()
    setup_logging(LogSettings(format="auto"), stream=stream)
    job_log(logging.getLogger("actors.x"), "j-2", "p", "w").info("hello")
    line = stream.getvalue().strip()
    assert "hello" in line
    assert "job_id=j-2" in line
    assert "project=p" in line
    assert "container=" not in line  # unset fields are left out
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_explicit_json_format_wins_over_a_tty() -> None:
    stream = _TtyStream()
    setup_logging(LogSettings(format="json"), stream=stream)
    logging.getLogger("actors.x").info("x")
    assert json.loads(stream.getvalue())["message"] == "x"


def test_level_is_applied() -> None:
    stream = io.StringIO()
    setup_logging(LogSettings(level="WARNING", format="json"), stream=stream)
    logging.getLogger("actors.x").info("hidden")
    logging.getLogger("actors.x").warning("shown")
    assert [json.loads(x)["message"] for x in stream.getvalue().splitlines()] == ["shown"]


def test_setup_logging_twice_installs_one_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging(LogSettings(format="json"), stream=first)
    setup_logging(LogSettings(format="json"), stream=second)
    logging.getLogger("actors.x").warning("once")
    assert first.getvalue() == ""
    assert len(second.getvalue().splitlines()) == 1


def test_remembered_secrets_are_scrubbed_from_messages_args_and_tracebacks() -> None:
    stream = io.StringIO()
    secrets = Secrets()
    setup_logging(LogSettings(format="json"), stream=stream, secrets=secrets)
    secrets.remember("j-1", [SECRET])
    log = logging.getLogger("actors.x")
    log.info(f"in the message {SECRET}")
    log.info("in the args %s", SECRET)
    log.info("in a non-string arg %r", {"token": SECRET})
    try:
        raise RuntimeError(f"worker said {SECRET}")
    except RuntimeError:
        log.exception("failed")
    output = stream.getvalue()
    assert SECRET not in output
    lines = [json.loads(x) for x in output.splitlines()]
    assert lines[0]["message"] == f"in the message {REDACTED}"
    assert lines[1]["message"] == f"in the args {REDACTED}"
    assert REDACTED in lines[2]["message"]
    assert f"worker said {REDACTED}" in lines[3]["exc"]


def test_logs_are_scrubbed_with_the_secrets_they_were_given_and_no_others() -> None:
    """There is no process-wide set: a value remembered elsewhere is not this log's secret."""
    stream = io.StringIO()
    mine, other = Secrets(), Secrets()
    setup_logging(LogSettings(format="json"), stream=stream, secrets=mine)
    other.remember("j-1", [SECRET])
    log = logging.getLogger("actors.x")
    log.info("before %s", SECRET)
    mine.remember("j-1", [SECRET])
    log.info("after %s", SECRET)
    before, after = (json.loads(x)["message"] for x in stream.getvalue().splitlines())
    assert before == f"before {SECRET}"
    assert after == f"after {REDACTED}"


def test_forgotten_secrets_are_no_longer_scrubbed_and_short_ones_never() -> None:
    secrets = Secrets()
    secrets.remember("j-1", [SECRET, "abc", "abcd"])
    assert secrets.scrub(f"{SECRET} abc abcd") == f"{REDACTED} abc {REDACTED}"
    secrets.forget("j-1")
    assert secrets.scrub(f"{SECRET} abcd") == f"{SECRET} abcd"


def test_overlapping_secrets_are_replaced_whole() -> None:
    secrets = Secrets()
    secrets.remember("j-1", ["abcd"])
    secrets.remember("j-2", ["xxabcdyy"])
    assert secrets.scrub("xxabcdyy abcd") == f"{REDACTED} {REDACTED}"
    assert secrets.scrub("a.c*") == "a.c*"  # values are literals, not regexes


def test_job_repr_never_shows_env() -> None:
    job = _secret_job()
    assert SECRET not in repr(job)
    assert SECRET not in str(job.spec)


def test_sigusr1_logs_every_thread(caplog: pytest.LogCaptureFixture) -> None:
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        assert install_thread_dump_signal() is True
        with caplog.at_level(logging.CRITICAL, logger="pykka"):
            # Sent to ourselves, the handler has run on this thread when kill returns.
            os.kill(os.getpid(), signal.SIGUSR1)
        assert any("Current state of MainThread" in r.getMessage() for r in caplog.records)
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_thread_dump_signal_refuses_other_threads() -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            install_thread_dump_signal()
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert len(errors) == 1
    assert "main thread" in str(errors[0])


# --- Sentry ------------------------------------------------------------------


def test_sentry_is_off_without_a_dsn() -> None:
    transport = RecordingTransport()
    assert setup_sentry(SentrySettings(dsn=""), transport=transport) is False
    capture_error(RuntimeError("x"), source="test")
    flush_sentry(1.0)
    assert transport.events == []


def _fail_with_secret(spec: JobSpec) -> None:
    env = dict(spec.env)  # a local named env: dropped whole
    token = env["API_TOKEN"]  # a local holding the value: scrubbed
    raise RuntimeError(f"worker exited: bad token {token}")


def test_captured_errors_carry_tags_and_extras_and_no_secrets() -> None:
    transport = RecordingTransport()
    secrets = Secrets()
    settings = SentrySettings(dsn=DSN, environment="staging", release="snapyard@test")
    assert setup_sentry(settings, transport=transport, secrets=secrets) is True
    job = _secret_job()
    secrets.remember(job.id, job.spec.env.values())
    logging.getLogger("actors.spawner").warning("a breadcrumb with %s", SECRET)
    try:
        _fail_with_secret(job.spec)
    except RuntimeError as exc:
        capture_error(
            exc,
            source="spawner",
            job_type=job.spec.agent_type,
            extras={
                "job_id": job.id,
                "job": repr(job),
                "logs_tail": f"echo {SECRET}",
                "nested": {"env": {"API_TOKEN": SECRET}, "list": [SECRET]},
            },
        )
    flush_sentry(2.0)
    assert len(transport.events) == 1
    event = transport.events[0]
    assert event["tags"]["source"] == "spawner"
    assert event["tags"]["job_type"] == "review"
    assert event["tags"]["service"] == "snapyard"
    assert event["environment"] == "staging"
    assert event["release"] == "snapyard@test"
    assert event["extra"]["job_id"] == "j-1"
    assert event["extra"]["logs_tail"] == f"echo {REDACTED}"
    assert "env" not in event["extra"]["nested"]
    assert event["exception"]["values"][0]["value"] == f"worker exited: bad token {REDACTED}"
    # Frame locals are never sent: one may hold a job's env before it is remembered.
    frames = event["exception"]["values"][0]["stacktrace"]["frames"]
    assert all("vars" not in frame for frame in frames)
    assert any(
        REDACTED in str(c.get("message")) for c in event.get("breadcrumbs", {}).get("values", [])
    )
    assert transport.raw
    assert all(SECRET.encode() not in raw for raw in transport.raw)


def test_capture_error_without_job_type_sets_only_source() -> None:
    transport = RecordingTransport()
    setup_sentry(SentrySettings(dsn=DSN), transport=transport)
    capture_error(ValueError("plain"), source="watcher")
    flush_sentry(2.0)
    (event,) = transport.events
    assert event["tags"]["source"] == "watcher"
    assert "job_type" not in event["tags"]
    assert event.get("user") in (None, {})  # send_default_pii=False


def test_close_sentry_stops_capturing() -> None:
    transport = RecordingTransport()
    setup_sentry(SentrySettings(dsn=DSN), transport=transport)
    close_sentry()
    capture_error(RuntimeError("after close"), source="test")
    assert transport.events == []
