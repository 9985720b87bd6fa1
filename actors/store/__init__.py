"""The durable job store: the queue is a table (see ``actors.store.base``).

``JobStore`` is the interface the actors use; ``SqliteStore`` is the
single-host implementation and the default. ``open_store`` picks one. The
cluster's ``PostgresStore`` is imported from ``actors.store.postgres``, so a
single host never loads psycopg.
"""

from __future__ import annotations

import os

from actors.clock import Clock
from actors.store.base import (
    LOGS_TAIL_LINES,
    Caps,
    JobStore,
    KeyHeld,
    StoreError,
    StoreUnavailable,
    new_job_id,
)
from actors.store.cluster import Fenced
from actors.store.schema import MIGRATIONS, SCHEMA_VERSION
from actors.store.sqlite import SqliteStore

__all__ = [
    "LOGS_TAIL_LINES",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Caps",
    "Fenced",
    "JobStore",
    "KeyHeld",
    "SqliteStore",
    "StoreError",
    "StoreUnavailable",
    "new_job_id",
    "open_store",
]


def open_store(path: str | os.PathLike[str], clock: Clock | None = None) -> JobStore:
    """The store for one host: SQLite in ``path``."""
    return SqliteStore(path, clock)
