"""One record per job in flight, and the one place that decides how a run ends.

A job is *in flight* from its claim until its container is gone: it holds a
worker place and its (project, work item) all that time. Everything the
Supervisor knows about it lives in its ``Flight``; ``Flights`` indexes them by
job and by container. ``on_exit`` and ``outcome`` are the exit -> commit
decision, made here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from actors.messages import ContainerExited
from actors.model import Job, JobSpec, JobState
from actors.settings import Settings

__all__ = [
    "EarlyExits",
    "Flight",
    "Flights",
    "Kill",
    "Phase",
    "Strikes",
    "commit_decision",
    "job_timeout",
    "on_exit",
    "outcome",
]

Phase = Literal["recovering", "starting", "running", "finishing"]


@dataclass(frozen=True)
class Kill:
    """We decided to end it (cancel, timeout, vanished container): this wins over its exit."""

    state: JobState
    note: str


@dataclass
class Flight:
    """One job in flight: it holds a worker place and its key until its container is gone."""

    job: Job
    phase: Phase
    # The listing sequence number when it entered its phase: only a listing
    # asked for after that may call its container missing (or not yet there).
    seq: int = 0
    container_id: str | None = None
    deadline: float | None = None
    kill: Kill | None = None
    exit: ContainerExited | None = None
    commit: bool = False
    # A Terminate is on its way to a Spawner; stopped_at is when the last one ended.
    stop_pending: bool = False
    stopped_at: float = 0.0
    # Why it is being recovered (its Spawner crashed), for its history.
    recover_note: str | None = None

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def spec(self) -> JobSpec:
        return self.job.spec


@dataclass
class Strikes:
    """Counts that outlive one attempt of a job (it may be queued again in between)."""

    requeues: int = 0  # backoff exponent; reset once it starts
    refusals: int = 0  # starts the daemon answered with a 5xx, in a row
    crashes: int = 0  # Spawner crashes while handling it


@dataclass
class Flights:
    """The jobs in flight, by job ID and by container ID."""

    _by_job: dict[str, Flight] = field(default_factory=dict)
    _by_container: dict[str, str] = field(default_factory=dict)

    def add(self, flight: Flight) -> Flight:
        self._by_job[flight.id] = flight
        if flight.container_id is not None:
            self._by_container[flight.container_id] = flight.id
        return flight

    def attach(self, flight: Flight, container_id: str) -> None:
        """Its container is known: exits of that container are now its exits."""
        flight.container_id = container_id
        self._by_container[container_id] = flight.id

    def get(self, job_id: str) -> Flight | None:
        return self._by_job.get(job_id)

    def of_container(self, container_id: str) -> Flight | None:
        job_id = self._by_container.get(container_id)
        return None if job_id is None else self._by_job.get(job_id)

    def remove(self, job_id: str) -> Flight | None:
        flight = self._by_job.pop(job_id, None)
        if flight is not None and flight.container_id is not None:
            self._by_container.pop(flight.container_id, None)
        return flight

    def containers(self) -> set[str]:
        return set(self._by_container)

    def in_phase(self, *phases: Phase) -> list[Flight]:
        return [f for f in self._by_job.values() if f.phase in phases]

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._by_job

    def __iter__(self) -> Iterator[Flight]:
        return iter(list(self._by_job.values()))

    def __len__(self) -> int:
        return len(self._by_job)


def job_timeout(settings: Settings, spec: JobSpec) -> float:
    """The job's run-time limit: its own, else the project watchdog plus buffer,
    else its agent type's, else the default."""
    if spec.timeout_s is not None:
        return spec.timeout_s
    watchdog = settings.project(spec.project).watchdog_s
    if watchdog is not None:
        return watchdog + settings.supervisor.watchdog_buffer_s
    agent_timeout = settings.agent_type(spec.agent_type).timeout_s
    if agent_timeout is not None:
        return agent_timeout
    return settings.supervisor.default_timeout_s


def commit_decision(exit_code: int, kill: Kill | None, snapshots_on: bool) -> bool:
    """Commit only a clean exit we did not cause: a kill (cancel, timeout) wins
    over the exit it causes, so a killed or failed run never becomes a snapshot."""
    return kill is None and exit_code == 0 and snapshots_on


def on_exit(flight: Flight, exit: ContainerExited, snapshots_on: bool) -> bool:
    """Record the exit; True when the run is to be committed (``commit_decision``)."""
    flight.phase = "finishing"
    oom = exit.oom or (flight.exit is not None and flight.exit.oom)
    flight.exit = ContainerExited(exit.container_id, exit.exit_code, oom)
    flight.commit = commit_decision(exit.exit_code, flight.kill, snapshots_on)
    return flight.commit


def outcome(
    flight: Flight, exit_code: int | None, error: str | None
) -> tuple[JobState, str | None]:
    """The final state and error of a run whose container is gone."""
    if flight.kill is not None:
        return flight.kill.state, flight.kill.note
    if exit_code == 0:
        return JobState.SUCCEEDED, error
    what = f"exited with code {exit_code}"
    if flight.exit is not None and flight.exit.oom:
        what += " (out of memory: killed by the OOM killer)"
    return JobState.FAILED, f"{what}: {error}" if error else what


class EarlyExits:
    """Exits seen before their container's Started: the Watcher can see a container
    exit before the Spawner's reply reaches the Supervisor. Kept a while, bounded."""

    TTL_S = 600.0
    MAX = 10_000

    def __init__(self) -> None:
        self._exits: dict[str, tuple[ContainerExited, float]] = {}

    def keep(self, exit: ContainerExited, now: float) -> None:
        if len(self._exits) < self.MAX:
            self._exits[exit.container_id] = (exit, now)

    def take(self, container_id: str) -> ContainerExited | None:
        kept = self._exits.pop(container_id, None)
        return None if kept is None else kept[0]

    def expire(self, now: float) -> None:
        for cid in [c for c, (_, at) in self._exits.items() if at < now - self.TTL_S]:
            del self._exits[cid]
