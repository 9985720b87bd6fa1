"""Snapyard's Prometheus metrics, declared once, on a registry the app owns.

Why a class built on a given ``CollectorRegistry`` and not module-level
metrics: prometheus-client's default registry is process-global, so two apps
in one process (the tests, the demo, a benchmark) would share every value and
a test could only compare before and after. Each ``Snapyard`` builds one
``Metrics`` on its own registry and passes it to the actors that record; a
test builds its own and reads exactly what its actors did.

Engine errors are counted in one place, ``MeteredEngine``: the app wraps its
engine once, so every error the engine raises is counted once, by kind,
whichever actor made the call, and ``actors/engine/`` knows nothing of metrics.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from actors.engine.base import (
    Conflict,
    ContainerMissing,
    ContainerSpec,
    ContainerState,
    Engine,
    EngineError,
    EngineEvent,
    EngineUnavailable,
    EventStream,
    ImageConfig,
    ImageInfo,
    ImageMissing,
    Logs,
    LogStream,
    RegistryUnavailable,
)

__all__ = [
    "CONTENT_TYPE",
    "ENGINE_ERROR_KINDS",
    "SPAWN_BUCKETS",
    "MeteredEngine",
    "Metrics",
    "engine_error_kind",
]

# What /metrics answers with: the content type of the exposition below.
CONTENT_TYPE = CONTENT_TYPE_LATEST
# A spawn is a create and a start (well under a second) unless it retries with
# backoff: the upper buckets show retries, the lower ones a slow daemon.
SPAWN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# The kind label of snapyard_engine_errors_total: a short, fixed set, so the
# series are few and all exist (at 0) before the first error.
_KINDS: tuple[tuple[type[EngineError], str], ...] = (
    # Before its base class: a registry down is not the engine down.
    (RegistryUnavailable, "registry_unavailable"),
    (EngineUnavailable, "unavailable"),
    (ImageMissing, "image_missing"),
    (ContainerMissing, "container_missing"),
    (Conflict, "conflict"),
)
ENGINE_ERROR_KINDS = (*(kind for _, kind in _KINDS), "other")


def engine_error_kind(error: EngineError) -> str:
    """The ``kind`` label for an engine error: what the caller can do about it."""
    for error_type, kind in _KINDS:
        if isinstance(error, error_type):
            return kind
    return "other"


class Metrics:
    """Every metric Snapyard exports, registered on ``registry``.

    The attributes are prometheus-client metrics; callers record with their
    own methods (``metrics.snapshot_hits.inc()``).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self.jobs = Gauge(
            "snapyard_jobs",
            "Jobs in the job store, by state; terminal states count the finished "
            "jobs the store still holds.",
            ["state"],
            registry=r,
        )
        self.running_workers = Gauge(
            "snapyard_running_workers",
            "Jobs whose worker container has started and not yet been seen to end.",
            registry=r,
        )
        self.spawn_seconds = Histogram(
            "snapyard_spawn_seconds",
            "Seconds from a Spawn to a started worker container, retries and "
            "snapshot fallbacks included.",
            buckets=SPAWN_BUCKETS,
            registry=r,
        )
        self.spawn_failures = Counter(
            "snapyard_spawn_failures_total",
            "Spawns that ended without a started container: retries spent on an "
            "unavailable engine, a missing base image, or another engine error.",
            registry=r,
        )
        self.snapshot_hits = Counter(
            "snapyard_snapshot_hits_total",
            "Snapshot lookups that found a usable snapshot: the job starts from it.",
            registry=r,
        )
        self.snapshot_misses = Counter(
            "snapyard_snapshot_misses_total",
            "Snapshot lookups without a usable snapshot (none, expired, grown from "
            "an old base image, or too many layers): the job starts from the base image.",
            registry=r,
        )
        self.stale_snapshot_fallbacks = Counter(
            "snapyard_stale_snapshot_fallbacks_total",
            "Snapshot images found missing (404) at create or start: the entry was "
            "invalidated and the job retried on the base image.",
            registry=r,
        )
        self.snapshot_evictions = Counter(
            "snapyard_snapshot_evictions_total",
            "Snapshots evicted (TTL, old base image, max count, max total size); "
            "their images are deleted now or, when in use, on a later sweep.",
            registry=r,
        )
        self.snapshots = Gauge(
            "snapyard_snapshots",
            "Snapshots in the registry, as of the last eviction sweep.",
            registry=r,
        )
        self.snapshot_bytes = Gauge(
            "snapyard_snapshot_bytes",
            "Total size in bytes of the registered snapshot images, as of the last eviction sweep.",
            registry=r,
        )
        self.snapshot_pending_deletions = Gauge(
            "snapyard_snapshot_pending_deletions",
            "Evicted or replaced snapshot images not deleted yet (in use, a parent "
            "of another image, or the engine did not answer), as of the last sweep.",
            registry=r,
        )
        self.engine_errors = Counter(
            "snapyard_engine_errors_total",
            "Errors the container engine answered, by kind: unavailable (daemon "
            "down, 5xx, timeout), image_missing, container_missing, conflict, other.",
            ["kind"],
            registry=r,
        )
        for kind in ENGINE_ERROR_KINDS:
            self.engine_errors.labels(kind=kind)
        self.api_requests = Counter(
            "snapyard_api_requests_total",
            'HTTP API requests answered, by route template ("?" for an unknown path) and method.',
            ["route", "method"],
            registry=r,
        )

    @classmethod
    def unscraped(cls) -> Metrics:
        """Metrics on a fresh registry of their own, which nobody scrapes: for an
        actor started without the app's (a test that does not look at them)."""
        return cls(CollectorRegistry())

    def count_engine_error(self, error: EngineError) -> None:
        self.engine_errors.labels(kind=engine_error_kind(error)).inc()

    def exposition(self) -> bytes:
        """What ``/metrics`` serves: prometheus-client's text exposition."""
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """One sample's value, by its exposed name (``..._total``, ``..._count``).

        0.0 for a labelled series not recorded yet; KeyError for a name no
        declared metric exposes, so a typo in a test or the demo fails loudly.
        """
        sample = self.registry.get_sample_value(name, labels)
        if sample is not None:
            return sample
        families = {family.name for family in self.registry.collect()}
        suffixes = ("", "_total", "_count", "_sum", "_bucket")
        if not any(name.removesuffix(s) in families for s in suffixes if name.endswith(s)):
            raise KeyError(f"no metric exposes {name!r}")
        return 0.0


