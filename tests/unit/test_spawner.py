"""Spawner rules, one test each: real actors on MemoryEngine and FakeClock.

The first group reproduces the incident of seed PR 1054 (a registry entry
pointing at a deleted snapshot image) and its test plan; the rest pin the
container contract, commits without secrets, cleanup and retries.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pykka
import pytest
from actor_kit import BASE_TAG, KIT_INSTANCE, Collector, MemoryRig, make_rig, spawn_settings

from actors import spawner as spawner_module
from actors.engine.base import ContainerSpec, EngineError, EngineUnavailable, ImageMissing
from actors.engine.memory import MemoryContainer
from actors.labels import (
    LABEL_AGENT_TYPE,
    LABEL_ATTEMPT,
    LABEL_BASE_IMAGE_ID,
    LABEL_CREATED_AT,
    LABEL_IMAGE_SOURCE,
    LABEL_INSTANCE,
    LABEL_JOB_ID,
    LABEL_MANAGED,
    LABEL_PROJECT,
    LABEL_ROLE,
    LABEL_SNAPSHOT_ENABLED,
    LABEL_WORK_ITEM,
    ROLE_SNAPSHOT,
)
from actors.messages import (
    ActorCrashed,
    Finished,
    Lookup,
    Spawn,
    SpawnFailed,
    Started,
    Terminate,
    Terminated,
)
from actors.model import JobSpec, SnapshotKey
from actors.pool import SpawnerPool
from actors.wiring import spawner_factory

SECRET = "s3cr3t-value-never-in-an-image"
SPEC = JobSpec(project="proj", work_item="item-1", agent_type="coder", env={"API_TOKEN": SECRET})
KEY = SPEC.key


@pytest.fixture
def rig() -> Iterator[MemoryRig]:
    rig = make_rig().start()
    yield rig
    pykka.ActorRegistry.stop_all()


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every capture_error call the Spawner makes."""
    calls: list[dict[str, Any]] = []

    def capture(error: BaseException, **kwargs: Any) -> None:
        calls.append({"error": error, **kwargs})

    monkeypatch.setattr(spawner_module, "capture_error", capture)
    return calls


def specs(rig: MemoryRig) -> list[ContainerSpec]:
    return [args[0] for args in rig.engine.calls_of("create_container")]  # type: ignore[misc]


def commit_snapshot(rig: MemoryRig, job_id: str = "job-0") -> str:
    """Run one clean job so the key has a snapshot; return its image ID."""
    _, finished = rig.run(job_id, SPEC)
    assert finished.snapshot_image_id is not None
    return finished.snapshot_image_id


# --- the incident: 404 on a snapshot image ------------------------------


def test_404_on_snapshot_invalidates_and_the_base_retry_succeeds(rig: MemoryRig) -> None:
    stale = commit_snapshot(rig)
    rig.engine.delete_image_behind_back(stale)
    rig.engine.calls.clear()
    started = rig.spawn("job-1", SPEC)
    assert isinstance(started, Started)
    assert [s.image for s in specs(rig)] == [stale, BASE_TAG]
    assert started.from_snapshot is False
    assert started.image_id == rig.base_id
    assert started.attempts == 2
    assert not any(rig.clock.slept)  # a fallback is not a backoff
    assert rig.metrics.value("snapyard_stale_snapshot_fallbacks_total") == 1
    assert rig.metrics.value("snapyard_spawn_failures_total") == 0
    assert rig.snapshots() == []  # invalidated
    assert rig.engine.inspect_container(started.container_id).status == "exited"


def test_fallback_preserves_snapshot_enabled_so_a_clean_exit_commits(rig: MemoryRig) -> None:
    stale = commit_snapshot(rig)
    rig.engine.delete_image_behind_back(stale)
    rig.engine.calls.clear()
    started, finished = rig.run("job-1", SPEC)
    fallback = specs(rig)[1]
    assert fallback.labels[LABEL_SNAPSHOT_ENABLED] == "true"
    assert fallback.labels[LABEL_IMAGE_SOURCE] == "base"
    assert fallback.auto_remove is False
    assert fallback.env["SNAPYARD_SNAPSHOT_REUSE"] == "0"
    assert fallback.memory_bytes == specs(rig)[0].memory_bytes
    assert fallback.secret_env == {"API_TOKEN": SECRET}
    assert finished.snapshot_image_id is not None
    assert [s.image_id for s in rig.snapshots()] == [finished.snapshot_image_id]
    assert started.container_id not in {c.id for c in rig.engine.list_containers({})}


