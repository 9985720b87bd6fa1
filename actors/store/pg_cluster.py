"""The PostgreSQL store's cluster half: hosts and leases, rescue, the snapshot index.

A mixin of ``PostgresStore`` (``ClusterStore``'s methods beyond ``JobStore``),
kept apart so each module holds one concern.
"""

from __future__ import annotations

import builtins
from collections.abc import Collection

from actors.model import Job, SnapshotKey
from actors.store.cluster import HostInfo, SnapshotRecord
from actors.store.pg_schema import HISTORY_ROWS, NOTIFY, RESCUE_LOCK
from actors.store.pg_session import PgSession
from actors.store.rows import COLUMNS, job_of

__all__ = ["ClusterOps"]

# Starting and running jobs of every host whose lease has ended go back to the
# queue with a new attempt; the CTE remembers which host each one was on.
_RESCUE = f"""
WITH dead AS (
    SELECT j.id, j.host FROM jobs j JOIN hosts o ON o.host_id = j.host
    WHERE o.lease_until < %(now)s AND j.state IN ('starting', 'running')
    FOR UPDATE OF j
)
UPDATE jobs j SET state = 'queued', attempt = j.attempt + 1, holds_key = false, host = NULL,
    container_id = NULL, retry_at = NULL, queued_at = %(now)s, home = (
        SELECT s.host_id FROM snapshots s WHERE s.project = j.project AND s.work_item = j.work_item)
FROM dead WHERE j.id = dead.id
RETURNING {", ".join(f"j.{name}" for name in COLUMNS)}, dead.host AS was_on
"""  # noqa: S608 - constant SQL

# A finished job of a dead host that still holds its key (its container was
# being removed): the key is free, and the late host's release is fenced.
_RELEASE_DEAD = """
UPDATE jobs j SET holds_key = false, attempt = j.attempt + 1
FROM hosts o
WHERE o.host_id = j.host AND o.lease_until < %(now)s AND j.holds_key
  AND j.state NOT IN ('starting', 'running')
"""

_SNAPSHOT_COLUMNS = "project, work_item, agent_type, host_id, image_id, created_at, digest"


