"""Throwaway real engines on loopback for tests and the cluster demo.

Each one lives in its own temp dir, listens on 127.0.0.1 only, and is a
context manager that deletes everything it made. None of them ever touches a
system-wide service (a packaged PostgreSQL cluster, the main dockerd).
"""

from __future__ import annotations

from actors.localcluster.postgres import LocalPostgres, LocalPostgresError

__all__ = ["LocalPostgres", "LocalPostgresError"]
