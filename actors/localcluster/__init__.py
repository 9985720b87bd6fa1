"""Throwaway real engines on loopback for tests and the cluster demo.

Each one lives in its own temp dir, listens on 127.0.0.1 only, and is a
context manager that deletes everything it made; each can be stopped (and
killed) on purpose, so tests can take a part of a cluster away. None of them
ever touches a system-wide service (a packaged PostgreSQL cluster, the main dockerd).
"""

from __future__ import annotations

from actors.localcluster.postgres import LocalPostgres, LocalPostgresError

__all__ = ["LocalPostgres", "LocalPostgresError"]
