"""The label and env contract between Snapyard, Docker and the worker.

Labels are how Snapyard finds its own things again after a restart: the
Supervisor re-adopts containers by them, the SnapshotManager rebuilds its
registry from image labels, the Watcher filters events by them. Env names are
what the worker's entrypoint reads. Both outlive any one process, so they are
spelled here once and nowhere else; changing a value breaks running hosts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

__all__ = [
    "CONFIG_FILE",
    "CONTAINER_ENV",
    "ENV_JOB_ID",
    "ENV_SETUP_SECONDS",
    "ENV_SNAPSHOT_REUSE",
    "JOB_LABELS",
    "LABEL_AGENT_TYPE",
    "LABEL_ATTEMPT",
    "LABEL_BASE_IMAGE_ID",
    "LABEL_CREATED_AT",
    "LABEL_DEMO",
    "LABEL_IMAGE_SOURCE",
    "LABEL_INSTANCE",
    "LABEL_JOB_ID",
    "LABEL_MANAGED",
    "LABEL_PROJECT",
    "LABEL_REPOSITORY",
    "LABEL_ROLE",
    "LABEL_SNAPSHOT_ENABLED",
    "LABEL_WORKER_DIGEST",
    "LABEL_WORK_ITEM",
    "MANAGED_FILTER",
    "RESERVED_ENV_PREFIX",
    "ROLE_BASE",
    "ROLE_SNAPSHOT",
    "SECRET_ENV_PATH",
    "STORE_FILE",
]

# --- every worker container ------------------------------------------------
# snapyard.managed=true, snapyard.job.id, snapyard.project, snapyard.work_item,
# snapyard.agent_type, snapyard.snapshot.enabled=true|false,
# snapyard.image.source=base|snapshot, snapyard.base_image_id=<lineage base ID>
LABEL_MANAGED: Final = "snapyard.managed"
LABEL_JOB_ID: Final = "snapyard.job.id"
LABEL_PROJECT: Final = "snapyard.project"
LABEL_WORK_ITEM: Final = "snapyard.work_item"
LABEL_AGENT_TYPE: Final = "snapyard.agent_type"
# The job's attempt (its fencing token) the container runs: a restarted host
# removes at once a container whose job was rescued meanwhile (a newer attempt).
LABEL_ATTEMPT: Final = "snapyard.job.attempt"
LABEL_SNAPSHOT_ENABLED: Final = "snapyard.snapshot.enabled"
LABEL_IMAGE_SOURCE: Final = "snapyard.image.source"
LABEL_BASE_IMAGE_ID: Final = "snapyard.base_image_id"
# Which Snapyard instance (supervisor.instance_id) created the container or
# snapshot: sweeps, counts, re-adoption and registry rebuilds touch only their
# own instance's, so several instances can share one engine.
LABEL_INSTANCE: Final = "snapyard.instance"

# The filter for "containers this Snapyard runs": listings and event streams.
MANAGED_FILTER: Final[Mapping[str, str]] = {LABEL_MANAGED: "true"}

# Docker merges a container's labels into its commit: these describe one job
# and are blanked in every snapshot so no image claims to be a running job.
JOB_LABELS: Final = (
    LABEL_MANAGED,
    LABEL_JOB_ID,
    LABEL_ATTEMPT,
    LABEL_AGENT_TYPE,
    LABEL_SNAPSHOT_ENABLED,
    LABEL_IMAGE_SOURCE,
)

# --- images ------------------------------------------------------------------
# What an image is to Snapyard: a base worker image or a committed snapshot.
LABEL_ROLE: Final = "snapyard.role"
ROLE_BASE: Final = "base"
ROLE_SNAPSHOT: Final = "snapshot"
# When the snapshot was committed (seconds since the epoch, as repr(float)).
LABEL_CREATED_AT: Final = "snapyard.created_at"
# Which snapshot repository (one Snapyard instance) owns the image: two
# instances on one engine must never adopt, or delete, each other's snapshots.
LABEL_REPOSITORY: Final = "snapyard.repository"
# A digest of the base image's build inputs: an unchanged context skips the build.
LABEL_WORKER_DIGEST: Final = "snapyard.worker.digest"

# Marks what `snapyard demo` creates, so its clean-up touches nothing else.
LABEL_DEMO: Final = "snapyard.demo"

# --- the worker's env ----------------------------------------------------------
# Names starting with this are set by Snapyard; a job may not define them.
RESERVED_ENV_PREFIX: Final = "SNAPYARD_"
ENV_JOB_ID: Final = "SNAPYARD_JOB_ID"
ENV_SNAPSHOT_REUSE: Final = "SNAPYARD_SNAPSHOT_REUSE"
ENV_SETUP_SECONDS: Final = "SNAPYARD_SETUP_SECONDS"
CONTAINER_ENV: Final = (ENV_JOB_ID, ENV_SNAPSHOT_REUSE, ENV_SETUP_SECONDS)
# Where a worker finds its secret env: one NAME=<base64 of the UTF-8 value> a
# line; the worker's entrypoint.sh reads this very path.
SECRET_ENV_PATH: Final = "/run/snapyard/env"  # noqa: S105 - a path, not a password

# --- files ---------------------------------------------------------------------
# Names a data dir written by one version must keep for the next: the job
# store, and the shipped default configuration (package data).
STORE_FILE: Final = "snapyard.db"
CONFIG_FILE: Final = "snapyard.toml"
