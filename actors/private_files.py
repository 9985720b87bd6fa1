"""The data dir holds job env (queued jobs must survive a restart) and secret
files: it is created private (0700), and so are the files in it (0600).

An existing directory is not re-moded behind its owner's back (it may be a
systemd StateDirectory or a mount); ``loose_permissions`` lets ``doctor`` and
start-up say so instead. Files Snapyard owns outright are tightened.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["ensure_private_dir", "ensure_private_file", "loose_permissions"]


def ensure_private_dir(path: Path) -> None:
    """``mkdir -p`` where every directory it creates is 0700, parents included.

    ``Path.mkdir(mode, parents=True)`` gives the mode to the last directory
    only: a data dir first made as the parent of its ``secrets/`` came out
    0755. The umask can only take bits away from 0700.
    """
    missing: list[Path] = []
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    for directory in reversed(missing):
        directory.mkdir(mode=0o700, exist_ok=True)


def ensure_private_file(path: Path) -> None:
    """Create ``path`` 0600 if missing, and take group/other bits off if present.

    SQLite creates its -wal and -shm files with the database file's mode, so
    a 0600 database keeps its journals private too.
    """
    descriptor = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.fchmod(descriptor, stat.S_IMODE(os.fstat(descriptor).st_mode) & 0o700)
    finally:
        os.close(descriptor)


def loose_permissions(path: Path) -> str | None:
    """What is too open about ``path`` (group or others may read it), or None."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return None
    if mode & 0o077:
        return f"{path} is mode {mode:04o}: group or others can read what it holds"
    return None
