"""Committing a clean run as its key's snapshot, on the Spawner's thread.

The commit is where a job's secrets could leak into an image, so its config
is built here and nowhere else: the base image's env with every job and
Snapyard key named empty, the image's own entrypoint and CMD, the job labels
blanked. At ``snapshots.max_layers`` the commit is flattened into one layer
on the base (``actors.layers``), so a work item keeps its state. A commit or
flatten that fails leaves no image behind.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

from actors.clock import Clock
from actors.engine.base import Engine, EngineError, ImageConfig, ImageInfo
from actors.labels import (
    CONTAINER_ENV,
    JOB_LABELS,
    LABEL_BASE_IMAGE_ID,
    LABEL_CREATED_AT,
    LABEL_INSTANCE,
    LABEL_PROJECT,
    LABEL_REPOSITORY,
    LABEL_ROLE,
    LABEL_WORK_ITEM,
    ROLE_SNAPSHOT,
)
from actors.layers import depth_above, must_flatten, own_bytes
from actors.model import JobSpec, Snapshot
from actors.naming import same_image, snapshot_image_name
from actors.settings import Settings

__all__ = ["Snapshotter"]

log = logging.getLogger("actors.spawner")

T = TypeVar("T")


class Patiently(Protocol):
    """One engine call retried through a blip (the Spawner's ``_patiently``)."""

    def __call__(self, call: Callable[..., T], /, *args: Any) -> T: ...


class Snapshotter:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        clock: Clock,
        patiently: Patiently,
        resolve_base: Callable[[str], str],
    ) -> None:
        """``resolve_base`` gives an image's current ID and tells the manager of a new one."""
        self._engine = engine
        self._settings = settings
        self._clock = clock
        self._patiently = patiently
        self._resolve_base = resolve_base

    def commit(self, job_id: str, spec: JobSpec, container_id: str) -> Snapshot | None:
        """The snapshot to register, or None when the base moved while it ran."""
        state = self._patiently(self._engine.inspect_container, container_id)
        base_image = self._settings.worker_for(spec.agent_type).image
        current_base = self._patiently(self._resolve_base, base_image)
        lineage = state.labels.get(LABEL_BASE_IMAGE_ID) or current_base
        if not same_image(lineage, current_base):
            log.info("job %s ran on base %s, now %s: not committing", job_id, lineage, current_base)
            return None
        base = self._patiently(self._engine.inspect_image, lineage)
        now = self._clock.now()
        config = ImageConfig(
            env=scrubbed_env(base.env),
            # The image's own: the container ran the env helper's argv, and an
            # unnamed entrypoint would be copied from it (() names "none").
            cmd=base.cmd,
            entrypoint=base.entrypoint or (),
            labels={
                **dict.fromkeys(JOB_LABELS, ""),
                LABEL_ROLE: ROLE_SNAPSHOT,
                LABEL_PROJECT: spec.project,
                LABEL_WORK_ITEM: spec.work_item,
                LABEL_BASE_IMAGE_ID: lineage,
                LABEL_CREATED_AT: repr(now),
                LABEL_REPOSITORY: self._settings.snapshots.repository,
                LABEL_INSTANCE: self._settings.supervisor.instance_id,
            },
        )
        repository, tag = snapshot_image_name(
            self._settings.snapshots.repository, spec.project, spec.work_item
        )
        try:
            image_id = self._engine.commit_container(container_id, repository, tag, config)
        except EngineError:
            self._discard_failed_commit(config.labels)
            raise
        info = self._patiently(self._engine.inspect_image, image_id)
        if must_flatten(depth_above(info, base), self._settings.snapshots.max_layers, base.layers):
            info = self._flatten(info, base, repository, tag, config.labels)
        return Snapshot(
            key=spec.key,
            image_id=info.id,
            tag=f"{repository}:{tag}",
            base_image_id=lineage,
            created_at=now,
            last_used_at=now,
            size_bytes=info.size_bytes,
            layers=info.layers,
            own_bytes=self._own_bytes(info, base),
        )

    def _flatten(
        self,
        deep: ImageInfo,
        base: ImageInfo,
        repository: str,
        tag: str,
        labels: Mapping[str, str],
    ) -> ImageInfo:
        """Squash a commit that reached the layer cap into one layer on the base.

        The run's state lives on in the flattened image; the deep commit is
        deleted. A flatten that fails leaves no image behind, as a failed
        commit does: the previous snapshot stays the key's entry.
        """
        began = self._clock.now()
        try:
            flat_id = self._patiently(self._engine.flatten_image, deep.id, base.id, repository, tag)
            flat = self._patiently(self._engine.inspect_image, flat_id)
        except EngineError:
            self._discard_failed_commit(labels)
            raise
        try:
            self._engine.remove_image(deep.id)
        except EngineError as exc:
            # Labelled as a snapshot and owned by no entry: the orphan sweep deletes it.
            log.warning("could not delete %s after flattening it: %s", deep.id, exc)
        log.info(
            "flattened %s (%d layers above the base) into %s in %.2fs",
            deep.id,
            depth_above(deep, base),
            flat.id,
            self._clock.now() - began,
        )
        return flat

    def _own_bytes(self, info: ImageInfo, base: ImageInfo) -> int | None:
        """Bytes the snapshot adds over its parent (the base, for a flattened one)."""
        if not info.parent_id or same_image(info.parent_id, base.id):
            return own_bytes(info, base)
        try:
            return own_bytes(info, self._patiently(self._engine.inspect_image, info.parent_id))
        except EngineError as exc:
            log.warning("size of %s over its parent unknown: %s", info.id, exc)
            return None

    def _discard_failed_commit(self, labels: Mapping[str, str]) -> None:
        """Delete the image a failed commit may have left behind.

        Docker 20.10 creates the image before it links its parent; when the
        parent was just deleted it answers 500 "unknown parent image ID" and
        the new image stays, its ID unknown to us. Its labels (our repository
        and this commit's own created-at) find it.
        """
        wanted = {k: labels[k] for k in (LABEL_ROLE, LABEL_REPOSITORY, LABEL_CREATED_AT)}
        try:
            leftovers = self._engine.list_images(wanted)
        except EngineError as exc:
            log.warning("could not look for a failed commit's image (the sweep will): %s", exc)
            return
        for info in leftovers:
            if info.labels.get(LABEL_PROJECT) != labels[LABEL_PROJECT]:
                continue
            if info.labels.get(LABEL_WORK_ITEM) != labels[LABEL_WORK_ITEM]:
                continue
            log.info("deleting image %s left by a failed commit", info.id)
            with contextlib.suppress(EngineError):
                self._engine.remove_image(info.id, force=True)


def scrubbed_env(base_env: tuple[str, ...]) -> list[str]:
    """The base image's env, plus ``KEY=`` for each of Snapyard's container env keys.

    Docker fills a commit's env from the container for every key the
    override does not name, so Snapyard's own keys (the job ID...) must be
    named to stay out. The job's env is never in the container's config (it
    travels by file), so its names are not written either: a snapshot's env
    is the base image's (regression: ``MYVAR=`` appeared in every snapshot,
    and the next job of the key saw ``MYVAR`` set).
    """
    env = list(base_env)
    defined = {entry.split("=", 1)[0] for entry in base_env}
    for key in CONTAINER_ENV:
        if key not in defined:
            env.append(f"{key}=")
            defined.add(key)
    return env
