"""The Supervisor's book: every change of a job's state is written through here.

It writes to the store first (a job we told anyone about survives a crash),
keeps the counts by state in step so the gauges and the status need no
query, remembers and forgets the secrets to scrub from logs, and keeps each
job's Strikes. A job holds its key in the store exactly as long as it is in
flight: a job cancelled while it runs is final for its caller, but its key
is taken until its container is gone.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from tenacity.wait import wait_base

from actors.backoff import delay_after
from actors.clock import Clock
from actors.flight import Flights, Strikes
from actors.metrics import Metrics
from actors.model import Job, JobState
from actors.store import JobStore
from actors.store.cluster import Fenced
from actors.telemetry import Secrets, job_log

__all__ = ["Ledger", "job_logger"]

log = logging.getLogger("actors.supervisor")


def job_logger(job: Job) -> logging.LoggerAdapter[logging.Logger]:
    """The Supervisor's logger, with the job's fields on every record."""
    spec = job.spec
    return job_log(log, job.id, spec.project, spec.work_item, job.container_id, job.image_id)


class Ledger:
    def __init__(
        self,
        store: JobStore,
        clock: Clock,
        flights: Flights,
        backoff: wait_base,
        metrics: Metrics,
        secrets: Secrets,
        on_fenced: Callable[[Job], None] | None = None,
    ) -> None:
        """``on_fenced`` hears of a write the cluster refused (``Fenced``): the
        attempt was rescued, so the job is another host's now."""
        self._on_fenced = on_fenced
        self._store = store
        self._metrics = metrics
        self._secrets = secrets
        self._clock = clock
        self._flights = flights
        self._backoff = backoff
        self._strikes: dict[str, Strikes] = {}
        self._counts: dict[JobState, int] = {}

    def load(self) -> None:
        self._counts = dict(self._store.count_by_state())

    def prune(self, before: float) -> int:
        """Retention: finished jobs that ended before ``before`` leave the store."""
        deleted = self._store.prune_finished(before)
        if deleted:
            log.info("retention: deleted %d finished job(s)", deleted)
            self.load()
        return deleted

    @property
    def queued(self) -> int:
        return self._counts.get(JobState.QUEUED, 0)

    def added(self, job: Job, note: str) -> None:
        """A new job: persisted before the caller replies."""
        self._store.add(job, note=note)
        self._count(None, job.state)
        self.remember(job)

    def claimed(self, job: Job) -> None:
        """The store moved it from QUEUED to STARTING."""
        self._count(JobState.QUEUED, JobState.STARTING)
        self.remember(job)

    def remember(self, job: Job) -> None:
        if job.spec.env:
            self._secrets.remember(job.id, job.spec.env.values())

    def strikes(self, job_id: str) -> Strikes:
        return self._strikes.setdefault(job_id, Strikes())

    def save(self, job: Job, note: str | None = None, *, was: JobState | None = None) -> Job:
        """Write the job; ``was`` is its state before when it is not (or no longer) in flight.

        A write the cluster refuses (``Fenced``) changes nothing here: the
        job is handed to ``on_fenced`` and returned as it was asked to be.
        """
        self.write(job, note, was=was)
        return job

    def write(
        self,
        job: Job,
        note: str | None = None,
        *,
        was: JobState | None = None,
        was_attempt: int | None = None,
    ) -> bool:
        """``save``, telling whether the store took the write (False: ``Fenced``);
        ``was_attempt`` as ``JobStore.update``'s."""
        flight = self._flights.get(job.id)
        previous = flight.job.state if flight is not None else was
        try:
            self._store.update(
                job, note=note, holds_key=flight is not None, was_attempt=was_attempt
            )
        except Fenced:
            self._strikes.pop(job.id, None)
            self._secrets.forget(job.id)
            if self._on_fenced is not None:
                self._on_fenced(job)
            return False
        self._count(previous, job.state)
        if flight is not None:
            flight.job = job
        return True

    def requeue(self, job: Job, note: str, *, backoff: bool, next_attempt: bool = False) -> None:
        """Back to the store's queue; with ``backoff`` not claimed before its retry_at.

        ``next_attempt``: its worker was killed (a fence), so the next run is a new
        attempt, written only while the row still has this one (a rescue wins).
        """
        retry_at = None
        if backoff:
            strikes = self.strikes(job.id)
            strikes.requeues += 1
            retry_at = self._clock.now() + delay_after(self._backoff, strikes.requeues)
        requeued = dataclasses.replace(
            job,
            state=JobState.QUEUED,
            container_id=None,
            retry_at=retry_at,
            attempt=job.attempt + 1 if next_attempt else job.attempt,
        )
        self.write(requeued, note=note, was=job.state, was_attempt=job.attempt)

    def finish(self, job: Job, state: JobState, **changes: Any) -> Job:
        was = job.state
        job = dataclasses.replace(job, state=state, finished_at=self._clock.now(), **changes)
        written = self.write(job, note=changes.get("error"), was=was)
        self._strikes.pop(job.id, None)
        self._secrets.forget(job.id)
        if written:
            job_logger(job).info("job %s", state.value)
        return job

    def publish(self) -> None:
        for state in JobState:
            self._metrics.jobs.labels(state=state.value).set(self._counts.get(state, 0))
        running = sum(1 for f in self._flights if f.container_id is not None)
        self._metrics.running_workers.set(running)

    def _count(self, old: JobState | None, new: JobState) -> None:
        if old == new:
            return
        if old is not None:
            self._counts[old] = self._counts.get(old, 0) - 1
        self._counts[new] = self._counts.get(new, 0) + 1
