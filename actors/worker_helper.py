"""The env helper: how a job's env reaches any image, with no help from the image.

The job's env is secret, so it never enters a container's config (a commit
copies that config into the snapshot); it travels as a private file mounted at
``SECRET_ENV_PATH``. Something inside the container must export it before the
job runs, and a user's image knows nothing of it. So Snapyard brings its own:
a host directory holding Debian's static busybox and ``snapyard-init`` (a
small sh script), bind-mounted read-only at ``HELPER_MOUNT`` and made the
container's entrypoint. It exports the env and ``exec``s the image's own
entrypoint and command, so the job keeps the init process's PID 1 child slot:
signals reach it and its exit code is the container's.

This module is pure: the argv rule and the files. The engine
(``actors/engine/docker.py``) mounts them; nothing here calls Docker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import struct
import tempfile
from collections.abc import Sequence
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Final

from actors.engine.base import ImageConfig
from actors.private_files import ensure_private_dir

__all__ = [
    "BUSYBOX",
    "HELPER_MOUNT",
    "HELPER_SCRIPT",
    "INSTALL_HINT",
    "HelperError",
    "helper_entrypoint",
    "is_helper_entrypoint",
    "job_argv",
    "require_static_elf",
    "unwrapped",
    "write_helper_dir",
]

BUSYBOX: Final = Path("/bin/busybox")
INSTALL_HINT: Final = "install Debian's static busybox: `apt-get install busybox-static`"
# Where the helper directory appears in every worker container (read-only).
HELPER_MOUNT: Final = "/run/snapyard/helper"
# The script, shipped as package data so an installed wheel has it too.
HELPER_SCRIPT: Traversable = files("actors") / "helper" / "snapyard-init"
_PT_INTERP = 3


class HelperError(Exception):
    """The helper cannot be prepared on this host; the message says the fix."""


def job_argv(
    entrypoint: Sequence[str] | None, cmd: Sequence[str] | None, command: Sequence[str] | None
) -> tuple[str, ...]:
    """What Docker would run: the image's ENTRYPOINT, then the job's command or the CMD.

    A job's command replaces CMD and keeps ENTRYPOINT (``docker run IMAGE CMD...``).
    """
    return (*(entrypoint or ()), *(command if command else (cmd or ())))


def helper_entrypoint(argv: Sequence[str]) -> tuple[str, ...]:
    """The container's whole entrypoint: busybox runs the script, which execs ``argv``.

    Everything sits in the entrypoint and the container's CMD stays empty: on a
    commit Docker fills an empty CMD from the container's, so an empty one is
    the only value that cannot leak into a snapshot of an image without CMD.
    """
    return (f"{HELPER_MOUNT}/busybox", "sh", f"{HELPER_MOUNT}/snapyard-init", *argv)


def unwrapped(
    config: ImageConfig,
    container_entrypoint: Sequence[str] | None,
    image_entrypoint: Sequence[str] | None,
    image_cmd: Sequence[str] | None,
) -> ImageConfig:
    """A commit's config with the helper taken out again.

    Docker fills a commit's unset entrypoint (and CMD) from the container's,
    which under the helper is the helper's argv, the job's command included.
    The engine put the helper in, so the engine takes it out: what a commit
    leaves unset becomes the image's own, as if the helper had never been.
    """
    if not is_helper_entrypoint(container_entrypoint):
        return config
    return dataclasses.replace(
        config,
        entrypoint=tuple(image_entrypoint or ())
        if config.entrypoint is None
        else config.entrypoint,
        cmd=tuple(image_cmd or ()) if config.cmd is None else config.cmd,
    )


def is_helper_entrypoint(entrypoint: Sequence[str] | None) -> bool:
    """Whether a container's entrypoint is the helper's (``helper_entrypoint``)."""
    return (
        entrypoint is not None
        and len(entrypoint) > 0
        and entrypoint[0] == f"{HELPER_MOUNT}/busybox"
    )


def require_static_elf(path: Path, blob: bytes) -> None:
    """Refuse a dynamic busybox: neither an empty image nor the helper mount has a loader.

    A dynamically linked ELF names its loader in a PT_INTERP program header.
    """
    if blob[:4] != b"\x7fELF" or len(blob) < 64:
        raise HelperError(f"{path} is not an ELF executable; {INSTALL_HINT}")
    is_64 = blob[4] == 2
    endian = "<" if blob[5] == 1 else ">"
    if is_64:
        (phoff,) = struct.unpack_from(endian + "Q", blob, 0x20)
        phentsize, phnum = struct.unpack_from(endian + "HH", blob, 0x36)
    else:
        (phoff,) = struct.unpack_from(endian + "I", blob, 0x1C)
        phentsize, phnum = struct.unpack_from(endian + "HH", blob, 0x2A)
    for index in range(phnum):
        (p_type,) = struct.unpack_from(endian + "I", blob, phoff + index * phentsize)
        if p_type == _PT_INTERP:
            raise HelperError(
                f"{path} is dynamically linked and cannot run in an empty image; {INSTALL_HINT}"
            )


def _make_readable(directory: Path) -> None:
    """Readable and runnable by whichever user the image runs as (no secret in it)."""
    directory.chmod(0o755)
    (directory / "busybox").chmod(0o755)
    (directory / "snapyard-init").chmod(0o644)


def write_helper_dir(root: Path, busybox: Path = BUSYBOX) -> Path:
    """The helper directory under ``root``, written once per content; returns its path.

    Named by a digest of what it holds, so a new Snapyard never rewrites the
    files under a container that still runs an older helper, and two
    instances sharing ``root`` agree. Written to a temporary directory and
    renamed, so a container never mounts a half-written helper.
    """
    try:
        blob = busybox.read_bytes()
    except FileNotFoundError:
        raise HelperError(f"{busybox} is missing; {INSTALL_HINT}") from None
    require_static_elf(busybox, blob)
    script = HELPER_SCRIPT.read_bytes()
    digest = hashlib.sha256(blob + b"\0" + script).hexdigest()[:16]
    target = root / digest
    if (target / "snapyard-init").is_file():
        # A `chmod -R go=` of the data dir (what doctor suggests for loose
        # modes) must not leave the image's non-root user unable to run it.
        _make_readable(target)
        return target
    # The data dir above holds secrets: never create it looser than 0700.
    ensure_private_dir(root)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        (staging / "busybox").write_bytes(blob)
        (staging / "snapyard-init").write_bytes(script)
        _make_readable(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "snapyard-init").is_file():
                raise  # not a concurrent writer winning the race: a real failure
    finally:
        if staging.exists():
            for leftover in staging.iterdir():
                leftover.unlink()
            with contextlib.suppress(OSError):
                staging.rmdir()
    return target