def test_404_on_base_with_snapshots_off_fails_naming_the_image_without_retry(
    rig: MemoryRig, captured: list[dict[str, Any]]
) -> None:
    snap = commit_snapshot(rig)
    rig.engine.calls.clear()
    rig.engine.fail_next("create_container", error=ImageMissing(BASE_TAG))
    failed = rig.spawn("job-1", SPEC, snapshots=False)
    assert isinstance(failed, SpawnFailed)
    assert failed.retryable is False
    assert BASE_TAG in failed.error
    assert "make image" in failed.error
    assert "snapyard image build" in failed.error
    assert len(specs(rig)) == 1
    assert not any(rig.clock.slept)
    assert [s.image_id for s in rig.snapshots()] == [snap]  # no invalidation
    assert captured[-1]["source"] == "spawner"
    assert captured[-1]["extras"]["image"] == BASE_TAG


def test_missing_base_tag_fails_before_any_create(rig: MemoryRig) -> None:
    rig.engine.delete_image_behind_back(BASE_TAG)
    failed = rig.spawn("job-1", SPEC)
    assert isinstance(failed, SpawnFailed)
    assert not failed.retryable
    assert BASE_TAG in failed.error
    assert specs(rig) == []


def test_failed_fallback_is_captured_with_the_stale_image_and_no_env_value(
    rig: MemoryRig, captured: list[dict[str, Any]]
) -> None:
    stale = commit_snapshot(rig)
    rig.engine.delete_image_behind_back(stale)
    rig.engine.fail_next("create_container", times=2, error=ImageMissing("x"))
    failed = rig.spawn("job-1", SPEC)
    assert isinstance(failed, SpawnFailed)
    extras = captured[-1]["extras"]
    assert extras["stale_image_id"] == stale
    assert extras["job_id"] == "job-1"
    assert captured[-1]["job_type"] == "coder"
    assert SECRET not in repr(captured)
    assert rig.snapshots() == []


# --- images deleted at every step of a job ------------------------------


def test_image_deleted_between_lookup_and_create_still_starts_the_job(rig: MemoryRig) -> None:
    snap = commit_snapshot(rig)
    rig.engine.before("create_container", lambda: rig.engine.delete_image_behind_back(snap))
    started, finished = rig.run("job-1", SPEC)
    assert started.from_snapshot is False
    assert finished.snapshot_image_id is not None
    rig.sweep()
    assert [s.image_id for s in rig.snapshots()] == [finished.snapshot_image_id]
    assert finished.snapshot_image_id in rig.image_ids()


def test_image_deleted_between_create_and_start_still_starts_the_job(rig: MemoryRig) -> None:
    snap = commit_snapshot(rig)
    rig.engine.before("start_container", lambda: rig.engine.delete_image_behind_back(snap))
    started = rig.spawn("job-1", SPEC)
    assert isinstance(started, Started)
    rig.sweep()
    assert all(s.image_id in rig.image_ids() for s in rig.snapshots())
    assert snap not in {s.image_id for s in rig.snapshots()}
    rig.finish("job-1", SPEC, started.container_id, 0)
    rig.sweep()
    assert all(s.image_id in rig.image_ids() for s in rig.snapshots())
    again = rig.spawn("job-2", SPEC)
    assert isinstance(again, Started)


def test_image_deleted_between_commit_and_register_never_leaves_a_dangling_entry(
    rig: MemoryRig,
) -> None:
    commit_snapshot(rig)

    def delete_new_snapshot() -> None:
        # Armed at commit: fires on the next inspect_image, the new image's.
        repo_tag = next(
            tag for info in rig.engine.list_images({LABEL_ROLE: "snapshot"}) for tag in info.tags
        )
        rig.engine.delete_image_behind_back(repo_tag)

    rig.engine.before(
        "commit_container", lambda: rig.engine.before("inspect_image", delete_new_snapshot)
    )
    started, finished = rig.run("job-1", SPEC)
    assert finished.exit_code == 0
    assert finished.snapshot_image_id is None
    assert finished.error is not None
    assert "snapshot" in finished.error
    assert started.container_id not in {c.id for c in rig.engine.list_containers({})}
    rig.sweep()
    assert all(s.image_id in rig.image_ids() for s in rig.snapshots())
    assert isinstance(rig.spawn("job-2", SPEC), Started)


