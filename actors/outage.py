"""The job store away, said once: a WARNING when it starts, an INFO when it ends.

A cluster's PostgreSQL restarts and partitions are expected, and handled: the
lease fences the host, the Supervisor keeps the replies it could not record,
the API answers 503. Logged as errors they buried real bugs under a traceback
a second from every actor (and filled Sentry). So each component that meets
``StoreUnavailable`` keeps a ``StoreOutage``: the first failure is one WARNING
line without a traceback, the next ones are silent, and the first success
after them is one INFO line. Any other exception stays an ERROR for Sentry.

pykka logs, at INFO with a traceback, every exception an actor hands back to an
asking caller; ``quiet_pykka`` drops that line for ``StoreUnavailable``, which
the caller reports itself.
"""

from __future__ import annotations

import logging
import threading

from actors.store.base import StoreUnavailable

__all__ = ["StoreOutage", "quiet_pykka"]


class StoreOutage:
    """Whether one component last found the job store away; thread-safe (the API's
    routes run on a thread pool)."""

    def __init__(self, who: str, logger: logging.Logger) -> None:
        self._who = who
        self._log = logger
        self._lock = threading.Lock()
        self._away = False

    @property
    def away(self) -> bool:
        return self._away

    def lost(self, exc: BaseException) -> bool:
        """True if ``exc`` is the store away (handled: the caller logs nothing more);
        the first of an outage is logged, once."""
        if not isinstance(exc, StoreUnavailable):
            return False
        with self._lock:
            first, self._away = not self._away, True
        if first:
            self._log.warning(
                "%s: the job store is unavailable; retrying quietly until it answers: %s",
                self._who,
                exc,
            )
        return True

    def answered(self) -> None:
        """The store answered: the end of an outage, if one was under way, is logged."""
        if not self._away:  # the common case, without the lock
            return
        with self._lock:
            was, self._away = self._away, False
        if was:
            self._log.info("%s: the job store answers again", self._who)


class _NoStoreUnavailable(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, StoreUnavailable)


_QUIET = _NoStoreUnavailable()


def quiet_pykka() -> None:
    """Drop pykka's "Exception returned ... to caller" lines for ``StoreUnavailable``
    (idempotent: the filter is added once)."""
    logger = logging.getLogger("pykka")
    if _QUIET not in logger.filters:
        logger.addFilter(_QUIET)
