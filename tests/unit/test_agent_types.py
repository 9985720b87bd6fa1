"""Per agent type: each its own image, limits and lineage (issue 13).

Real actors on MemoryEngine: which base a job gets, what its container is
limited to, and what its commit records, when two agent types share one
(project, work item) key but not one image.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pykka
import pytest
from actor_kit import BASE_TAG, MemoryRig, make_rig, spawn_settings

from actors.engine.base import ContainerSpec
from actors.lineage import BaseImages, start_image
from actors.messages import Started
from actors.model import JobSpec, Snapshot, SnapshotKey
from actors.settings import AgentTypeSettings, Settings, SettingsError, auto_cpus, load_settings

REVIEW_TAG = "acme/review-agent:3"
CODER = JobSpec(project="acme", work_item="PR-12", agent_type="coder", command=("make",))
REVIEWER = JobSpec(project="acme", work_item="PR-12", agent_type="review", command=("review",))


def two_type_settings() -> Settings:
    return spawn_settings(
        worker={"cpus": 1.5},
        agent_types={
            "review": AgentTypeSettings(image=REVIEW_TAG, memory_mb=64, cpus=0.5, pids_limit=32)
        },
    )


@pytest.fixture
def rig() -> Iterator[MemoryRig]:
    rig = make_rig(two_type_settings())
    rig.engine.add_image(REVIEW_TAG, entrypoint=("/review",), cmd=("--all",), env=("PATH=/bin",))
    rig.start()
    yield rig
    pykka.ActorRegistry.stop_all()


def review_id(rig: MemoryRig) -> str:
    return rig.engine.inspect_image(REVIEW_TAG).id


def created(rig: MemoryRig) -> list[ContainerSpec]:
    return [args[0] for args in rig.engine.calls_of("create_container")]  # type: ignore[misc]


# --- settings ---------------------------------------------------------------------


def test_an_agent_type_overrides_image_and_limits_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        "[worker]\nmemory_mb = 512\ncpus = 2.0\n"
        '[agent_types.review]\nimage = "acme/review:1"\nmemory_mb = 2048\ncpus = 1.5\n',
        encoding="utf-8",
    )
    settings = load_settings(path, env={"SNAPYARD_AGENT_TYPES__review__PIDS_LIMIT": "99"})
    review = settings.worker_for("review")
    assert (review.image, review.memory_mb, review.cpus, review.pids_limit) == (
        "acme/review:1",
        2048,
        1.5,
        99,
    )
    assert review.network == settings.worker.network  # not overridable: [worker]'s
    other = settings.worker_for("coder")
    assert (other.image, other.memory_mb, other.cpus) == (settings.worker.image, 512, 2.0)
    assert settings.worker_images() == (settings.worker.image, "acme/review:1")


def test_a_bad_agent_type_value_names_its_key(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("[agent_types.review]\ncpus = -1\n", encoding="utf-8")
    with pytest.raises(SettingsError, match=r"agent_types\.review\.cpus"):
        load_settings(path, env={})


def test_cpus_zero_means_one_core_less_than_the_host_at_least_one() -> None:
    assert auto_cpus(1) == 1.0
    assert auto_cpus(2) == 1.0
    assert auto_cpus(16) == 15.0
    settings = spawn_settings()
    assert settings.worker.cpus == 0.0
    assert settings.worker_for("any").cpus == auto_cpus()


# --- the pure rules -----------------------------------------------------------------


def _snapshot(base_id: str) -> Snapshot:
    return Snapshot(
        key=SnapshotKey("p", "w"),
        image_id="sha256:" + "5" * 64,
        tag="s:1",
        base_image_id=base_id,
        created_at=0.0,
        last_used_at=0.0,
        size_bytes=1,
        layers=4,
    )


def test_a_job_starts_from_its_snapshot_only_if_it_grew_from_its_own_base() -> None:
    mine, foreign = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    own = start_image(_snapshot(mine), "me/agent:1", mine)
    assert (own.image, own.from_snapshot) == ("sha256:" + "5" * 64, True)
    other = start_image(_snapshot(foreign), "me/agent:1", mine)
    assert (other.image, other.base_image_id, other.snapshot) == ("me/agent:1", mine, None)
    assert start_image(None, "me/agent:1", mine).image == "me/agent:1"


def test_a_base_is_old_only_once_every_configured_image_is_known() -> None:
    bases = BaseImages(["w:1", "r:1"])
    assert bases.set("w:1", "sha256:" + "1" * 64)
    assert not bases.is_old("sha256:" + "9" * 64)  # r:1 unknown: could be its
    bases.set("r:1", "sha256:" + "2" * 64)
    assert bases.is_old("sha256:" + "9" * 64)
    assert not bases.is_old("sha256:" + "2" * 64)
    assert not bases.set("r:1", "sha256:" + "2" * 64)  # unchanged


# --- actors on MemoryEngine ---------------------------------------------------------


def test_each_agent_type_gets_its_image_and_limits(rig: MemoryRig) -> None:
    rig.run("job-c", CODER)
    rig.run("job-r", REVIEWER)
    coder, reviewer = created(rig)
    assert coder.image == BASE_TAG
    assert (coder.memory_bytes, coder.cpus) == (rig.settings.worker.memory_mb * 2**20, 1.5)
    assert reviewer.image == REVIEW_TAG
    assert (reviewer.memory_bytes, reviewer.cpus, reviewer.pids_limit) == (64 * 2**20, 0.5, 32)
    # The engine keeps what it was asked for: the NanoCPUs Docker gets.
    records = rig.engine.containers() or []
    assert all(record.spec.cpus for record in records)


def test_a_key_whose_snapshot_grew_from_another_image_starts_from_its_own_base(
    rig: MemoryRig,
) -> None:
    """Regression guard: one key, two agent types; the coder's snapshot is not the reviewer's."""
    _, coder_done = rig.run("job-1", CODER)
    coder_snapshot = coder_done.snapshot_image_id
    assert coder_snapshot is not None

    started, review_done = rig.run("job-2", REVIEWER)
    assert isinstance(started, Started)
    assert started.from_snapshot is False
    assert started.image_id == review_id(rig)
    assert created(rig)[-1].image == REVIEW_TAG
    # The reviewer's clean run is the key's snapshot now, recorded on its lineage.
    (entry,) = rig.snapshots()
    assert entry.image_id == review_done.snapshot_image_id
    assert entry.base_image_id == review_id(rig)
    # ...and looks like the reviewer's image, not the helper nor the job's command.
    info = rig.engine.inspect_image(entry.image_id)
    assert (info.entrypoint, info.cmd) == (("/review",), ("--all",))

    started, _ = rig.run("job-3", REVIEWER)
    assert started.from_snapshot is True
    assert started.image_id == entry.image_id
    started, _ = rig.run("job-4", CODER)
    assert started.from_snapshot is False  # the coder's lineage was replaced, not borrowed
    assert created(rig)[-1].image == BASE_TAG


def test_two_agent_types_snapshots_both_survive_a_manager_restart(rig: MemoryRig) -> None:
    """Both bases are configured: neither lineage is "an old base" to the manager."""
    rig.run("job-1", CODER)
    rig.run("job-2", REVIEWER.__class__(project="acme", work_item="other", agent_type="review"))
    rig.restart_manager()
    rig.sweep()
    assert {s.key.work_item for s in rig.snapshots()} == {"PR-12", "other"}


def test_a_snapshot_of_an_image_with_only_cmd_gets_no_entrypoint(rig: MemoryRig) -> None:
    rig.engine.add_image("acme/cmd-only:1", cmd=("agent", "--serve"), env=("PATH=/bin",))
    settings = rig.settings.replace(
        agent_types={"plain": AgentTypeSettings(image="acme/cmd-only:1")}
    )
    pykka.ActorRegistry.stop_all()
    other = MemoryRig(engine=rig.engine, clock=rig.clock, settings=settings, base_id=rig.base_id)
    other.start()
    _, done = other.run("job-1", JobSpec(project="p", work_item="w", agent_type="plain"))
    assert done.snapshot_image_id is not None
    info = rig.engine.inspect_image(done.snapshot_image_id)
    assert (tuple(info.entrypoint or ()), info.cmd) == ((), ("agent", "--serve"))