def test_snapshot_deleted_after_register_is_dropped_by_the_next_sweep(rig: MemoryRig) -> None:
    snap = commit_snapshot(rig)
    rig.engine.delete_image_behind_back(snap)
    rig.sweep()
    assert rig.snapshots() == []
    started = rig.spawn("job-1", SPEC)
    assert isinstance(started, Started)
    assert started.attempts == 1


# --- the container contract ----------------------------------------------


def test_base_start_carries_the_label_env_and_limits_contract(rig: MemoryRig) -> None:
    started = rig.spawn("job-1", SPEC)
    assert isinstance(started, Started)
    assert started.image_id == rig.base_id
    assert started.spawner == "spawner-1"
    (spec,) = specs(rig)
    worker = rig.settings.worker
    assert spec.image == BASE_TAG
    assert tuple(spec.command or ()) == worker.command
    # The job's env travels apart from the container's config (which Docker
    # copies into every commit): only Snapyard's own variables are in it.
    assert spec.secret_env == {"API_TOKEN": SECRET}
    assert spec.env == {
        "SNAPYARD_JOB_ID": "job-1",
        "SNAPYARD_SNAPSHOT_REUSE": "0",
        "SNAPYARD_SETUP_SECONDS": "1",
    }
    assert spec.labels == {
        LABEL_INSTANCE: KIT_INSTANCE,
        LABEL_MANAGED: "true",
        LABEL_JOB_ID: "job-1",
        LABEL_ATTEMPT: "0",
        LABEL_PROJECT: "proj",
        LABEL_WORK_ITEM: "item-1",
        LABEL_AGENT_TYPE: "coder",
        LABEL_SNAPSHOT_ENABLED: "true",
        LABEL_IMAGE_SOURCE: "base",
        LABEL_BASE_IMAGE_ID: rig.base_id,
    }
    assert spec.memory_bytes == worker.memory_mb * 1024 * 1024
    assert spec.pids_limit == worker.pids_limit
    assert spec.network == worker.network
    assert spec.init is True
    assert spec.cap_drop_all is worker.drop_all_capabilities
    assert spec.no_new_privileges is True
    assert spec.auto_remove is False


def test_snapshot_start_uses_the_image_id_never_a_tag(rig: MemoryRig) -> None:
    snap = commit_snapshot(rig)
    rig.engine.calls.clear()
    started = rig.spawn(
        "job-1", SPEC.__class__(project="proj", work_item="item-1", command=("true",))
    )
    assert isinstance(started, Started)
    (spec,) = specs(rig)
    assert spec.image == snap
    assert started.image_id == snap
    assert started.from_snapshot is True
    assert spec.labels[LABEL_IMAGE_SOURCE] == "snapshot"
    assert spec.env["SNAPYARD_SNAPSHOT_REUSE"] == "1"
    assert tuple(spec.command or ()) == ("true",)


def test_snapshots_off_starts_from_base_even_with_a_snapshot(rig: MemoryRig) -> None:
    commit_snapshot(rig)
    rig.engine.calls.clear()
    started, _finished = rig.run("job-1", SPEC, snapshots=False)
    assert started.from_snapshot is False
    assert specs(rig)[0].labels[LABEL_SNAPSHOT_ENABLED] == "false"


# --- commits --------------------------------------------------------------


def test_env_values_are_not_in_the_committed_image_config(rig: MemoryRig) -> None:
    snap = commit_snapshot(rig)
    info = rig.engine.inspect_image(snap)
    assert SECRET not in repr(info.env)
    assert SECRET not in repr(info.container_env)  # Docker's ContainerConfig of the commit
    assert SECRET not in repr(dict(info.labels))
    # Not even its name: the job's env never reaches the container's config.
    assert not [entry for entry in info.env if entry.startswith("API_TOKEN")]
    assert "SNAPYARD_JOB_ID=" in info.env
    assert "PATH=/usr/local/bin:/bin" in info.env  # the base's own env survives
    assert info.cmd == ("sh", "-c", "echo job done")
    assert info.entrypoint == ("/usr/local/bin/snapyard-worker",)


