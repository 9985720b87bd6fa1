"""The faults of scenario 8, applied alike to Snapyard and to the naive peer.

``OutageRelay``: a unix-socket relay to dockerd that goes dark ``outage_s``
every ``period_s``: open connections (event streams, blocked waits) are cut
and new ones are closed at once, as when the daemon restarts. Both sides talk
to Docker through the same relay, in the fault-free runs too, so the relay's
own cost is on both sides of every ratio.

``ImageDeleter``: ``docker rmi -f`` of one random snapshot image of a run at
a set rate, from its own thread.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["ImageDeleter", "OutageRelay", "in_outage", "overlapping"]

_CHUNK = 65536


def in_outage(elapsed_s: float, period_s: float, outage_s: float) -> bool:
    """Dark for the last ``outage_s`` of every ``period_s`` (the first period starts lit)."""
    if outage_s <= 0:
        return False
    return elapsed_s % period_s >= period_s - outage_s


class OutageRelay:
    def __init__(
        self, target: str, path: Path, period_s: float = 10.0, outage_s: float = 0.0
    ) -> None:
        self.target = target  # dockerd's socket path
        self.path = path
        self.period_s = period_s
        self.outage_s = outage_s
        self.outages = 0
        self._began = time.monotonic()
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    def dark(self) -> bool:
        return in_outage(time.monotonic() - self._began, self.period_s, self.outage_s)

    def __enter__(self) -> OutageRelay:
        self._listener.bind(str(self.path))
        self._listener.listen(64)
        self._began = time.monotonic()
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()
        if self.outage_s > 0:
            threading.Thread(target=self._schedule, name="relay-clock", daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._cut_all()
        self.path.unlink(missing_ok=True)

    def _schedule(self) -> None:
        was_dark = False
        while not self._stop.wait(0.02):
            dark = self.dark()
            if dark and not was_dark:
                self.outages += 1
                self._cut_all()
            was_dark = dark

    def _cut_all(self) -> None:
        with self._lock:
            live, self._live = self._live, set()
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.dark():
                client.close()
                continue
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self.target)
            except OSError:
                client.close()
                upstream.close()
                continue
            with self._lock:
                self._live.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(_CHUNK):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._live.discard(src)
            src.close()  # the pair's other pump closes the other end


class ImageDeleter:
    """Every ``interval_s``, force-delete one random image that ``find`` lists."""

    def __init__(
        self,
        api: Any,
        find: Callable[[], list[str]],
        interval_s: float,
        seed: int = 15,
    ) -> None:
        self.api = api
        self.find = find
        self.interval_s = interval_s
        self.deleted = 0
        self._random = random.Random(seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="image-deleter", daemon=True)

    def __enter__(self) -> ImageDeleter:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30.0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(Exception):  # a fault injector must not die of one
                images = self.find()
                if images:
                    self.api.remove_image(self._random.choice(images), force=True)
                    self.deleted += 1


def overlapping(intervals: dict[Any, list[tuple[float, float]]]) -> int:
    """How many runs began while another run of the same key was still going."""
    count = 0
    for spans in intervals.values():
        latest_end = float("-inf")
        for began, ended in sorted(spans):
            if began < latest_end:
                count += 1
            latest_end = max(latest_end, ended)
    return count
