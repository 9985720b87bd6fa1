"""The PostgreSQL claim: one transaction, local work first, caps cluster-wide.

Two indexed steps, as the SQLite claim walks its queue:
1. Local: the queued heads of the keys whose newest snapshot is on this host,
   in queue order through ``jobs_home`` (each queued job carries its key's
   snapshot host, ``home``), so the cost follows the jobs looked at, never
   how many snapshots this host holds.
2. The rest: the queue in submission order through ``jobs_queue``, keys'
   oldest jobs only, skipping a key whose newest snapshot is on another live
   host until ``queued_at + locality_wait_s`` (delay scheduling).
Both lock their rows ``FOR UPDATE SKIP LOCKED``, so concurrent claimers never
wait on each other and never take the same job; the cost follows the jobs
looked at, never the queue's length. Caps are counted under an advisory lock,
taken only when a candidate is capped: two hosts cannot both take the last slot.
"""

from __future__ import annotations

import builtins
import collections
from collections.abc import Collection
from dataclasses import dataclass, field

from actors.model import Job, SnapshotKey
from actors.store.base import Caps
from actors.store.pg_schema import CLAIM_LOCK
from actors.store.pg_session import Conn
from actors.store.rows import COLUMNS, job_of

__all__ = ["Claim"]

_COLS = ", ".join(f"j.{name}" for name in COLUMNS)
# A page of candidates, each one locked: enough that capped or waiting jobs
# rarely cost a second round trip (4 instead of 16 made the queue shape slower).
_MIN_PAGE = 16

# What every candidate must pass: not backing off, its key free and not taken.
_COMMON = """
      (j.retry_at IS NULL OR j.retry_at <= %(now)s)
  AND NOT EXISTS (
        SELECT 1 FROM jobs h
        WHERE h.holds_key AND h.project = j.project AND h.work_item = j.work_item)
  AND (j.project, j.work_item) NOT IN (
        SELECT * FROM unnest(%(taken_p)s::text[], %(taken_w)s::text[]))
"""

_LOCAL = f"""
SELECT {_COLS} FROM jobs j
WHERE j.state = 'queued' AND j.home = %(me)s
  AND NOT EXISTS (
        SELECT 1 FROM jobs e
        WHERE e.state = 'queued' AND e.project = j.project AND e.work_item = j.work_item
          AND (e.created_at, e.id) < (j.created_at, j.id))
  AND {_COMMON}
ORDER BY j.created_at, j.id
LIMIT %(page)s
FOR UPDATE OF j SKIP LOCKED
"""  # noqa: S608 - constant SQL

# The locality test is a scalar subquery on purpose: a NOT EXISTS under an OR
# became a hashed subplan over every other host's snapshots, built per claim.
_REST = f"""
SELECT {_COLS} FROM jobs j
WHERE j.state = 'queued'
  AND (j.created_at, j.id) > (%(after_at)s, %(after_id)s)
  AND NOT EXISTS (
        SELECT 1 FROM jobs e
        WHERE e.state = 'queued' AND e.project = j.project AND e.work_item = j.work_item
          AND (e.created_at, e.id) < (j.created_at, j.id))
  AND {_COMMON}
  AND (COALESCE(j.queued_at, j.created_at) + %(wait)s <= %(now)s OR (
        SELECT o.lease_until > %(now)s AND NOT o.draining
        FROM snapshots s JOIN hosts o ON o.host_id = s.host_id
        WHERE s.project = j.project AND s.work_item = j.work_item AND s.host_id <> %(me)s
      ) IS NOT TRUE)
ORDER BY j.created_at, j.id
LIMIT %(page)s
FOR UPDATE OF j SKIP LOCKED
"""  # noqa: S608 - constant SQL

_HOLDERS = (
    "SELECT project, agent_type, count(*) AS n FROM jobs WHERE holds_key "
    "GROUP BY project, agent_type"
)


@dataclass
class Claim:
    """One claim's choice, made inside the caller's transaction on ``conn``."""

    conn: Conn
    host_id: str
    slots: int
    now: float
    caps: Caps
    locality_wait_s: float
    blocked: Collection[SnapshotKey] = ()
    chosen: builtins.list[Job] = field(default_factory=list)
    _taken: set[SnapshotKey] = field(default_factory=set)
    _projects: collections.Counter[str] | None = None
    _agents: collections.Counter[str] = field(default_factory=collections.Counter)

    def choose(self) -> builtins.list[Job]:
        """Local heads first, then the queue; FIFO order in the result."""
        self._taken = set(self.blocked)
        page = max(self.slots * 2, _MIN_PAGE)
        self._offer(self._fetch(_LOCAL, page))
        after: tuple[float, str] = (float("-inf"), "")
        while len(self.chosen) < self.slots:
            rows = self._fetch(_REST, page, after)
            self._offer(rows)
            if len(rows) < page:
                break
            after = (rows[-1].created_at, rows[-1].id)
        return sorted(self.chosen, key=lambda job: (job.created_at, job.id))

    def _fetch(self, sql: str, page: int, after: tuple[float, str] = (0.0, "")) -> list[Job]:
        taken = sorted(self._taken)
        params = {
            "now": self.now,
            "me": self.host_id,
            "page": page,
            "wait": self.locality_wait_s,
            "after_at": after[0],
            "after_id": after[1],
            "taken_p": [key.project for key in taken],
            "taken_w": [key.work_item for key in taken],
        }
        return [job_of(row) for row in self.conn.execute(sql, params)]

    def _offer(self, candidates: list[Job]) -> None:
        for job in candidates:
            if len(self.chosen) >= self.slots:
                return
            spec = job.spec
            if spec.key in self._taken:
                continue
            project_cap = self.caps.project(spec.project)
            agent_cap = self.caps.agent_type(spec.agent_type)
            if project_cap is not None or agent_cap is not None:
                projects = self._counts()
                if project_cap is not None and projects[spec.project] >= project_cap:
                    continue
                if agent_cap is not None and self._agents[spec.agent_type] >= agent_cap:
                    continue
            self._taken.add(spec.key)
            self._count(job)
            self.chosen.append(job)

    def _counts(self) -> collections.Counter[str]:
        """Key holders by project (and agent type), counted once under the claim lock:
        every other capped claim commits before it or counts after it."""
        if self._projects is None:
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (CLAIM_LOCK,))
            self._projects = collections.Counter()
            agents: collections.Counter[str] = collections.Counter()
            for row in self.conn.execute(_HOLDERS):
                self._projects[row["project"]] += int(row["n"])
                agents[row["agent_type"]] += int(row["n"])
            agents.update(self._agents)  # what this claim chose before counting
            self._agents = agents
            for job in self.chosen:
                self._projects[job.spec.project] += 1
        return self._projects

    def _count(self, job: Job) -> None:
        self._agents[job.spec.agent_type] += 1
        if self._projects is not None:
            self._projects[job.spec.project] += 1
