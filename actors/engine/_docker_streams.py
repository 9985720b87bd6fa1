"""docker-py's streams (events, a followed log), normalised for the Engine protocol.

Private to ``actors.engine.docker``: errors go through the engine's one
translation (``DockerEngine._raise``), so a stream fails exactly as a call does.
"""

from __future__ import annotations

import codecs
import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from actors.engine._docker_json import engine_event
from actors.engine.base import EngineEvent

if TYPE_CHECKING:
    from actors.engine.docker import DockerEngine

__all__ = ["DockerEventStream", "DockerLogStream"]


class DockerEventStream:
    """Docker's event stream, normalised.

    docker-py ends the iteration quietly both when we close the stream and
    when the daemon goes away; only the first is a normal end, so the second
    raises EngineUnavailable (as the in-memory engine does) and the Watcher
    knows to reconnect.
    """

    def __init__(self, engine: DockerEngine, stream: Any) -> None:
        self._engine = engine
        self._stream = stream
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[EngineEvent]:
        try:
            for raw in self._stream:
                event = engine_event(raw)
                if event is not None:
                    yield event
        except Exception as exc:
            if self._closed.is_set():
                return
            self._engine._raise(exc)
        if not self._closed.is_set():
            raise self._engine._unavailable("the event stream ended")

    def close(self) -> None:
        self._closed.set()
        # Closing a stream the daemon already dropped is not worth an error.
        with contextlib.suppress(Exception):
            self._stream.close()


class DockerLogStream:
    """docker-py's followed log, decoded: a UTF-8 character split across two
    chunks is held back until its second half arrives."""

    def __init__(self, engine: DockerEngine, stream: Any) -> None:
        self._engine = engine
        self._stream = stream
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        try:
            for chunk in self._stream:
                text = decoder.decode(chunk)
                if text:
                    yield text
        except Exception as exc:
            if self._closed.is_set():
                return
            self._engine._raise(exc)
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    def close(self) -> None:
        self._closed.set()
        self._stream.close()
