"""The Spawner pool: the Spawners by name, and what each one owes its parent.

Every exchange with a Spawner is a ``tell`` carrying ``reply_to``; the pool
remembers each message until its reply arrives, so when a Spawner crashes
its parent knows exactly which operations died with its inbox and can redo,
re-queue or fail each one (see ``Supervisor._on_crashed``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Literal

import pykka

__all__ = ["OpKind", "SpawnerFactory", "SpawnerPool"]

OpKind = Literal["spawn", "finish", "terminate"]

# Builds (or rebuilds, after a crash) the Spawner called ``name``, whose crash
# reports go to the given parent ref.
SpawnerFactory = Callable[[str, pykka.ActorRef[Any]], pykka.ActorRef[Any]]


class SpawnerPool:
    def __init__(self, factory: SpawnerFactory, size: int) -> None:
        self._factory = factory
        self._names = [f"spawner-{index + 1}" for index in range(size)]
        self.refs: dict[str, pykka.ActorRef[Any]] = {}
        self._pending: dict[str, dict[tuple[str, OpKind], Any]] = {}

    def start(self, parent: pykka.ActorRef[Any]) -> None:
        for name in self._names:
            self.refs[name] = self._factory(name, parent)
            self._pending[name] = {}

    def least_busy(self) -> str | None:
        if not self.refs:
            return None
        return min(self.refs, key=lambda name: (len(self._pending.get(name, {})), name))

    def load(self) -> int:
        """Operations sent and not yet answered, over the whole pool."""
        return sum(len(ops) for ops in self._pending.values())

    def send(self, name: str, job_id: str, kind: OpKind, message: Any) -> str | None:
        """Tell a Spawner, remembering that it owes a reply; the dead one's urn if it is dead."""
        self._pending.setdefault(name, {})[(job_id, kind)] = message
        ref = self.refs[name]
        try:
            ref.tell(message)
        except pykka.ActorDeadError:
            return ref.actor_urn
        return None

    def done(self, name: str, job_id: str, kind: OpKind) -> None:
        self._pending.get(name, {}).pop((job_id, kind), None)

    def knows(self, name: str) -> bool:
        return name in self.refs

    def is_current(self, name: str, urn: str | None) -> bool:
        """False for a report about an incarnation already replaced (a second report)."""
        return urn is None or urn == self.refs[name].actor_urn

    def restart(self, name: str, parent: pykka.ActorRef[Any]) -> dict[tuple[str, OpKind], Any]:
        """Replace a crashed Spawner; return the operations that died with it."""
        with contextlib.suppress(pykka.ActorDeadError):
            self.refs[name].stop(block=False)
        self.refs[name] = self._factory(name, parent)
        lost = self._pending.pop(name, {})
        self._pending[name] = {}
        return lost

    def stop(self) -> list[pykka.Future[Any]]:
        """Ask every Spawner to stop after its inbox; the caller bounds the wait."""
        return [ref.stop(block=False) for ref in self.refs.values()]