def test_job_labels_are_dropped_from_the_snapshot(rig: MemoryRig) -> None:
    snap = commit_snapshot(rig)
    labels = rig.engine.inspect_image(snap).labels
    for name in (
        LABEL_MANAGED,
        LABEL_JOB_ID,
        LABEL_AGENT_TYPE,
        LABEL_SNAPSHOT_ENABLED,
        LABEL_IMAGE_SOURCE,
    ):
        assert labels.get(name, "") == ""
    assert labels[LABEL_ROLE] == "snapshot"
    assert labels[LABEL_PROJECT] == "proj"
    assert labels[LABEL_WORK_ITEM] == "item-1"
    assert labels[LABEL_BASE_IMAGE_ID] == rig.base_id
    assert float(labels[LABEL_CREATED_AT]) == rig.clock.now()


def test_snapshot_is_named_from_the_key(rig: MemoryRig) -> None:
    from actors.naming import snapshot_image_name

    snap = commit_snapshot(rig)
    repo, tag = snapshot_image_name(rig.settings.snapshots.repository, "proj", "item-1")
    assert rig.engine.inspect_image(snap).tags == (f"{repo}:{tag}",)
    assert rig.snapshots()[0].tag == f"{repo}:{tag}"


def test_nonzero_exit_never_commits_and_the_container_is_removed(rig: MemoryRig) -> None:
    _started, finished = rig.run("job-1", SPEC, exit_code=1)
    assert finished.snapshot_image_id is None
    assert finished.error is None
    assert rig.engine.calls_of("commit_container") == []
    assert rig.engine.list_containers({}) == []
    assert rig.snapshots() == []


def test_failed_commit_is_reported_and_the_container_still_removed(rig: MemoryRig) -> None:
    started = rig.spawn("job-1", SPEC)
    assert isinstance(started, Started)
    rig.engine.fail_next("commit_container", error=EngineError("disk full"))
    finished = rig.finish("job-1", SPEC, started.container_id, 0)
    assert finished.snapshot_image_id is None
    assert finished.error is not None
    assert "disk full" in finished.error
    assert rig.engine.list_containers({}) == []


def test_a_commit_that_fails_after_docker_created_the_image_leaves_no_image(rig: MemoryRig) -> None:
    """Found by the real-engine property test: Docker 20.10 creates the image,
    then fails to link its just-deleted parent (500 "unknown parent image ID"),
    and the labelled image stayed behind with its ID unknown."""
    started = rig.spawn("job-1", SPEC)
    assert isinstance(started, Started)
    real_commit = rig.engine.commit_container

    def commit_then_fail(*args: Any) -> str:
        real_commit(*args)
        raise EngineUnavailable("unknown parent image ID sha256:" + "a" * 64)

    rig.engine.commit_container = commit_then_fail  # type: ignore[method-assign]
    finished = rig.finish("job-1", SPEC, started.container_id, 0)
    assert finished.snapshot_image_id is None
    assert finished.error is not None
    assert "unknown parent image ID" in finished.error
    assert rig.engine.list_images({LABEL_ROLE: "snapshot"}) == []
    assert rig.engine.list_containers({}) == []


def test_logs_tail_is_returned_with_stdout_and_stderr() -> None:
    rig = make_rig(exit_code=None).start()
    try:
        started = rig.spawn("job-1", SPEC)
        assert isinstance(started, Started)
        rig.engine.append_logs(started.container_id, stdout="out line\n", stderr="err line\n")
        rig.engine.exit_container(started.container_id, 0)
        finished = rig.finish("job-1", SPEC, started.container_id, 0)
        assert "out line" in finished.logs_tail
        assert "err line" in finished.logs_tail
    finally:
        pykka.ActorRegistry.stop_all()


