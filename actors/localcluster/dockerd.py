"""An extra ``dockerd`` as a stand-in host: its own data-root, exec-root, pidfile and socket.

Tests and the cluster demo run several "hosts" on one machine this way. The
daemon gets the main one's no-network flags and lives under one short temp
dir (a unix socket path holds at most 107 bytes, and containerd puts its own
socket under the exec-root). It shares nothing with the main daemon but the
kernel: it is stopped by its own PID, never through the main one.

``kill()`` is a host dying: the daemon, its containerd, its shims and its
containers all get SIGKILL at once, and its mounts are undone, but its data
stays, so ``start()`` brings the host back with its images, as a reboot
would. ``close()`` stops it and deletes everything.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from actors.engine.base import EngineUnavailable
from actors.engine.docker import DockerEngine
from actors.localcluster._process import StartFailed, reaped, stop_pid, wait_until

__all__ = ["LocalDockerd"]

_START_DEADLINE_S = 30.0
# dockerd stops running containers first (10 s each by default, in parallel).
_STOP_GRACE_S = 20.0
_KILL_DEADLINE_S = 10.0
_FLAGS = ("--bridge=none", "--iptables=false", "--ip-forward=false", "--ip-masq=false")
# Container cgroups of the cgroupfs driver (v1: one per controller; v2: one tree).
_CGROUP_ROOTS = (
    "/sys/fs/cgroup/pids/docker",
    "/sys/fs/cgroup/memory/docker",
    "/sys/fs/cgroup/docker",
)


class LocalDockerd:
    """One extra Docker daemon under ``/tmp/sy-XXXX`` (short on purpose)."""

    def __init__(self, name: str = "host") -> None:
        self.name = name
        self.directory = Path(tempfile.mkdtemp(prefix="sy-", dir="/tmp"))
        self.data_root = self.directory / "root"
        self.exec_root = self.directory / "exec"
        self.pidfile = self.directory / "pid"
        self.socket = self.directory / "docker.sock"
        self.log_path = self.directory / "dockerd.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def engine(self, timeout_s: float = 60.0) -> DockerEngine:
        """A DockerEngine on this daemon, its secret and helper files under its own dir."""
        return DockerEngine(
            self.url,
            timeout_s=timeout_s,
            secrets_dir=str(self.directory / "secrets"),
            helper_dir=str(self.directory / "helper"),
        )

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start (or start again, on the same data) and return once it answers a ping."""
        if self.running:
            return
        if shutil.which("dockerd") is None:
            raise StartFailed("dockerd is not installed; `make setup` installs Docker")
        self.directory.mkdir(exist_ok=True)
        argv = [
            "dockerd",
            f"--data-root={self.data_root}",
            f"--exec-root={self.exec_root}",
            f"--pidfile={self.pidfile}",
            f"--host=unix://{self.socket}",
            *_FLAGS,
        ]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        probe = self.engine(timeout_s=2.0)
        try:
            wait_until(
                lambda: _answers(probe),
                _START_DEADLINE_S,
                f"dockerd {self.name} ({self.url})",
                self._process,
                self.log_path,
            )
        except StartFailed:
            self.kill()
            raise

    def load_image(self, source: DockerEngine, image: str) -> str:
        """Copy ``image`` (the base worker image) from ``source``; return its ID (the same)."""
        return source.copy_image_to(image, self.engine())

    def stop(self, grace_s: float = _STOP_GRACE_S) -> None:
        """SIGTERM by PID, SIGKILL after ``grace_s``; then whatever it left is cleared."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            stop_pid(process.pid, grace_s, reap=lambda t: reaped(process, t))
        self._clear_leftovers()

    def kill(self) -> None:
        """The host dies: everything of this daemon gets SIGKILL now; its data stays."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            reaped(process, _KILL_DEADLINE_S)
        self._clear_leftovers()
        # Runtime state goes, as /run does on a reboot. A killed containerd may
        # linger as a zombie (PID 1 here need not reap it): its stale pidfile
        # would make the next dockerd wait for it and never start its own.
        shutil.rmtree(self.exec_root, ignore_errors=True)
        self.pidfile.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop, unmount and delete the whole directory."""
        try:
            self.stop()
        finally:
            self._unmount()
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> LocalDockerd:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # After the daemon: what a killed (or wedged) daemon leaves behind

    def _clear_leftovers(self) -> None:
        """Kill this daemon's containers, shims and containerd; undo its mounts.

        A SIGKILLed dockerd leaves its containerd and the containers' shims
        running. They are found by this daemon's own unique directory in their
        command line (or, for container processes, by the container IDs under
        its data-root), and signalled by PID: the main daemon's are never seen.
        """
        for pid in self._container_pids():
            _signal(pid, signal.SIGKILL)
        for pid in self._own_processes():
            _signal(pid, signal.SIGKILL)
        deadline = time.monotonic() + _KILL_DEADLINE_S
        while (self._own_processes() or self._container_pids()) and time.monotonic() < deadline:
            time.sleep(0.02)
        self._unmount()

    def _container_pids(self) -> set[int]:
        containers = self.data_root / "containers"
        ids = [entry.name for entry in containers.iterdir()] if containers.is_dir() else []
        pids: set[int] = set()
        for container_id in ids:
            for root in _CGROUP_ROOTS:
                with contextlib.suppress(OSError, ValueError):
                    text = (Path(root) / container_id / "cgroup.procs").read_text()
                    pids |= {int(line) for line in text.split()}
        return pids

    def _own_processes(self) -> set[int]:
        """This daemon's containerd and shims: containerd processes naming its directory."""
        marker = str(self.directory).encode()
        found: set[int] = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().startswith("containerd") and marker in (
                    entry / "cmdline"
                ).read_bytes():
                    found.add(int(entry.name))
        return found

    def _unmount(self) -> None:
        """Unmount everything under the directory, deepest first."""
        prefix = str(self.directory) + "/"
        points = []
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/mountinfo").read_text().splitlines():
                point = line.split()[4].replace("\\040", " ")
                if point.startswith(prefix) or point == str(self.directory):
                    points.append(point)
        for point in sorted(set(points), key=lambda p: p.count("/"), reverse=True):
            done = subprocess.run(["umount", point], capture_output=True, check=False)
            if done.returncode != 0:
                # Busy: detach it now, the kernel frees it when the last user goes.
                subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)


def _answers(engine: DockerEngine) -> bool:
    try:
        engine.ping()
    except EngineUnavailable:
        return False
    return True


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)
