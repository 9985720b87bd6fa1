"""The host files DockerEngine bind-mounts into workers: secret env files and the env helper.

Both live on the daemon's host (Snapyard and dockerd share a machine). Neither
ever enters a container's config, so a commit cannot copy them into a
snapshot; the Mounts of a removed container tell which secret file to delete.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from actors.engine.base import EngineError, encode_secret_env
from actors.private_files import ensure_private_dir
from actors.worker_helper import HelperError, write_helper_dir

__all__ = ["SECRET_ENV_GID", "HostFiles"]

# The group that may read a container's secret env file (mode 0640), added to
# the container's process (--group-add) whatever user the image runs as: a
# non-root USER cannot read a 0600 root file, and with every capability
# dropped not even root in the container reads another owner's file. A
# dedicated number, outside Debian's system (<1000) and user (<60000) ranges.
SECRET_ENV_GID = 61_893


class HostFiles:
    """Writes and forgets the per-container secret files; writes the helper once."""

    def __init__(self, secrets_dir: Path, helper_dir: Path) -> None:
        self.secrets_dir = secrets_dir
        self.helper_dir = helper_dir
        self._helper_path: Path | None = None

    def helper(self) -> Path:
        """The host's helper directory, written on first use."""
        if self._helper_path is None:
            try:
                self._helper_path = write_helper_dir(self.helper_dir)
            except (HelperError, OSError) as exc:
                raise EngineError(
                    f"cannot prepare the env helper in {self.helper_dir}: {exc}"
                ) from exc
        return self._helper_path

    def write_secrets(self, secret_env: Mapping[str, str]) -> tuple[Path, int]:
        """One private file per container, bind-mounted read-only: never in its config.

        Returns the file and the group that may read it (see SECRET_ENV_GID); a
        supervisor that may not give it that group uses its own.
        """
        ensure_private_dir(self.secrets_dir)
        path = self.secrets_dir / f"{uuid.uuid4().hex}.env"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(encode_secret_env(secret_env))
        group = SECRET_ENV_GID
        try:
            os.chown(path, -1, group)
        except PermissionError:
            group = os.getegid()  # not root: a group we are in
        # Only the owner and that group: the 0700 directory keeps every other
        # host user out; in the container only the job's process has the group.
        path.chmod(0o640)
        return path, group

    def forget_secrets(self, mounts: list[Mapping[str, Any]]) -> None:
        for mount in mounts:
            source = Path(str(mount.get("Source", "")))
            if source.parent == self.secrets_dir and source.suffix == ".env":
                source.unlink(missing_ok=True)
