"""The container a job runs in, decided from the job and its worker settings alone.

Pure, so the rules read in one place: the job's env is secret (a file, never
the container's config, which Docker copies into every snapshot committed
from it); the labels are how a restart finds the container again; the limits
are the agent type's (``Settings.worker_for``).
"""

from __future__ import annotations

from collections.abc import Mapping

from actors.engine.base import ContainerSpec
from actors.labels import (
    ENV_JOB_ID,
    ENV_SETUP_SECONDS,
    ENV_SNAPSHOT_REUSE,
    LABEL_AGENT_TYPE,
    LABEL_ATTEMPT,
    LABEL_BASE_IMAGE_ID,
    LABEL_IMAGE_SOURCE,
    LABEL_JOB_ID,
    LABEL_MANAGED,
    LABEL_PROJECT,
    LABEL_SNAPSHOT_ENABLED,
    LABEL_WORK_ITEM,
)
from actors.lineage import StartImage
from actors.model import JobSpec
from actors.settings import WorkerSettings

__all__ = ["worker_container_spec"]


def worker_container_spec(
    job_id: str,
    spec: JobSpec,
    start: StartImage,
    worker: WorkerSettings,
    snapshots_enabled: bool,
    extra_labels: Mapping[str, str],
    attempt: int = 0,
) -> ContainerSpec:
    """``worker`` is ``[worker]`` with the agent type's image and limits over it."""
    snapshot = start.snapshot
    env = {
        ENV_JOB_ID: job_id,
        ENV_SNAPSHOT_REUSE: "1" if snapshot is not None else "0",
        ENV_SETUP_SECONDS: f"{worker.setup_seconds:g}",
    }
    labels = dict(extra_labels)
    labels.update(
        {
            LABEL_MANAGED: "true",
            LABEL_JOB_ID: job_id,
            LABEL_ATTEMPT: str(attempt),
            LABEL_PROJECT: spec.project,
            LABEL_WORK_ITEM: spec.work_item,
            LABEL_AGENT_TYPE: spec.agent_type,
            LABEL_SNAPSHOT_ENABLED: "true" if snapshots_enabled else "false",
            LABEL_IMAGE_SOURCE: "snapshot" if snapshot is not None else "base",
            LABEL_BASE_IMAGE_ID: start.base_image_id,
        }
    )
    return ContainerSpec(
        # A snapshot by ID (immutable); the base by tag, as configured.
        image=start.image,
        # None: the image's own CMD, as `docker run IMAGE` would run it.
        command=spec.command or worker.command or None,
        env=env,
        secret_env=dict(spec.env),
        labels=labels,
        memory_bytes=worker.memory_mb * 1024 * 1024,
        pids_limit=worker.pids_limit,
        cpus=worker.cpus,
        network=worker.network,
        init=True,
        auto_remove=False,  # we read the logs and maybe commit before removing
        cap_drop_all=worker.drop_all_capabilities,
        no_new_privileges=True,
    )