def test_a_job_that_prints_its_secret_has_it_masked_in_its_logs() -> None:
    """Regression: a job echoing its token had it stored and served by /jobs/ID/logs."""
    rig = make_rig(exit_code=None).start()
    try:
        started = rig.spawn("job-1", SPEC)
        assert isinstance(started, Started)
        rig.engine.print_output(
            started.container_id,
            ("stdout", f"calling api with {SECRET}\n"),
            ("stderr", f"401 for token {SECRET[:-1]}?\n"),  # a prefix is not the secret
        )
        rig.engine.exit_container(started.container_id, 0)
        finished = rig.finish("job-1", SPEC, started.container_id, 0)
        assert finished.logs_tail.splitlines() == [
            "calling api with ***",
            f"401 for token {SECRET[:-1]}?",
        ]
    finally:
        pykka.ActorRegistry.stop_all()


# --- failures, retries and cleanup ----------------------------------------


def test_start_failure_after_create_removes_the_container(rig: MemoryRig) -> None:
    rig.engine.fail_next("start_container", error=EngineError("OCI runtime create failed"))
    failed = rig.spawn("job-1", SPEC)
    assert isinstance(failed, SpawnFailed)
    assert failed.retryable is False
    assert rig.engine.list_containers({}) == []
    assert "remove_container" in [name for name, _ in rig.engine.calls]


def test_engine_unavailable_for_the_first_calls_then_success(rig: MemoryRig) -> None:
    rig.engine.fail_next("create_container", times=3)
    started = rig.spawn("job-1", SPEC)
    assert isinstance(started, Started)
    assert started.attempts == 4
    assert len(rig.clock.slept) == 3
    assert all(0 <= s <= rig.settings.retry.backoff_max_s for s in rig.clock.slept)


def test_unavailable_start_retries_without_leaking_containers(rig: MemoryRig) -> None:
    rig.engine.fail_next("start_container", times=2)
    started = rig.spawn("job-1", SPEC)
    assert isinstance(started, Started)
    assert [c.id for c in rig.engine.list_containers({})] == [started.container_id]


def test_exhausted_retries_reply_retryable_spawn_failed(rig: MemoryRig) -> None:
    attempts = rig.settings.retry.attempts
    rig.engine.fail_next("create_container", times=attempts)
    failed = rig.spawn("job-1", SPEC)
    assert isinstance(failed, SpawnFailed)
    assert failed.retryable is True
    assert len(specs(rig)) == attempts
    assert len(rig.clock.slept) == attempts - 1
    # The Spawner is still serving.
    assert isinstance(rig.spawn("job-2", SPEC), Started)


def test_stale_snapshot_falls_back_even_with_a_single_attempt() -> None:
    rig = make_rig(spawn_settings(retry={"attempts": 1})).start()
    try:
        stale = commit_snapshot(rig)
        rig.engine.delete_image_behind_back(stale)
        started = rig.spawn("job-1", SPEC)
        assert isinstance(started, Started)
        assert started.from_snapshot is False
    finally:
        pykka.ActorRegistry.stop_all()


def test_base_image_rebuilt_invalidates_older_snapshots(rig: MemoryRig) -> None:
    old = commit_snapshot(rig)
    new_base = rig.engine.add_image(BASE_TAG, labels={LABEL_ROLE: "base"})
    rig.engine.calls.clear()
    started, _finished = rig.run("job-1", SPEC)
    assert started.from_snapshot is False
    assert started.image_id == new_base
    assert specs(rig)[0].labels[LABEL_BASE_IMAGE_ID] == new_base
    assert old not in rig.image_ids()
    assert [s.base_image_id for s in rig.snapshots()] == [new_base]


LOG = "/workspace/log"


def append_a_line(rig: MemoryRig) -> None:
    """Each run appends a line to /workspace/log, as a job growing its workspace does."""

    def policy(container: MemoryContainer) -> int:
        rig.engine.write_file(container.id, LOG, container.files.get(LOG, "") + "run\n")
        return 0

    rig.engine.exit_policy = policy


def test_at_the_layer_cap_the_commit_is_flattened_and_the_state_kept() -> None:
    """Regression (issue 11, item 2): at snapshots.max_layers the next run started
    from the base image, with an empty workspace."""
    rig = make_rig(spawn_settings(snapshots={"max_layers": 3})).start()
    try:
        append_a_line(rig)
        base_layers = rig.engine.inspect_image(rig.base_id).layers
        sources, depths = [], []
        for n in range(7):
            started, finished = rig.run(f"job-{n}", SPEC)
            assert finished.error is None
            sources.append(started.from_snapshot)
            (snap,) = rig.snapshots()
            depths.append(snap.layers - base_layers)
            assert rig.engine.image_files(snap.image_id)[LOG] == "run\n" * (n + 1)
        assert sources == [False] + [True] * 6
        # 1, 2, then the commit at depth 3 = cap is flattened to 1.
        assert depths == [1, 2, 1, 2, 1, 2, 1]
        assert len(rig.engine.calls_of("flatten_image")) == 3
    finally:
        pykka.ActorRegistry.stop_all()


