"""The base worker image, built through the Engine from files on this machine.

No registry is reachable, so the image is ``FROM scratch`` plus Debian's static
busybox. The image carries a digest of everything that went into it: when the
tag already points at an image with that digest the build is skipped, which
keeps ``make image`` instant when nothing changed, and any edit to the
Dockerfile, the entrypoint or busybox itself triggers a rebuild.

A configured image is the user's, not ours, unless we built it: Snapyard
builds only in its own demo repository (``snapyard-worker``), and rebuilds or
deletes only an image carrying its role label. Anything else is used exactly
as it is, and a missing one is an error that says how to build or load it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from actors.engine.base import Engine, EngineError, ImageInfo, ImageMissing
from actors.labels import LABEL_ROLE, LABEL_WORKER_DIGEST, ROLE_BASE
from actors.worker_helper import BUSYBOX, INSTALL_HINT, HelperError, require_static_elf

__all__ = [
    "BUSYBOX",
    "DEMO_REPOSITORY",
    "WORKER_DIR",
    "WorkerContext",
    "WorkerImageError",
    "build_context",
    "content_tag",
    "ensure_base_image",
    "ensure_worker_images",
    "is_demo_image",
    "missing_image_hint",
]

log = logging.getLogger(__name__)

# Shipped inside the package (package data), so an installed wheel builds it too.
WORKER_DIR: Traversable = files("actors") / "worker"
# The only repository Snapyard builds into: `snapyard-worker:<any tag>`.
DEMO_REPOSITORY = "snapyard-worker"


class WorkerImageError(Exception):
    """The worker image cannot be had as configured; the message says the fix."""


def is_demo_image(ref: str) -> bool:
    """Whether ``ref`` names Snapyard's own demo repository, which it may build into.

    ``snapyard-worker``, ``snapyard-worker:x`` and ``docker.io/library/snapyard-worker:x``
    do; ``me/snapyard-worker`` or ``127.0.0.1:5000/snapyard-worker`` do not.
    """
    name = ref.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    repository = name[: len(name) - len(last)] + last.split(":", 1)[0]
    return repository in (DEMO_REPOSITORY, f"docker.io/library/{DEMO_REPOSITORY}")


def content_tag(purpose: str) -> str:
    """``snapyard-worker:<purpose>-<digest>``: a demo image tag no other checkout shares.

    Test sessions and benchmarks on a shared engine each build their own: a
    checkout with another entrypoint would otherwise rebuild a shared tag
    under a running session, which would then measure the wrong image.
    """
    return f"{DEMO_REPOSITORY}:{purpose}-{build_context().digest[:12]}"


def missing_image_hint(ref: str) -> str:
    """How a person gets the worker image ``ref`` onto the engine."""
    if is_demo_image(ref):
        return "build it with `snapyard image build` (or `make image`)"
    return (
        f"build it (`docker build -t {ref} DIR`) or load it (`docker load -i FILE`) on this "
        f"engine, or set worker.image to {DEMO_REPOSITORY}:latest for Snapyard's demo worker"
    )


def _built_by_snapyard(labels: Mapping[str, str]) -> bool:
    return labels.get(LABEL_ROLE) == ROLE_BASE and LABEL_WORKER_DIGEST in labels


@dataclass(frozen=True)
class WorkerContext:
    tar: bytes
    digest: str


def build_context(worker_dir: Traversable = WORKER_DIR, busybox: Path = BUSYBOX) -> WorkerContext:
    """The build context as a tar, and a digest of its inputs."""
    try:
        busybox_blob = busybox.read_bytes()
    except FileNotFoundError:
        raise WorkerImageError(f"{busybox} is missing; {INSTALL_HINT}") from None
    try:
        require_static_elf(busybox, busybox_blob)
    except HelperError as exc:
        raise WorkerImageError(str(exc)) from None
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
    """Return ``(image ID, built)`` for the configured worker image.

    A user's image (outside ``snapyard-worker``, or without our role label)
    is used as it is and never built over; ``force`` on it is refused. Our
    own is built when missing and rebuilt when its inputs changed.
    """
    current: ImageInfo | None
    try:
        current = engine.inspect_image(tag)
    except ImageMissing:
        current = None
    if current is None and not is_demo_image(tag):
        raise WorkerImageError(
            f"the worker image {tag} does not exist on {engine.describe()}; "
            f"{missing_image_hint(tag)}"
        )
    if current is not None and not (is_demo_image(tag) and _built_by_snapyard(current.labels)):
        if force:
            raise WorkerImageError(
                f"{tag} ({current.id[7:19]}) is not an image Snapyard built, so it is never "
                f"rebuilt or replaced; Snapyard builds only {DEMO_REPOSITORY}:<tag>"
            )
        return current.id, False
    context = build_context(worker_dir, busybox)
    if (
        current is not None
        and not force
        and current.labels.get(LABEL_WORKER_DIGEST) == context.digest
    ):
        return current.id, False
    labels = {LABEL_ROLE: ROLE_BASE, LABEL_WORKER_DIGEST: context.digest}
    built = engine.build_image(context.tar, tag, labels)
    if current is not None and current.id != built:
        # The old base lost its tag; delete it unless snapshots or containers
        # still stand on it (then Docker refuses, and a later prune takes it).
        with contextlib.suppress(EngineError):
            engine.remove_image(current.id)
    return built, True


def ensure_worker_images(engine: Engine, images: Iterable[str]) -> dict[str, str]:
    """Ensure every configured image (``worker.image``, each agent type's); their IDs.

    All or nothing: the first missing user's image stops start-up with its
    fix, since a job of that agent type could never run.
    """
    ids: dict[str, str] = {}
    for image in images:
        ids[image], built = ensure_base_image(engine, image)
        if built:
            log.info("built the worker image %s (%s)", image, ids[image])
        else:
            log.info("worker image %s (%s)", image, ids[image][:19])
    return ids
