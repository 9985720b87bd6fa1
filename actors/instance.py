"""Which containers and images are this instance's: several Snapyards, one engine.

Every instance labels what it creates with its ID (``snapyard.instance``);
sweeps, counts, re-adoption and registry rebuilds keep to that label, so one
instance never removes, counts or adopts another's workers or snapshots.

Upgrade rule for objects made before the label existed (no instance label):
a container is adopted only when its job ID is a job in this instance's own
store (so it is provably ours); any other unlabelled container, and every
unlabelled snapshot image, is foreign: never adopted, counted or deleted.
Such snapshots cost each work item one setup from the base image; remove them
by hand (``docker image ls --filter label=snapyard.role=snapshot``).
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from actors.engine.base import ContainerState, ImageInfo
from actors.labels import LABEL_INSTANCE, LABEL_JOB_ID, LABEL_REPOSITORY
from actors.private_files import ensure_private_dir
from actors.settings import Settings

__all__ = [
    "INSTANCE_ID_FILE",
    "labelled_mine",
    "mine",
    "owned_snapshots",
    "resolve_instance_id",
]

log = logging.getLogger(__name__)

INSTANCE_ID_FILE = "instance-id"


def resolve_instance_id(settings: Settings) -> Settings:
    """``settings`` with a concrete ``supervisor.instance_id``.

    An empty one is read from ``<data_dir>/instance-id``, which is created
    (0600, exclusively: two racing first starts agree on one ID) when missing.
    The ID must outlive the process: a restart with a new one would leave
    every running worker and snapshot foreign to it.
    """
    if settings.supervisor.instance_id:
        return settings
    ensure_private_dir(settings.data_dir)
    path = settings.data_dir / INSTANCE_ID_FILE
    return settings.replace(supervisor={"instance_id": _read_or_create(path)})


def _read_or_create(path: Path) -> str:
    try:
        with open(path, "x", encoding="ascii", opener=_private) as file:
            created = f"sy-{secrets.token_hex(8)}"
            file.write(created + "\n")
            log.info("generated instance ID %s in %s", created, path)
            return created
    except FileExistsError:
        pass
    found = path.read_text(encoding="ascii").strip()
    if not found:
        raise ValueError(f"{path} is empty: write an instance ID in it or delete it")
    return found


def _private(name: str, flags: int) -> int:
    return os.open(name, flags, 0o600)


def labelled_mine(labels: Mapping[str, str], instance_id: str) -> bool:
    """Labelled with this instance's ID (what images and new containers carry)."""
    return labels.get(LABEL_INSTANCE) == instance_id


def mine(
    containers: Iterable[ContainerState], instance_id: str, known_job: Callable[[str], bool]
) -> list[ContainerState]:
    """This instance's containers among managed ones: labelled with its ID, or
    (made before the label existed) unlabelled and running one of its jobs."""
    found: list[ContainerState] = []
    for container in containers:
        labels = container.labels
        if LABEL_INSTANCE in labels:
            if labels[LABEL_INSTANCE] == instance_id:
                found.append(container)
            continue
        job_id = labels.get(LABEL_JOB_ID)
        if job_id and known_job(job_id):
            found.append(container)
    return found


def owned_snapshots(
    images: Iterable[ImageInfo], repository: str, instance_id: str
) -> list[ImageInfo]:
    """The snapshot images a registry rebuild may adopt (and so later delete):
    this repository's (an unlabelled one counts as ours, as before) and
    labelled with this instance; an unlabelled instance may be another's."""
    return [
        i
        for i in images
        if i.labels.get(LABEL_REPOSITORY, repository) == repository
        and labelled_mine(i.labels, instance_id)
    ]