def test_a_flattened_snapshot_keeps_its_config_and_lineage() -> None:
    rig = make_rig(spawn_settings(snapshots={"max_layers": 2})).start()
    try:
        rig.run("job-1", SPEC)
        _started, finished = rig.run("job-2", SPEC)
        assert finished.snapshot_image_id is not None
        (snap,) = rig.snapshots()
        assert snap.image_id == finished.snapshot_image_id
        flat = rig.engine.inspect_image(snap.image_id)
        base = rig.engine.inspect_image(rig.base_id)
        assert flat.layers == base.layers + 1
        assert flat.entrypoint == base.entrypoint
        assert flat.labels[LABEL_BASE_IMAGE_ID] == rig.base_id
        assert flat.labels[LABEL_ROLE] == ROLE_SNAPSHOT
        assert f"API_TOKEN={SECRET}" not in flat.env
        assert snap.tag in flat.tags
        assert snap.own_bytes is not None
        assert snap.own_bytes == flat.size_bytes - base.size_bytes
    finally:
        pykka.ActorRegistry.stop_all()


def test_a_flatten_that_fails_leaves_no_image_and_the_previous_snapshot() -> None:
    rig = make_rig(spawn_settings(snapshots={"max_layers": 2})).start()
    try:
        _started, first = rig.run("job-1", SPEC)
        rig.engine.fail_next("flatten_image", error=EngineError("no space left on device"))
        started, finished = rig.run("job-2", SPEC)
        assert started.from_snapshot
        assert finished.snapshot_image_id is None
        assert finished.error is not None
        assert "no space left on device" in finished.error
        assert [s.image_id for s in rig.snapshots()] == [first.snapshot_image_id]
        leftovers = rig.engine.list_images({LABEL_ROLE: ROLE_SNAPSHOT})
        assert [i.id for i in leftovers] == [first.snapshot_image_id]
        # The next run starts from the previous snapshot and flattens as it should.
        started, finished = rig.run("job-3", SPEC)
        assert started.image_id == first.snapshot_image_id
        assert finished.error is None
    finally:
        pykka.ActorRegistry.stop_all()


def test_300_runs_of_one_work_item_in_a_row_keep_working() -> None:
    rig = make_rig().start()
    try:
        for n in range(300):
            rig.clock.advance(1)
            _started, finished = rig.run(f"job-{n}", SPEC)
            assert finished.snapshot_image_id is not None, n
        rig.sweep()
        (snap,) = rig.snapshots()
        assert snap.image_id == finished.snapshot_image_id
        base_layers = rig.engine.inspect_image(rig.base_id).layers
        assert snap.layers - base_layers < rig.settings.snapshots.max_layers
        # Replaced chains are pruned, not leaked: at most one chain of layers is left.
        snapshot_images = [
            i for i in rig.engine.list_images({LABEL_ROLE: "snapshot"}) if i.id != snap.image_id
        ]
        assert snapshot_images == []
        assert rig.engine.list_containers({}) == []
    finally:
        pykka.ActorRegistry.stop_all()


# --- terminate, crashes, pool --------------------------------------------


def test_terminate_stops_the_container_and_replies() -> None:
    rig = make_rig(exit_code=None).start()
    try:
        started = rig.spawn("job-1", SPEC)
        assert isinstance(started, Started)
        assert rig.spawner is not None
        assert rig.collector is not None
        rig.spawner.tell(Terminate("job-1", started.container_id, 5.0, rig.collector))
        assert rig.reply() == Terminated("job-1", started.container_id, "spawner-1")
        assert rig.engine.inspect_container(started.container_id).status == "exited"
    finally:
        pykka.ActorRegistry.stop_all()