class MeteredEngine:
    """An ``Engine`` that counts every engine error, by kind, and re-raises it.

    ``describe`` makes no engine call and is passed through uncounted.
    """

    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self.inner = engine
        self.metrics = metrics

    @contextmanager
    def _counted(self) -> Iterator[None]:
        try:
            yield
        except EngineError as exc:
            self.metrics.count_engine_error(exc)
            raise

    def ping(self) -> None:
        with self._counted():
            self.inner.ping()

    def describe(self) -> str:
        return self.inner.describe()

    def create_container(self, spec: ContainerSpec) -> str:
        with self._counted():
            return self.inner.create_container(spec)

    def start_container(self, container_id: str) -> None:
        with self._counted():
            self.inner.start_container(container_id)

    def inspect_container(self, container_id: str) -> ContainerState:
        with self._counted():
            return self.inner.inspect_container(container_id)

    def wait_container(self, container_id: str, timeout_s: float | None = None) -> int:
        with self._counted():
            return self.inner.wait_container(container_id, timeout_s)

    def stop_container(self, container_id: str, grace_s: float) -> None:
        with self._counted():
            self.inner.stop_container(container_id, grace_s)

    def kill_container(self, container_id: str, signal: str = "SIGKILL") -> None:
        with self._counted():
            self.inner.kill_container(container_id, signal)

    def remove_container(self, container_id: str, force: bool = False) -> None:
        with self._counted():
            self.inner.remove_container(container_id, force)

    def container_logs(self, container_id: str, tail: int = 200) -> Logs:
        with self._counted():
            return self.inner.container_logs(container_id, tail)

    def follow_logs(self, container_id: str) -> LogStream:
        # Counted at the open; an error while following is the follower's to handle.
        with self._counted():
            return self.inner.follow_logs(container_id)

    def list_containers(self, labels: Mapping[str, str]) -> list[ContainerState]:
        with self._counted():
            return self.inner.list_containers(labels)

    def commit_container(
        self, container_id: str, repository: str, tag: str, config: ImageConfig
    ) -> str:
        with self._counted():
            return self.inner.commit_container(container_id, repository, tag, config)

    def flatten_image(self, image: str, base: str, repository: str, tag: str) -> str:
        with self._counted():
            return self.inner.flatten_image(image, base, repository, tag)

    def inspect_image(self, image: str) -> ImageInfo:
        with self._counted():
            return self.inner.inspect_image(image)

    def list_images(self, labels: Mapping[str, str]) -> list[ImageInfo]:
        with self._counted():
            return self.inner.list_images(labels)

    def remove_image(self, image: str, force: bool = False) -> None:
        with self._counted():
            self.inner.remove_image(image, force)

    def tag_image(self, image: str, repository: str, tag: str) -> None:
        with self._counted():
            self.inner.tag_image(image, repository, tag)

    def build_image(self, context: bytes, tag: str, labels: Mapping[str, str]) -> str:
        with self._counted():
            return self.inner.build_image(context, tag, labels)

    def push_image(self, image_id: str, repository: str) -> str:
        with self._counted():
            return self.inner.push_image(image_id, repository)

    def pull_image(self, reference: str) -> str:
        with self._counted():
            return self.inner.pull_image(reference)

    def events(self, since: float | None = None) -> EventStream:
        with self._counted():
            return _MeteredStream(self.inner.events(since), self)


class _MeteredStream:
    """The engine's event stream; an error raised while iterating is counted too."""

    def __init__(self, stream: EventStream, engine: MeteredEngine) -> None:
        self._stream = stream
        self._engine = engine

    def __iter__(self) -> Iterator[EngineEvent]:
        with self._engine._counted():
            yield from self._stream

    def close(self) -> None:
        self._stream.close()
