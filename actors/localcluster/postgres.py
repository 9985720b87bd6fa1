"""A throwaway PostgreSQL server: its own data dir, a loopback port, gone on exit.

Debian's ``initdb`` and ``postgres`` refuse to run as root, so as root the
data dir is owned by the ``postgres`` user and every server command runs
through ``runuser -u postgres``. Nothing here uses ``pg_ctlcluster`` or a
packaged cluster: ``-D`` always names our own temp dir. About 1 s from
nothing to a query, about 27 MB.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

__all__ = ["LocalPostgres", "LocalPostgresError", "find_bin_dir"]

_DATABASE = "snapyard"
_SUPERUSER = "postgres"


class LocalPostgresError(RuntimeError):
    """The throwaway server could not be made, started or stopped."""


def find_bin_dir(version: str = "15") -> Path:
    """Debian's server binaries (``/usr/lib/postgresql/15/bin``), else the newest there."""
    preferred = Path(f"/usr/lib/postgresql/{version}/bin")
    if (preferred / "initdb").exists():
        return preferred
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise LocalPostgresError(
            "PostgreSQL's server binaries are missing (no /usr/lib/postgresql/*/bin/initdb): "
            "run `make setup`, or `sudo apt-get install postgresql`"
        )
    return Path(found[-1]).parent


def free_port() -> int:
    """A loopback port nobody listens on now (another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LocalPostgres:
    """A PostgreSQL server in a temp dir on 127.0.0.1:``port``, with one database.

    ``url`` is a libpq URL with trust authentication (no password exists).
    ``stop()`` and ``start()``/``restart()`` keep the data: tests restart the
    server under a running store. ``close()`` (or leaving the ``with``) stops
    it and deletes the dir.
    """

    def __init__(self, *, bin_dir: Path | None = None, durable: bool = False) -> None:
        """``durable`` False: no fsync (a throwaway server need not survive power loss)."""
        self._bin = bin_dir or find_bin_dir()
        self._durable = durable
        self._as_postgres = os.geteuid() == 0
        self.dir = Path(tempfile.mkdtemp(prefix="snapyard-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.running = False
        self._closed = False
        try:
            if self._as_postgres:
                try:
                    owner = pwd.getpwnam(_SUPERUSER)
                except KeyError:
                    raise LocalPostgresError(
                        "as root, PostgreSQL must run as the 'postgres' user, and there is "
                        "none: install Debian's postgresql package (`make setup`)"
                    ) from None
                os.chown(self.dir, owner.pw_uid, owner.pw_gid)
            self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", _SUPERUSER, "--no-sync")
            self._start_on_a_free_port()
            self._run(
                "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", _SUPERUSER, _DATABASE
            )
        except BaseException:
            self.close()
            raise
        atexit.register(self.close)

    @property
    def url(self) -> str:
        return f"postgresql://{_SUPERUSER}@127.0.0.1:{self.port}/{_DATABASE}"

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self._bin / tool), *args]
        if self._as_postgres:
            command = ["runuser", "-u", _SUPERUSER, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.dir, check=False)
        if done.returncode != 0:
            raise LocalPostgresError(
                f"{tool} failed (exit {done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
            )

    def _start_on_a_free_port(self, tries: int = 3) -> None:
        """Another process may take the probed port before the server binds it."""
        for attempt in range(tries):
            try:
                self.start()
                return
            except LocalPostgresError:
                if attempt == tries - 1:
                    raise
                self.port = free_port()

    def start(self) -> None:
        """Start the server on its port (a no-op when it runs); waits until it answers."""
        if self.running:
            return
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        if not self._durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w",
            "-o", options, "start",
        )  # fmt: skip
        self.running = True

    def stop(self) -> None:
        """Stop the server (fast: open sessions are cut); its data stays for ``start()``."""
        if not self.running:
            return
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        self.running = False

    def restart(self) -> None:
        """Stop and start again on the same port: every client connection is cut."""
        self.stop()
        self.start()

    def log(self) -> str:
        """The server's log, for a failing test's message."""
        with contextlib.suppress(OSError):
            return (self.dir / "server.log").read_text(errors="replace")
        return ""

    def close(self) -> None:
        """Stop the server and delete its dir; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            if self.running:
                with contextlib.suppress(LocalPostgresError):
                    self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
