"""Logging and Sentry: the one place that talks to Sentry.

The actors call two things: ``job_log`` for a logger bound to a job and
``capture_error`` for Sentry (metrics live in ``actors.metrics``).
Configuration (``setup_logging``, ``setup_sentry``) is done once by the CLI; a
library user who does neither gets silence, never a crash.

Secrets: a job's env is never logged in the first place (``Job`` and
``JobSpec`` reprs hide it, ``job_log`` does not carry it). A ``Secrets`` is the
second line of defence for values that leak anyway, say a worker that echoes
its token into an error message: every log line and Sentry event is scrubbed
of the values remembered for running jobs. The app owns one and passes it to
the Supervisor (which remembers and forgets values) and to ``setup_logging``
and ``setup_sentry`` (which scrub with it); there is no process-wide set.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import signal
import sys
import threading
import time
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, TextIO

import pykka.debug
import sentry_sdk
from sentry_sdk.consts import DEFAULT_OPTIONS
from sentry_sdk.envelope import Envelope
from sentry_sdk.integrations.logging import LoggingIntegration
from sentry_sdk.transport import Transport

from actors import __version__
from actors.settings import LogSettings, SentrySettings

__all__ = [
    "JOB_FIELDS",
    "REDACTED",
    "RecordingTransport",
    "Secrets",
    "capture_error",
    "close_sentry",
    "flush_sentry",
    "install_thread_dump_signal",
    "job_log",
    "setup_logging",
    "setup_sentry",
]

log = logging.getLogger(__name__)

REDACTED = "[redacted]"
# The fields job_log attaches to every record; formatters show them when set.
JOB_FIELDS = ("job_id", "project", "work_item", "container", "image")


# --- secrets ---------------------------------------------------------------


class Secrets:
    """The env values of live jobs, to be scrubbed from anything we emit.

    Values shorter than ``min_length`` are not scrubbed: replacing every
    "1", "yes" or "dev" in every log line would make logs unreadable while
    protecting nothing a guess would not find. Real secrets are longer.
    """

    def __init__(self, min_length: int = 4) -> None:
        self.min_length = min_length
        self._lock = threading.Lock()
        self._by_job: dict[str, frozenset[str]] = {}
        self._pattern: re.Pattern[str] | None = None

    def remember(self, job_id: str, values: Iterable[str]) -> None:
        kept = frozenset(v for v in values if isinstance(v, str) and len(v) >= self.min_length)
        with self._lock:
            if kept:
                self._by_job[job_id] = self._by_job.get(job_id, frozenset()) | kept
            self._rebuild()

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._by_job.pop(job_id, None)
            self._rebuild()

    def clear(self) -> None:
        with self._lock:
            self._by_job.clear()
            self._rebuild()

    def _rebuild(self) -> None:
        values = set().union(*self._by_job.values()) if self._by_job else set()
        # Longest first, so a secret containing another is replaced whole.
        ordered = sorted(values, key=lambda v: (-len(v), v))
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def scrub(self, text: str) -> str:
        pattern = self._pattern
        return text if pattern is None else pattern.sub(REDACTED, text)


# --- logging ---------------------------------------------------------------


def _job_fields(record: logging.LogRecord) -> dict[str, str]:
    fields: dict[str, str] = {}
    for name in JOB_FIELDS:
        value = getattr(record, name, None)
        if value is not None:
            fields[name] = str(value)
    return fields


class _ScrubFilter(logging.Filter):
    """Bakes args into the message and scrubs it, before any formatter sees it."""

    def __init__(self, secrets: Secrets) -> None:
        super().__init__()
        self._secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string still gets logged, not lost
            message = f"{record.msg!r} % {record.args!r}"
        record.msg = self._secrets.scrub(message)
        record.args = None
        return True


class _JsonFormatter(logging.Formatter):
    def __init__(self, secrets: Secrets) -> None:
        super().__init__()
        self._secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        entry.update(_job_fields(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        # Scrub the whole line: exception text and extras can carry secrets too.
        return self._secrets.scrub(json.dumps(entry, ensure_ascii=False, default=str))


class _TextFormatter(logging.Formatter):
    def __init__(self, secrets: Secrets) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self._secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _job_fields(record)
        if fields:
            first, sep, rest = line.partition("\n")
            pairs = " ".join(f"{k}={v}" for k, v in fields.items())
            line = f"{first} [{pairs}]{sep}{rest}"
        return self._secrets.scrub(line)


class _SnapyardHandler(logging.StreamHandler[TextIO]):
    """Marks the handler setup_logging owns, so a second call replaces it."""


def setup_logging(
    settings: LogSettings, stream: TextIO | None = None, secrets: Secrets | None = None
) -> None:
    """Send every log record to ``stream``: JSON lines for machines, text for people.

    Every line is scrubbed of the values in ``secrets`` (the app's); without
    it nothing is scrubbed, which suits a CLI command that runs no job.
    Idempotent: calling it again replaces the handler it installed before.
    """
    stream = stream if stream is not None else sys.stderr
    secrets = secrets if secrets is not None else Secrets()
    fmt = settings.format
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        fmt = "text" if callable(isatty) and isatty() else "json"
    handler = _SnapyardHandler(stream)
    formatter = _TextFormatter(secrets) if fmt == "text" else _JsonFormatter(secrets)
    handler.setFormatter(formatter)
    handler.addFilter(_ScrubFilter(secrets))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _SnapyardHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(settings.level)


class _JobAdapter(logging.LoggerAdapter[logging.Logger]):
    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(self.extra or {})
        extra.update(kwargs.get("extra") or {})
        kwargs["extra"] = extra
        return msg, kwargs


def job_log(
    logger: logging.Logger,
    job_id: str,
    project: str,
    work_item: str,
    container: str | None = None,
    image: str | None = None,
) -> logging.LoggerAdapter[logging.Logger]:
    """A logger whose every line names the job, its key, container and image."""
    return _JobAdapter(
        logger,
        {
            "job_id": job_id,
            "project": project,
            "work_item": work_item,
            "container": container,
            "image": image,
        },
    )


def install_thread_dump_signal() -> bool:
    """SIGUSR1 logs every thread's stack, so a hung supervisor can say where it is.

    Must run on the main thread (Python delivers signals there). Returns False
    on platforms without SIGUSR1.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_thread_dump_signal must be called from the main thread")
    sigusr1 = getattr(signal, "SIGUSR1", None)
    if sigusr1 is None:  # pragma: no cover - Windows
        return False
    signal.signal(sigusr1, pykka.debug.log_thread_tracebacks)
    return True


# --- Sentry ----------------------------------------------------------------

# Keys whose value is an environment as a whole: dropped from events, not
# scrubbed, since a short or unremembered value would still get through.
# Dropped wherever they appear in an event: env mappings, and stack frames'
# local variables ("vars"), which may hold a job's env before it is remembered.
_ENV_KEYS = frozenset({"env", "environ", "environment_variables", "environment variables", "vars"})
_DEFAULT_TAGS = {"service": "snapyard"}


def _scrub_event_value(secrets: Secrets, value: Any) -> Any:
    if isinstance(value, str):
        return secrets.scrub(value)
    if isinstance(value, Mapping):
        return {
            (secrets.scrub(k) if isinstance(k, str) else k): _scrub_event_value(secrets, v)
            for k, v in value.items()
            if not (isinstance(k, str) and k.lower() in _ENV_KEYS)
        }
    if isinstance(value, list | tuple):
        return [_scrub_event_value(secrets, v) for v in value]
    return value


def _before_send(secrets: Secrets, event: Any, hint: Any) -> Any:
    """Scrub secrets anywhere in the event: message, exceptions, extras, breadcrumbs, locals."""
    scrubbed = _scrub_event_value(secrets, event)
    tags = scrubbed.setdefault("tags", {})
    if isinstance(tags, dict):
        for key, value in _DEFAULT_TAGS.items():
            tags.setdefault(key, value)
    return scrubbed


def _before_breadcrumb(secrets: Secrets, crumb: Any, hint: Any) -> Any:
    # Scrub now: by the time an event is sent the job may have been forgotten.
    return _scrub_event_value(secrets, crumb)


class RecordingTransport(Transport):
    """A Sentry transport that keeps events in memory: for tests, never the network."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self._lock = threading.Lock()
        self.events: list[dict[str, Any]] = []
        self.raw: list[bytes] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        with self._lock:
            self.raw.append(envelope.serialize())
            for item in envelope.items:
                payload = item.get_event()
                if payload is not None:
                    self.events.append(dict(payload))


def setup_sentry(
    settings: SentrySettings, transport: object | None = None, secrets: Secrets | None = None
) -> bool:
    """Start Sentry when a DSN is configured; returns whether it is on.

    Events and breadcrumbs are scrubbed of the values in ``secrets`` (the
    app's; without it only env mappings are dropped). ``transport`` replaces
    the HTTP transport (tests pass a RecordingTransport).
    """
    if not settings.dsn:
        return False
    secrets = secrets if secrets is not None else Secrets()
    options: dict[str, Any] = {
        "dsn": settings.dsn,
        "environment": settings.environment,
        "release": settings.release or f"snapyard@{__version__}",
        # Frame locals may hold a job's env before it is remembered as secret
        # (a request that failed validation): never send them.
        "include_local_variables": False,
        "before_send": functools.partial(_before_send, secrets),
        "before_breadcrumb": functools.partial(_before_breadcrumb, secrets),
        # Log records become breadcrumbs only; errors reach Sentry through
        # capture_error, once, with their tags.
        "integrations": [LoggingIntegration(level=logging.INFO, event_level=None)],
    }
    # No PII by default. SDKs with ``data_collection`` deprecate the flag and
    # already default to send_default_pii=False when neither is given.
    if "data_collection" not in DEFAULT_OPTIONS:  # pragma: no cover - older sentry-sdk 2.x
        options["send_default_pii"] = False
    if transport is not None:
        options["transport"] = transport
    sentry_sdk.init(**options)
    for key, value in _DEFAULT_TAGS.items():
        sentry_sdk.get_global_scope().set_tag(key, value)
    return True


def capture_error(
    error: BaseException,
    *,
    source: str,
    job_type: str | None = None,
    extras: Mapping[str, object] | None = None,
) -> None:
    """Send ``error`` to Sentry (when configured) with tags and extras.

    Never pass job env values in ``extras``: they are secrets.
    """
    log.debug("captured %s from %s", type(error).__name__, source)
    with sentry_sdk.new_scope() as scope:
        scope.set_tag("source", source)
        if job_type is not None:
            scope.set_tag("job_type", job_type)
        for key, value in (extras or {}).items():
            scope.set_extra(key, value)
        sentry_sdk.capture_exception(error)


def flush_sentry(timeout_s: float = 2.0) -> None:
    """Wait up to ``timeout_s`` for queued events to leave, e.g. before exiting."""
    sentry_sdk.flush(timeout=timeout_s)


def close_sentry(timeout_s: float = 2.0) -> None:
    """Flush and turn Sentry off again; later capture_error calls do nothing."""
    client = sentry_sdk.get_client()
    if client.is_active():
        client.close(timeout=timeout_s)
    sentry_sdk.get_global_scope().set_client(None)