class ClusterOps:
    """Hosts, leases, rescue and the snapshot index, on the store's session."""

    host_id: str
    _session: PgSession
    _draining: bool
    _heartbeats: int

    # --- hosts and leases -------------------------------------------------

    def heartbeat(
        self, now: float, lease_s: float, *, api: str, max_workers: int, running: int
    ) -> None:
        """Renew this host's lease to ``now + lease_s``; the first beat of a process
        also sets ``started_at``."""
        with self._session.transaction() as conn:
            conn.execute(
                "INSERT INTO hosts (host_id, started_at, last_seen, lease_until, api, "
                "max_workers, running, draining) "
                "VALUES (%(host)s, %(now)s, %(now)s, %(until)s, %(api)s, %(max)s, %(running)s, "
                "%(draining)s) ON CONFLICT (host_id) DO UPDATE SET "
                "started_at = CASE WHEN %(fresh)s THEN excluded.started_at "
                "ELSE hosts.started_at END, last_seen = excluded.last_seen, "
                "lease_until = excluded.lease_until, api = excluded.api, "
                "max_workers = excluded.max_workers, running = excluded.running, "
                "draining = excluded.draining",
                {
                    "host": self.host_id,
                    "now": now,
                    "until": now + lease_s,
                    "api": api,
                    "max": max_workers,
                    "running": running,
                    "draining": self._draining,
                    "fresh": self._heartbeats == 0,
                },
            )
        self._heartbeats += 1

    def drain(self, draining: bool) -> None:
        """Claim nothing new (True) or again (False); shown in ``hosts()`` at once."""
        self._draining = draining
        with self._session.transaction() as conn:
            conn.execute(
                "UPDATE hosts SET draining = %s WHERE host_id = %s", (draining, self.host_id)
            )

    def hosts(self) -> builtins.list[HostInfo]:
        with self._session.session() as conn:
            rows = conn.execute(
                "SELECT host_id, started_at, last_seen, lease_until, api, max_workers, running, "
                "draining FROM hosts ORDER BY host_id"
            ).fetchall()
        return [HostInfo(**row) for row in rows]

    def rescue_expired(self, now: float) -> builtins.list[Job]:
        """Re-queue the jobs of hosts whose lease ended, if this host wins the election.

        The advisory lock is a transaction's: one host rescues at a time, and a
        loser returns at once rather than queue behind the winner.
        """
        with self._session.transaction() as conn:
            won = conn.execute(
                "SELECT pg_try_advisory_xact_lock(%s) AS won", (RESCUE_LOCK,)
            ).fetchone()
            if won is None or not won["won"]:
                return []
            rows = conn.execute(_RESCUE, {"now": now}).fetchall()
            conn.execute(_RELEASE_DEAD, {"now": now})
            if rows:
                conn.execute(
                    HISTORY_ROWS,
                    (
                        [row["id"] for row in rows],
                        ["queued"] * len(rows),
                        [now] * len(rows),
                        [f"rescued: host {row['was_on']} missed its lease" for row in rows],
                    ),
                )
            if rows:
                conn.execute(NOTIFY)
        return sorted((job_of(row) for row in rows), key=lambda job: (job.created_at, job.id))

    # --- cancels across hosts ---------------------------------------------

    def request_cancel(self, job_id: str) -> str | None:
        """Record a cancel of a job another host runs, and wake that host; the
        host it was handed to (None: not starting or running elsewhere now)."""
        with self._session.transaction() as conn:
            row = conn.execute(
                "UPDATE jobs SET cancel_requested = true WHERE id = %s "
                "AND state IN ('starting', 'running') AND host IS NOT NULL AND host <> %s "
                "RETURNING host",
                (job_id, self.host_id),
            ).fetchone()
            if row is not None:
                conn.execute(NOTIFY)
        return None if row is None else str(row["host"])

    def cancel_requests(self) -> builtins.list[str]:
        """This host's starting or running jobs another host was asked to cancel."""
        with self._session.session() as conn:
            rows = conn.execute(
                "SELECT id FROM jobs WHERE cancel_requested AND host = %s "
                "AND state IN ('starting', 'running')",
                (self.host_id,),
            ).fetchall()
        return [str(row["id"]) for row in rows]

    # --- the snapshot index -----------------------------------------------

    def record_snapshot(self, record: SnapshotRecord) -> bool:
        """The key's newest snapshot becomes ``record`` unless a newer one is indexed."""
        key = record.key
        with self._session.transaction() as conn:
            row = conn.execute(
                f"INSERT INTO snapshots ({_SNAPSHOT_COLUMNS}) "  # noqa: S608
                "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (project, work_item) "
                "DO UPDATE SET agent_type = excluded.agent_type, host_id = excluded.host_id, "
                "image_id = excluded.image_id, created_at = excluded.created_at, "
                "digest = excluded.digest "
                "WHERE snapshots.created_at < excluded.created_at "
                "OR snapshots.image_id = excluded.image_id "
                "RETURNING image_id",
                (
                    key.project,
                    key.work_item,
                    record.agent_type,
                    record.host_id,
                    record.image_id,
                    record.created_at,
                    record.digest,
                ),
            ).fetchone()
            if row is not None:  # the key's queued jobs now live where this snapshot is
                conn.execute(
                    "UPDATE jobs SET home = %s WHERE state = 'queued' AND project = %s "
                    "AND work_item = %s AND home IS DISTINCT FROM %s",
                    (record.host_id, key.project, key.work_item, record.host_id),
                )
        return row is not None

    def record_digest(self, key: SnapshotKey, image_id: str, digest: str) -> None:
        with self._session.transaction() as conn:
            conn.execute(
                "UPDATE snapshots SET digest = %s "
                "WHERE project = %s AND work_item = %s AND image_id = %s",
                (digest, key.project, key.work_item, image_id),
            )

    def newest_snapshot(self, key: SnapshotKey) -> SnapshotRecord | None:
        with self._session.session() as conn:
            row = conn.execute(
                f"SELECT {_SNAPSHOT_COLUMNS} FROM snapshots "  # noqa: S608
                "WHERE project = %s AND work_item = %s",
                (key.project, key.work_item),
            ).fetchone()
        return None if row is None else _record(row)

    def forget_snapshot(self, key: SnapshotKey, image_id: str) -> None:
        with self._session.transaction() as conn:
            gone = conn.execute(
                "DELETE FROM snapshots WHERE project = %s AND work_item = %s AND image_id = %s "
                "RETURNING host_id",
                (key.project, key.work_item, image_id),
            ).fetchone()
            if gone is not None:
                conn.execute(
                    "UPDATE jobs SET home = NULL WHERE state = 'queued' AND project = %s "
                    "AND work_item = %s AND home = %s",
                    (key.project, key.work_item, gone["host_id"]),
                )

    def snapshots(self) -> builtins.list[SnapshotRecord]:
        with self._session.session() as conn:
            rows = conn.execute(
                f"SELECT {_SNAPSHOT_COLUMNS} FROM snapshots ORDER BY project, work_item"  # noqa: S608
            ).fetchall()
        return [_record(row) for row in rows]

    def superseded(self, mine: Collection[tuple[SnapshotKey, str]]) -> builtins.list[SnapshotKey]:
        """Of this host's copies, the keys whose indexed newest snapshot is another image."""
        pairs = builtins.list(mine)
        if not pairs:
            return []
        with self._session.session() as conn:
            rows = conn.execute(
                "SELECT DISTINCT m.project, m.work_item FROM unnest(%s::text[], %s::text[], "
                "%s::text[]) AS m(project, work_item, image_id) "
                "JOIN snapshots s ON s.project = m.project AND s.work_item = m.work_item "
                "WHERE s.image_id <> m.image_id ORDER BY m.project, m.work_item",
                (
                    [key.project for key, _ in pairs],
                    [key.work_item for key, _ in pairs],
                    [image for _, image in pairs],
                ),
            ).fetchall()
        return [SnapshotKey(row["project"], row["work_item"]) for row in rows]


def _record(row: dict[str, object]) -> SnapshotRecord:
    return SnapshotRecord(
        key=SnapshotKey(str(row["project"]), str(row["work_item"])),
        agent_type=str(row["agent_type"]),
        host_id=str(row["host_id"]),
        image_id=str(row["image_id"]),
        created_at=float(row["created_at"]),  # type: ignore[arg-type]
        digest=None if row["digest"] is None else str(row["digest"]),
    )
