"""Reaper actor: the Supervisor's hands for listing and removing containers.

The Supervisor makes no Docker call in its message loop, yet it must see the
engine's truth (reconciling missed exits, finding orphans). The Reaper makes
those calls on its own thread and reports back by message. It never decides
what is an orphan: the Supervisor, which knows every unfinished job, does.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import pykka

from actors.engine.base import ContainerMissing, Engine, EngineError
from actors.labels import LABEL_INSTANCE, LABEL_MANAGED, MANAGED_FILTER
from actors.messages import ActorCrashed, ContainersListed, ListContainers, RemoveContainer
from actors.telemetry import capture_error

__all__ = ["Reaper"]

log = logging.getLogger(__name__)


class Reaper(pykka.ThreadingActor):
    """Lists managed containers and removes the ones the Supervisor names."""

    def __init__(
        self,
        engine: Engine,
        parent: pykka.ActorRef[Any] | None = None,
        name: str = "reaper",
        *,
        instance_id: str | None = None,
    ) -> None:
        """``parent`` hears of every bug (``ActorCrashed``): it counts them.
        ``instance_id``: never remove a container labelled with another one."""
        super().__init__()
        self._instance_id = instance_id
        self._engine = engine
        self._parent = parent
        self._name = name

    def on_receive(self, message: Any) -> Any:
        # Every failure is caught: a tell handler that raises would stop the
        # actor silently, and the Supervisor would wait for a reply forever.
        # It has no state to lose, so going on is its restart; its parent counts.
        try:
            match message:
                case ListContainers():
                    self._list(message)
                case RemoveContainer():
                    self._remove(message)
                case _:
                    log.warning("reaper: unexpected message %r", message)
        except Exception as exc:
            log.exception("reaper: %s failed", type(message).__name__)
            capture_error(exc, source="reaper")
            if self._parent is not None:
                with contextlib.suppress(pykka.ActorDeadError):
                    self._parent.tell(
                        ActorCrashed(
                            self._name,
                            f"{type(exc).__name__}: {exc}",
                            urn=self.actor_urn,
                            restarted=True,
                        )
                    )
        return None

    def _list(self, message: ListContainers) -> None:
        try:
            containers = tuple(self._engine.list_containers(MANAGED_FILTER))
        except EngineError as exc:
            reply = ContainersListed(message.reason, message.seq, (), error=str(exc))
        else:
            reply = ContainersListed(message.reason, message.seq, containers)
        try:
            message.reply_to.tell(reply)
        except pykka.ActorDeadError:
            log.debug("reaper: %s is gone; dropping the listing", message.reply_to)

    def _remove(self, message: RemoveContainer) -> None:
        cid = message.container_id
        try:
            state = self._engine.inspect_container(cid)
            # Belt and braces: never touch a container without our label, even
            # if a caller got an ID wrong.
            if state.labels.get(LABEL_MANAGED) != "true":
                log.error("reaper: refusing to remove unmanaged container %s", cid)
                return
            owner = state.labels.get(LABEL_INSTANCE)
            if self._instance_id is not None and owner not in (None, self._instance_id):
                log.error("reaper: refusing to remove %s of instance %s", cid, owner)
                return
            if state.running:
                self._engine.stop_container(cid, message.grace_s)
            self._engine.remove_container(cid, force=True)
            log.info("reaper: removed container %s (%s)", cid, message.reason)
        except ContainerMissing:
            log.debug("reaper: container %s already gone", cid)
        except EngineError as exc:
            # The next sweep tries again; an orphan is never worth a crash.
            log.warning("reaper: could not remove %s: %s", cid, exc)
