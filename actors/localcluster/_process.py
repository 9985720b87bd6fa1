"""Starting and stopping a throwaway server process: the parts every local engine shares."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "ProcessError",
    "StartFailed",
    "free_port",
    "log_tail",
    "reaped",
    "stop_pid",
    "wait_until",
]

# How often a readiness probe is repeated: a server answers in tens of ms.
_POLL_S = 0.02


class ProcessError(RuntimeError):
    """A throwaway server could not be started or stopped."""


class StartFailed(ProcessError):
    """A throwaway server did not come up; the message carries the tail of its log."""


def free_port() -> int:
    """A loopback port nothing listens on right now (the kernel's pick).

    Another process could take it before our server binds it; the server then
    fails to start and says so, which is rare enough on a test machine.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_until(
    ready: Callable[[], bool],
    deadline_s: float,
    what: str,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Poll ``ready`` until it holds; StartFailed when ``process`` exits or time runs out.

    Waiting on the process between probes (not sleeping) notices a server that
    died at once, instead of waiting out the whole deadline.
    """
    deadline = time.monotonic() + deadline_s
    while not ready():
        if process is not None:
            try:
                code = process.wait(timeout=_POLL_S)
            except subprocess.TimeoutExpired:
                pass
            else:
                tail = log_tail(log) if log else ""
                raise StartFailed(f"{what} exited with {code} before it was ready:\n{tail}")
        else:
            time.sleep(_POLL_S)
        if time.monotonic() > deadline:
            tail = log_tail(log) if log else ""
            raise StartFailed(f"{what} was not ready within {deadline_s}s:\n{tail}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_pid(
    pid: int,
    grace_s: float,
    reap: Callable[[float], bool] | None = None,
) -> None:
    """SIGTERM, then SIGKILL once ``grace_s`` passes; return when the process is gone.

    ``reap(timeout)`` waits for our own child (so it leaves no zombie) and says
    whether it ended; without it the PID is polled.
    """
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if reap is not None:
                if reap(_POLL_S):
                    return
            elif not _alive(pid):
                return
            else:
                time.sleep(_POLL_S)
    raise ProcessError(f"process {pid} survived SIGKILL")


def reaped(process: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for our child to end (and reap it); True if it did."""
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False
    return True