def test_terminate_of_a_missing_container_is_fine(rig: MemoryRig) -> None:
    assert rig.spawner is not None
    assert rig.collector is not None
    rig.spawner.tell(Terminate("job-1", "no-such-container", 5.0, rig.collector))
    assert isinstance(rig.reply(), Terminated)


def test_a_bug_crashes_the_spawner_and_tells_its_parent(rig: MemoryRig) -> None:
    assert rig.spawner is not None
    assert rig.collector is not None

    def bug() -> None:
        raise RuntimeError("a bug, not an engine error")

    rig.engine.before("create_container", bug)
    rig.spawner.tell(Spawn("job-9", SPEC, True, rig.collector))
    crashed = rig.reply()
    assert isinstance(crashed, ActorCrashed)
    assert crashed.name == "spawner-1"
    assert crashed.job_id == "job-9"
    assert "a bug" in crashed.error


def test_dead_snapshot_manager_degrades_to_base_starts(rig: MemoryRig) -> None:
    assert rig.manager is not None
    rig.manager.stop()
    started = rig.spawn("job-1", SPEC)
    assert isinstance(started, Started)
    assert started.from_snapshot is False
    finished = rig.finish("job-1", SPEC, started.container_id, 0)
    assert isinstance(finished, Finished)


def test_the_pool_starts_named_spawners(rig: MemoryRig) -> None:
    assert rig.manager is not None
    assert rig.collector is not None
    pool = SpawnerPool(spawner_factory(rig.engine, rig.manager, rig.settings, rig.clock), 3)
    pool.start(rig.collector)
    names = [ref.proxy().name.get() for ref in pool.refs.values()]
    assert names == ["spawner-1", "spawner-2", "spawner-3"]


def test_one_key_per_snapshot_even_with_many_keys(rig: MemoryRig) -> None:
    for n in range(5):
        spec = JobSpec(project="proj", work_item=f"item-{n}")
        rig.run(f"job-{n}", spec)
    assert {s.key for s in rig.snapshots()} == {SnapshotKey("proj", f"item-{n}") for n in range(5)}


class _FailingManager(pykka.ThreadingActor):
    """Answers every Lookup with an error (and ignores the rest)."""

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Lookup):
            raise RuntimeError("snapshot manager bug")
        return None


def test_a_failing_lookup_is_a_miss_and_the_spawner_lives_on() -> None:
    """Found in review: only a dead or silent manager was a miss; an error crashed the Spawner."""
    rig = make_rig()
    rig.manager = _FailingManager.start()
    rig.collector = Collector.start(rig.inbox)
    factory = spawner_factory(rig.engine, rig.manager, rig.settings, rig.clock)
    rig.spawner = factory("spawner-1", rig.collector)
    try:
        started = rig.spawn("job-1", SPEC)
        assert isinstance(started, Started)
        assert not started.from_snapshot
        assert rig.spawner.is_alive()
    finally:
        pykka.ActorRegistry.stop_all()


def test_a_start_that_timed_out_is_discarded_through_a_blip_before_the_retry(
    rig: MemoryRig,
) -> None:
    """From review: the start may have run the container although it timed out;
    a single failed removal left it running beside the retry's container."""
    rig.engine.fail_next("start_container", error=EngineUnavailable("read timed out"))
    rig.engine.fail_next("remove_container", error=EngineUnavailable("read timed out"))
    started = rig.spawn("job-1", SPEC)
    assert isinstance(started, Started)
    assert [c.id for c in rig.engine.list_containers({})] == [started.container_id]


def test_a_create_whose_reply_was_lost_leaves_no_second_container(
    rig: MemoryRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine made the container, then the connection dropped before its reply
    (the bench's outage relay does this): the retry must not leak the first one."""
    real_create = rig.engine.create_container
    lost: list[str] = []

    def create_then_drop_the_reply(spec: ContainerSpec) -> str:
        container_id = real_create(spec)
        if not lost:
            lost.append(container_id)
            raise EngineUnavailable("the connection dropped before the reply")
        return container_id

    monkeypatch.setattr(rig.engine, "create_container", create_then_drop_the_reply)
    started = rig.spawn("job-1", SPEC)
    assert isinstance(started, Started)
    assert started.attempts == 2
    left = rig.engine.list_containers({LABEL_JOB_ID: "job-1"})
    assert [c.id for c in left] == [started.container_id]
    assert lost[0] != started.container_id
