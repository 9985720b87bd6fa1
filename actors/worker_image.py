"""The base worker image, built through the Engine from files on this machine.

No registry is reachable, so the image is ``FROM scratch`` plus Debian's static
busybox. The image carries a digest of everything that went into it: when the
tag already points at an image with that digest the build is skipped, which
keeps ``make image`` instant when nothing changed, and any edit to the
Dockerfile, the entrypoint or busybox itself triggers a rebuild.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import struct
import tarfile
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from actors.engine.base import Engine, EngineError, ImageMissing
from actors.labels import LABEL_ROLE, LABEL_WORKER_DIGEST, ROLE_BASE

__all__ = [
    "BUSYBOX",
    "WORKER_DIR",
    "WorkerContext",
    "WorkerImageError",
    "build_context",
    "ensure_base_image",
]

# Shipped inside the package (package data), so an installed wheel builds it too.
WORKER_DIR: Traversable = files("actors") / "worker"
BUSYBOX = Path("/bin/busybox")
_INSTALL_HINT = "install Debian's static busybox: `apt-get install busybox-static`"
_PT_INTERP = 3


class WorkerImageError(Exception):
    """The inputs of the worker image are missing or unusable; the message says the fix."""


@dataclass(frozen=True)
class WorkerContext:
    tar: bytes
    digest: str


def _require_static_elf(path: Path, blob: bytes) -> None:
    """Refuse a dynamic busybox: FROM scratch has no loader, so it could not even start.

    A dynamically linked ELF names its loader in a PT_INTERP program header.
    """
    if blob[:4] != b"\x7fELF" or len(blob) < 64:
        raise WorkerImageError(f"{path} is not an ELF executable; {_INSTALL_HINT}")
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
            raise WorkerImageError(
                f"{path} is dynamically linked and cannot run in an empty image; {_INSTALL_HINT}"
            )


def build_context(worker_dir: Traversable = WORKER_DIR, busybox: Path = BUSYBOX) -> WorkerContext:
    """The build context as a tar, and a digest of its inputs."""
    try:
        busybox_blob = busybox.read_bytes()
    except FileNotFoundError:
        raise WorkerImageError(f"{busybox} is missing; {_INSTALL_HINT}") from None
    _require_static_elf(busybox, busybox_blob)
    inputs: list[tuple[str, bytes, int]] = []
    for name in ("Dockerfile", "entrypoint.sh"):
        try:
            inputs.append((name, (worker_dir / name).read_bytes(), 0o644))
        except FileNotFoundError:
            raise WorkerImageError(
                f"{worker_dir / name} is missing: the worker image is built from {worker_dir}"
            ) from None
    inputs.append(("busybox", busybox_blob, 0o755))

    digest = hashlib.sha256()
    buffer = io.BytesIO()
    # Fixed owners and mtimes: the same inputs give the same bytes, and the
    # daemon's build cache can reuse every step.
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, blob, mode in inputs:
            digest.update(f"{name}\0{mode:o}\0{len(blob)}\0".encode())
            digest.update(blob)
            member = tarfile.TarInfo(name)
            member.size = len(blob)
            member.mode = mode
            member.mtime = 0
            tar.addfile(member, io.BytesIO(blob))
    return WorkerContext(tar=buffer.getvalue(), digest=digest.hexdigest())


def ensure_base_image(
    engine: Engine,
    tag: str,
    force: bool = False,
    worker_dir: Traversable = WORKER_DIR,
    busybox: Path = BUSYBOX,
) -> tuple[str, bool]:
    """Return ``(image ID, built)``; build only if ``tag`` lacks this context's digest."""
    context = build_context(worker_dir, busybox)
    previous: str | None = None
    try:
        current = engine.inspect_image(tag)
    except ImageMissing:
        pass
    else:
        if not force and current.labels.get(LABEL_WORKER_DIGEST) == context.digest:
            return current.id, False
        previous = current.id
    labels = {LABEL_ROLE: ROLE_BASE, LABEL_WORKER_DIGEST: context.digest}
    built = engine.build_image(context.tar, tag, labels)
    if previous is not None and previous != built:
        # The old base lost its tag; delete it unless snapshots or containers
        # still stand on it (then Docker refuses, and a later prune takes it).
        with contextlib.suppress(EngineError):
            engine.remove_image(previous)
    return built, True
