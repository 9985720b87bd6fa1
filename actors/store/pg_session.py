"""One PostgreSQL connection for a store: transactions, batches, and connection loss.

Every use goes through ``session()``: it connects when there is no connection
(after a loss too), and turns a lost or refused connection into
``StoreUnavailable``, whose message names the server (never the password) and
what to check. A raw psycopg error never leaves this module for that.
Transactions mirror the SQLite store's: ``batch()`` groups writes, a write
inside a batch is a savepoint.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from actors.store.base import KeyHeld, StoreError, StoreUnavailable

__all__ = ["IDLE_IN_TRANSACTION_S", "LOCK_WAIT_S", "Conn", "PgSession", "describe"]

Conn = psycopg.Connection[dict[str, Any]]

# A dead peer (a cut cable, a partition) must surface as an error within
# seconds, not hang a claim until the kernel gives up (minutes).
_CONNECT_OPTIONS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
    "application_name": "snapyard",
}
_LOST = (psycopg.OperationalError, psycopg.InterfaceError)
IDLE_IN_TRANSACTION_S = 5.0
LOCK_WAIT_S = 15.0


def describe(url: str) -> str:
    """Where a database URL points, for messages: user@host:port/dbname, no password."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(an unparsable database_url)"
    host = parts.get("host") or parts.get("hostaddr") or "localhost"
    where = f"{host}:{parts.get('port') or 5432}/{parts.get('dbname') or '?'}"
    return f"{parts['user']}@{where}" if parts.get("user") else where


def _scrubbed(message: str, url: str) -> str:
    """A libpq message, first line, with the password cut out should it ever appear."""
    line = (message.strip().splitlines() or ["no detail"])[0]
    with contextlib.suppress(psycopg.ProgrammingError):
        password = conninfo_to_dict(url).get("password")
        if password:
            line = line.replace(str(password), "***")
    return line


class PgSession:
    """A lazily (re)connected connection, guarded by a lock, with nested transactions."""

    def __init__(self, url: str, idle_in_transaction_s: float = IDLE_IN_TRANSACTION_S) -> None:
        self._url = url
        # A host frozen or cut off inside a transaction holds its locks (the
        # claim's, history's) until the server notices: the server ends such a
        # session after this long, and a waiter gives up after LOCK_WAIT_S.
        # Generic plans: psycopg prepares a statement on its 5th use, and at
        # 100k queued jobs the server then re-planned the claim on every use
        # (0.65 ms against 0.35 ms; the plan is the same index walk either way).
        self._options = {
            **_CONNECT_OPTIONS,
            "options": (
                f"-c idle_in_transaction_session_timeout={int(idle_in_transaction_s * 1000)} "
                f"-c lock_timeout={int(LOCK_WAIT_S * 1000)} "
                "-c plan_cache_mode=force_generic_plan"
            ),
        }
        self.where = describe(url)
        self._lock = threading.RLock()
        self._conn: Conn | None = None
        self._depth = 0  # open batch() levels
        self._lost_in_batch = False

    def connect(self) -> Conn:
        """A new autocommit connection with dict rows (raises ``StoreUnavailable``)."""
        try:
            return psycopg.connect(
                self._url, autocommit=True, row_factory=dict_row, **self._options
            )
        except _LOST as exc:
            raise self.unavailable(exc) from None

    def unavailable(self, exc: BaseException) -> StoreUnavailable:
        detail = _scrubbed(str(exc), self._url)
        if isinstance(exc, psycopg.errors.TransactionRollback | psycopg.errors.LockNotAvailable):
            return StoreUnavailable(
                f"a write on {self.where} collided with another host's and was rolled back "
                f"({detail}); it is safe to try again."
            )
        # No "reconnects later" here: `snapyard run` at start-up and `doctor` do not.
        problem = f"the cluster database {self.where} cannot be reached ({detail})"
        return StoreUnavailable(
            f"{problem}: check that PostgreSQL runs and that [cluster] database_url is right",
            problem,
        )

    @contextlib.contextmanager
    def session(self) -> Iterator[Conn]:
        """The connection, under the lock; a lost one is dropped and reported."""
        with self._lock:
            if self._lost_in_batch:
                raise StoreUnavailable(
                    f"the connection to {self.where} was lost inside a batch of writes; "
                    "they were rolled back"
                )
            if self._conn is None or self._conn.closed:
                self._conn = self.connect()
            conn = self._conn
            try:
                yield conn
            except psycopg.Error as exc:
                lost = conn.broken or conn.closed
                if lost:
                    self._drop()
                if lost or isinstance(exc, _LOST):
                    raise self.unavailable(exc) from None
                raise StoreError(
                    f"the cluster database {self.where} refused a statement: "
                    f"{_scrubbed(str(exc), self._url)}"
                ) from None

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if self._depth > 0:
            self._lost_in_batch = True
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """One transaction for the writes inside; commits even when the body raises
        (as the SQLite store does). A connection lost inside: ``StoreUnavailable``."""
        with self._lock:
            if self._depth == 0:
                self._begin()
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    if self._lost_in_batch:
                        self._lost_in_batch = False
                        raise StoreUnavailable(
                            f"the connection to {self.where} was lost inside a batch of "
                            "writes; they were rolled back"
                        )
                    with self.session() as conn:
                        conn.execute("COMMIT")

    def _begin(self) -> None:
        """BEGIN, on a new connection if the idle one turns out dead (the server
        restarted, a cut cable): nothing ran on it yet, so one retry loses nothing."""
        try:
            with self.session() as conn:
                conn.execute("BEGIN")
        except StoreUnavailable:
            with self.session() as conn:
                conn.execute("BEGIN")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Conn]:
        """All or nothing: its own transaction, or a savepoint inside a batch."""
        rollback: tuple[str, ...]
        with self.session() as conn:
            if self._depth == 0:
                conn.execute("BEGIN")
                commit, rollback = "COMMIT", ("ROLLBACK",)
            else:
                conn.execute("SAVEPOINT write")
                commit, rollback = "RELEASE write", ("ROLLBACK TO write", "RELEASE write")
            try:
                yield conn
            except BaseException as exc:
                if not (conn.broken or conn.closed):
                    for statement in rollback:
                        conn.execute(statement)
                if isinstance(exc, psycopg.errors.UniqueViolation):
                    raise _unique(exc) from None
                raise
            conn.execute(commit)

    def close(self) -> None:
        with self._lock:
            self._drop()
            self._lost_in_batch = False


def _unique(exc: psycopg.errors.UniqueViolation) -> StoreError:
    constraint = exc.diag.constraint_name
    if constraint == "jobs_key_holder":
        return KeyHeld(f"another job holds this (project, work item): {exc.diag.message_detail}")
    return StoreError(f"already stored ({constraint}): {exc.diag.message_detail}")
