"""A throwaway CNCF distribution registry (Debian's ``docker-registry``) on loopback.

Tests and the cluster demo move snapshots between engines through it. It
keeps its config and its storage in one temp dir, so ``stop()`` and
``start()`` again bring back the same registry, blobs and all, on the same
port: that is how a test takes the registry away mid-run.

Deleting a manifest (``DELETE /v2/<name>/manifests/<digest>``, see
actors/cluster/registry_http.py) only unlinks it; the blobs stay on disk until
``garbage_collect()`` runs the registry's own collector, which the upstream
docs ask to run while the registry is stopped (or read-only).
"""

from __future__ import annotations

import http.client
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from actors.localcluster._process import (
    ProcessError,
    StartFailed,
    free_port,
    log_tail,
    reaped,
    stop_pid,
    wait_until,
)

__all__ = ["BINARY", "LocalRegistry"]

BINARY = "docker-registry"
_START_DEADLINE_S = 10.0
_STOP_GRACE_S = 5.0
_INSTALL_HINT = "install it with `apt-get install -y docker-registry` (make setup does)"


def _config(address: str, storage: Path) -> str:
    # YAML by hand: five keys do not earn a dependency. No auth, no TLS: loopback only.
    return (
        "version: 0.1\n"
        "log:\n"
        "  level: warn\n"
        "  accesslog:\n"
        "    disabled: true\n"
        "storage:\n"
        "  filesystem:\n"
        f"    rootdirectory: {storage}\n"
        "  delete:\n"
        "    enabled: true\n"
        "http:\n"
        f"  addr: {address}\n"
    )


class LocalRegistry:
    """One ``docker-registry serve`` on ``127.0.0.1:PORT``, storage in a temp dir.

    Docker talks plain HTTP to registries on 127.0.0.0/8 by default, so no
    daemon setting is needed to push or pull through it.
    """

    def __init__(self, port: int | None = None, directory: Path | None = None) -> None:
        self.port = port or free_port()
        self._owns_dir = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix="snapyard-registry-"))
        self.storage = self.directory / "storage"
        self.config_path = self.directory / "config.yml"
        self.log_path = self.directory / "registry.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``: the registry part of a repository name."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def repository(self, name: str) -> str:
        """A fully qualified repository on this registry: ``127.0.0.1:PORT/name``."""
        return f"{self.address}/{name}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Serve (again) on the same port and storage; return once ``GET /v2/`` answers."""
        if self.running:
            return
        if shutil.which(BINARY) is None:
            raise StartFailed(f"{BINARY} is not installed; {_INSTALL_HINT}")
        self.storage.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(_config(self.address, self.storage))
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [BINARY, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a Ctrl-C in a terminal is the demo's to handle
            )
        try:
            wait_until(
                self.answers,
                _START_DEADLINE_S,
                f"the registry on {self.address}",
                self._process,
                self.log_path,
            )
        except StartFailed:
            self.kill()
            raise

    def answers(self) -> bool:
        """True when ``GET /v2/`` answers 200 (the distribution API's ping)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1.0)
        try:
            conn.request("GET", "/v2/")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def stop(self, grace_s: float = _STOP_GRACE_S) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; the storage stays for ``start()``."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        stop_pid(process.pid, grace_s, reap=lambda t: reaped(process, t))

    def kill(self) -> None:
        """Gone at once, as a crashed registry: SIGKILL, no grace."""
        self.stop(grace_s=0.0)

    def garbage_collect(self, delete_untagged: bool = False) -> str:
        """Run the registry's own collector on its storage; return its report.

        It frees the blobs no manifest references any more (after manifest
        deletes). Upstream requires the registry not to serve writes meanwhile,
        so this stops it first and starts it again if it was running.
        """
        if not (self.storage / "docker" / "registry" / "v2" / "repositories").is_dir():
            return ""  # Nothing pushed yet; the collector fails on an empty storage.
        was_running = self.running
        self.stop()
        argv = [BINARY, "garbage-collect", str(self.config_path)]
        if delete_untagged:
            argv.append("--delete-untagged")
        try:
            done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
        finally:
            if was_running:
                self.start()
        if done.returncode != 0:
            raise ProcessError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")
        return done.stdout

    def blobs(self) -> set[str]:
        """The digests of every blob stored (layers, configs and manifests alike).

        Read from the storage directory, so a test can see what a push really
        uploaded and what a garbage collection freed.
        """
        root = self.storage / "docker" / "registry" / "v2" / "blobs" / "sha256"
        if not root.is_dir():
            return set()
        return {f"sha256:{blob.name}" for blob in root.glob("*/*") if (blob / "data").is_file()}

    def log(self) -> str:
        return log_tail(self.log_path)

    def close(self) -> None:
        """Stop and delete the temp dir (only a dir this object made)."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> LocalRegistry:
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
