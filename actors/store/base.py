"""The job store's contract: the queue is a table, and the store owns admission.

A job's whole life is one row. The Supervisor never keeps a queue of its own:
when a worker slot frees up or a job arrives it asks the store to ``claim``
the next runnable jobs, and the store applies every admission rule and writes
their new state in the same transaction. So a second implementation (the
PostgreSQL store of the cluster) only has to pass ``tests/contract/
test_store_contract.py`` to be a drop-in replacement; the actors never know
which one they have.

"One active job per (project, work item)" is the schema's job, not only the
code's: a job *holds its key* from its claim until its container is gone, and
a unique index over the holders refuses a second one (``KeyHeld``).
"""

from __future__ import annotations

import builtins
import secrets
import threading
import time
from collections.abc import Callable, Collection, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from actors.model import Job, JobState, SnapshotKey
from actors.settings import Settings
from actors.usage import UsageKey

__all__ = [
    "LOGS_TAIL_LINES",
    "Caps",
    "JobStore",
    "KeyHeld",
    "StoreError",
    "StoreUnavailable",
    "new_job_id",
]

LOGS_TAIL_LINES = 200


class StoreError(RuntimeError):
    """The database cannot be used: newer schema, or not a Snapyard store."""


class StoreUnavailable(StoreError):
    """The store's database cannot be reached now; the next call tries again.

    ``problem`` is what is wrong without the advice that ends the message, for
    a caller that says what to do itself (``snapyard doctor``'s fix column).
    """

    def __init__(self, message: str, problem: str | None = None) -> None:
        super().__init__(message)
        self.problem = message if problem is None else problem


class KeyHeld(StoreError):
    """A second job tried to hold a (project, work item) that another job holds."""


@dataclass(frozen=True)
class Caps:
    """Concurrency caps the claim applies, by project and by agent type (None: no cap).

    Functions, not tables: an unknown project or agent type gets the default
    settings, exactly as ``Settings.project()`` answers it.
    """

    project: Callable[[str], int | None]
    agent_type: Callable[[str], int | None]

    @classmethod
    def none(cls) -> Caps:
        return cls(lambda _p: None, lambda _a: None)

    @classmethod
    def from_settings(cls, settings: Settings) -> Caps:
        return cls(
            lambda name: settings.project(name).max_concurrent,
            lambda name: settings.agent_type(name).max_concurrent,
        )


@runtime_checkable
class JobStore(Protocol):
    """Jobs, their history and the queue's admission rules, durable across restarts.

    Writes by one caller (the Supervisor) may be grouped with ``batch()``:
    everything written inside commits once when the outermost batch ends, so
    one message-loop pass costs one fsync, not one per state change.
    """

    def add(self, job: Job, note: str | None = None) -> None:
        """Insert a new job and its first history row; raises if the ID exists."""

    def update(
        self,
        job: Job,
        note: str | None = None,
        *,
        holds_key: bool | None = None,
        was_attempt: int | None = None,
    ) -> None:
        """Write every field of ``job``; a state change also appends a history row.

        A terminal job's env is deleted (``spec.env`` reads back empty): nothing
        after a job ends needs its secrets, so the store does not keep them.

        ``holds_key`` None: a starting or running job holds its key, any other
        releases it. True keeps a terminal job holding it (cancelled, but its
        container is not gone yet). Raises ``KeyHeld`` if another job holds it.

        ``was_attempt``: the attempt the row must still have (default
        ``job.attempt``), so a job re-queued with a new attempt (after a fence
        killed its worker) is written only if no rescue bumped it first.
        """

    def claim(
        self,
        slots: int,
        now: float,
        caps: Caps,
        *,
        blocked: Collection[SnapshotKey] = (),
        note: str | None = None,
    ) -> builtins.list[Job]:
        """Move up to ``slots`` queued jobs to STARTING, in one transaction; return them.

        The rules, in order of submission (FIFO within the constraints):
        - only the oldest queued job of a key may run (a key's jobs keep their order);
        - never while its key is held by another job, or listed in ``blocked``;
        - not before its ``retry_at`` (a backing-off head waits, its key with it);
        - not past its project's or agent type's cap, counting every job that
          holds a key;
        - a key that must wait never holds up jobs of other keys.
        """
        ...

    def get(self, job_id: str) -> Job | None: ...

    def list(
        self, state: JobState | None = None, project: str | None = None, limit: int = 100
    ) -> builtins.list[Job]:
        """Jobs, newest first, optionally filtered by state and project."""
        ...

    def unfinished(self) -> builtins.list[Job]:
        """Queued, starting and running jobs and jobs still holding a key, oldest first."""
        ...

    def history(self, job_id: str) -> builtins.list[tuple[JobState, float, str | None]]: ...

    def changes(
        self, after: int, limit: int = 500
    ) -> builtins.list[tuple[int, str, JobState, float]]:
        """Every job's state changes as ``(seq, job_id, state, at)`` with ``seq > after``,
        oldest first: ``seq`` only grows, so a follower (``GET /events``) resumes from it."""
        ...

    def last_change(self) -> int:
        """The ``seq`` of the newest state change (0 for none): "from now on" for ``changes``."""
        ...

    def job_ids(self) -> set[str]: ...

    def count_by_state(self) -> dict[JobState, int]:
        """Every state, zero included, so a gauge can be set from it directly."""
        ...

    def prune_finished(self, before: float) -> int:
        """Delete terminal jobs that ended before ``before``, with their history;
        return how many. A job still holding its key is kept (its container
        is not gone yet), and so is every unfinished one."""
        ...

    def record_usage(
        self, uses: Mapping[UsageKey, float], keep: Collection[UsageKey] | None
    ) -> None:
        """Snapshot last-use times (``actors.usage``): upsert, a later time
        wins; unless ``keep`` is None, drop every row not in it."""
        ...

    def load_usage(self) -> dict[UsageKey, float]:
        """Every recorded (project, work item, image ID) -> last use."""
        ...

    def batch(self) -> AbstractContextManager[None]:
        """Group the writes inside into one transaction (re-entrant)."""
        ...

    def close(self) -> None: ...


def tail(text: str, lines: int = LOGS_TAIL_LINES) -> str:
    """The last ``lines`` lines: a store keeps a job's log tail, never the whole log."""
    parts = text.splitlines(keepends=True)
    return "".join(parts[-lines:]) if len(parts) > lines else text


# --- job IDs: the same in every store ---------------------------------------

_RANDOM_BITS = 80


class _JobIds:
    """Like UUIDv7, but monotonic within this process: two IDs made in the same
    millisecond (or after the wall clock stepped back) still sort in the order
    they were made, so listing by ID is listing by submission.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = (0, 0)

    def next(self) -> str:
        with self._lock:
            millis = time.time_ns() // 1_000_000
            last_millis, last_rand = self._last
            if millis <= last_millis:
                millis, rand = last_millis, last_rand + 1
                if rand >= 1 << _RANDOM_BITS:  # pragma: no cover - 2**80 IDs in one ms
                    millis, rand = last_millis + 1, 0
            else:
                rand = secrets.randbits(_RANDOM_BITS - 1)  # headroom to increment
            self._last = (millis, rand)
        return f"j-{millis:012x}{rand:020x}"


_JOB_IDS = _JobIds()


def new_job_id() -> str:
    """A job ID that sorts by creation time: ``j-`` + 48-bit ms time + 80 random bits."""
    return _JOB_IDS.next()
