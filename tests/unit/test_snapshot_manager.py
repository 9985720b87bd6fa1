"""SnapshotManager rules, one test each, on MemoryEngine and FakeClock."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pykka
import pytest
from actor_kit import MemoryRig, make_rig, spawn_settings

from actors.engine.base import EngineUnavailable
from actors.labels import LABEL_ROLE
from actors.messages import ImageDeleted, Invalidate, RemoveSnapshot, SetBaseImage, SweepSnapshots
from actors.model import JobSpec, SnapshotKey
from actors.settings import ProjectSettings
from actors.snapshot_manager import SnapshotManager
from actors.store import SqliteStore

KEY = SnapshotKey("proj", "item-1")
OTHER = SnapshotKey("proj", "item-2")


@pytest.fixture
def rig() -> Iterator[MemoryRig]:
    rig = make_rig().start(spawners=0)
    yield rig
    pykka.ActorRegistry.stop_all()


def test_lookup_hits_a_registered_snapshot_and_refreshes_last_used(rig: MemoryRig) -> None:
    snap = rig.add_snapshot(KEY)
    rig.register(snap)
    rig.clock.advance(60)
    found = rig.lookup(KEY)
    assert found is not None
    assert found.image_id == snap.image_id
    assert found.last_used_at == rig.clock.now()
    assert rig.lookup(OTHER) is None
    assert rig.metrics.value("snapyard_snapshot_hits_total") == 1
    assert rig.metrics.value("snapyard_snapshot_misses_total") == 1


def test_register_replaces_the_entry_and_deletes_the_previous_image(rig: MemoryRig) -> None:
    old = rig.add_snapshot(KEY)
    rig.register(old)
    rig.clock.advance(10)
    new = rig.add_snapshot(KEY)
    rig.register(new)
    assert [s.image_id for s in rig.snapshots()] == [new.image_id]
    assert old.image_id not in rig.image_ids()
    assert new.image_id in rig.image_ids()


def test_register_of_an_older_snapshot_does_not_replace_a_newer_one(rig: MemoryRig) -> None:
    older = rig.add_snapshot(KEY, created_at=rig.clock.now())
    newer = rig.add_snapshot(KEY, created_at=rig.clock.now() + 10)
    rig.register(newer)
    rig.register(older)
    assert [s.image_id for s in rig.snapshots()] == [newer.image_id]
    # The loser is nobody's snapshot: it is deleted, not leaked.
    assert older.image_id not in rig.image_ids()


def test_late_invalidate_with_an_old_image_id_leaves_the_newer_snapshot(rig: MemoryRig) -> None:
    old = rig.add_snapshot(KEY)
    rig.register(old)
    rig.clock.advance(10)
    new = rig.add_snapshot(KEY)
    rig.register(new)
    rig.ask(Invalidate(KEY, old.image_id, "404 from a slow spawner"))
    assert [s.image_id for s in rig.snapshots()] == [new.image_id]


def test_invalidate_drops_the_entry_and_is_idempotent(rig: MemoryRig) -> None:
    snap = rig.add_snapshot(KEY)
    rig.register(snap)
    rig.ask(Invalidate(KEY, snap.image_id, "404"))
    rig.ask(Invalidate(KEY, snap.image_id, "404"))
    assert rig.snapshots() == []
    assert rig.lookup(KEY) is None


def test_register_ignores_an_image_already_reported_deleted(rig: MemoryRig) -> None:
    snap = rig.add_snapshot(KEY)
    rig.ask(ImageDeleted(snap.image_id))
    rig.register(snap)
    assert rig.snapshots() == []


def test_image_deleted_drops_the_entry_whatever_the_id_spelling(rig: MemoryRig) -> None:
    snap = rig.add_snapshot(KEY)
    rig.register(snap)
    rig.ask(ImageDeleted(snap.image_id.removeprefix("sha256:")))
    assert rig.snapshots() == []


def test_ttl_expiry_evicts_and_deletes_the_image(rig: MemoryRig) -> None:
    snap = rig.add_snapshot(KEY)
    rig.register(snap)
    rig.clock.advance(rig.settings.snapshots.ttl_s + 1)
    rig.sweep()
    assert rig.snapshots() == []
    assert snap.image_id not in rig.image_ids()
    assert rig.metrics.value("snapyard_snapshot_evictions_total") == 1
    assert rig.metrics.value("snapyard_snapshots") == 0


def test_expired_snapshot_is_a_miss_on_lookup_and_its_image_is_deleted(rig: MemoryRig) -> None:
    snap = rig.add_snapshot(KEY)
    rig.register(snap)
    rig.clock.advance(rig.settings.snapshots.ttl_s + 1)
    assert rig.lookup(KEY) is None
    rig.snapshots()  # the deletion is queued behind the reply; this waits for it
    assert snap.image_id not in rig.image_ids()


def test_per_project_ttl_applies_in_lookups_and_sweeps() -> None:
    settings = spawn_settings(projects={"short": ProjectSettings(ttl_s=60.0)})
    rig = make_rig(settings).start(spawners=0)
    try:
        short_a = rig.add_snapshot(SnapshotKey("short", "a"))
        short_b = rig.add_snapshot(SnapshotKey("short", "b"))
        long = rig.add_snapshot(SnapshotKey("long", "a"))
        for snap in (short_a, short_b, long):
            rig.register(snap)
        rig.clock.advance(61)
        assert rig.lookup(short_a.key) is None
        rig.sweep()
        assert [s.key for s in rig.snapshots()] == [long.key]
        assert rig.lookup(long.key) is not None
        assert short_a.image_id not in rig.image_ids()
        assert short_b.image_id not in rig.image_ids()
    finally:
        pykka.ActorRegistry.stop_all()


def test_max_count_evicts_the_least_recently_used_and_deletes_it() -> None:
    rig = make_rig(spawn_settings(snapshots={"max_count": 2})).start(spawners=0)
    try:
        a = rig.add_snapshot(SnapshotKey("p", "a"))
        b = rig.add_snapshot(SnapshotKey("p", "b"))
        rig.register(a)
        rig.register(b)
        rig.clock.advance(5)
        assert rig.lookup(a.key) is not None  # b is now the least recently used
        rig.clock.advance(5)
        c = rig.add_snapshot(SnapshotKey("p", "c"))
        rig.register(c)  # a sweep runs after each Register
        assert {s.key for s in rig.snapshots()} == {a.key, c.key}
        assert b.image_id not in rig.image_ids()
    finally:
        pykka.ActorRegistry.stop_all()


def test_lru_order_survives_a_restart(tmp_path: Path) -> None:
    """Regression (issue 11, item 8): use A, use B, restart, use nothing, evict
    by count: A (the least recently used) must go, not the older commit B."""
    with SqliteStore(tmp_path / "jobs.db") as store:
        rig = make_rig(spawn_settings(snapshots={"max_count": 2}))
        rig.usage = store
        rig.start(spawners=0)
        try:
            b = rig.add_snapshot(SnapshotKey("p", "b"))  # committed first
            rig.clock.advance(1)
            a = rig.add_snapshot(SnapshotKey("p", "a"))
            rig.restart_manager()  # adopts both from their labels
            rig.clock.advance(5)
            assert rig.lookup(a.key) is not None
            rig.clock.advance(5)
            assert rig.lookup(b.key) is not None
            rig.restart_manager()  # stopping writes the uses; the rebuild reads them
            rig.clock.advance(5)
            c = rig.add_snapshot(SnapshotKey("p", "c"))
            rig.register(c)  # over max_count: the least recently used goes
            assert {s.key for s in rig.snapshots()} == {b.key, c.key}
            assert a.image_id not in rig.image_ids()
        finally:
            pykka.ActorRegistry.stop_all()


def test_snapshot_uses_are_written_in_one_batch_per_sweep(tmp_path: Path) -> None:
    """Lookups are hot: nothing reaches the store until the sweep (or stop)."""
    with SqliteStore(tmp_path / "jobs.db") as store:
        rig = make_rig(spawn_settings())
        rig.usage = store
        rig.start(spawners=0)
        try:
            a = rig.add_snapshot(KEY)
            rig.register(a)
            rig.clock.advance(3)
            for _ in range(3):
                assert rig.lookup(KEY) is not None
            assert store.load_usage() == {}
            rig.sweep()
            assert store.load_usage() == {("proj", "item-1", a.image_id): rig.clock.now()}
        finally:
            pykka.ActorRegistry.stop_all()


def test_max_total_bytes_evicts_least_recently_used_until_it_fits() -> None:
    rig = make_rig(spawn_settings(snapshots={"max_total_bytes": 2500})).start(spawners=0)
    try:
        a = rig.add_snapshot(SnapshotKey("p", "a"), size_bytes=1000)
        rig.register(a)
        rig.clock.advance(1)
        b = rig.add_snapshot(SnapshotKey("p", "b"), size_bytes=1000)
        rig.register(b)
        rig.clock.advance(1)
        c = rig.add_snapshot(SnapshotKey("p", "c"), size_bytes=1000)
        rig.register(c)
        assert {s.key for s in rig.snapshots()} == {b.key, c.key}
        assert a.image_id not in rig.image_ids()
    finally:
        pykka.ActorRegistry.stop_all()


def test_three_tiny_snapshots_fit_in_5_mb() -> None:
    """Regression (issue 11, item 3): each snapshot was charged its whole image, the
    shared base included, so with 5 MB only one of three tiny snapshots was kept."""
    rig = make_rig(spawn_settings(snapshots={"max_total_bytes": 5 * 1024 * 1024})).start()
    try:
        for item in ("a", "b", "c"):
            rig.clock.advance(1)
            rig.run(f"job-{item}", JobSpec(project="p", work_item=item))
        rig.sweep()
        snaps = rig.snapshots()
        assert [s.key.work_item for s in snaps] == ["a", "b", "c"]
        assert all(s.size_bytes > 5_000_000 for s in snaps)  # the base alone is 5 MB
    finally:
        pykka.ActorRegistry.stop_all()


def test_max_total_bytes_counts_the_whole_image_when_its_own_bytes_are_unknown() -> None:
    rig = make_rig(spawn_settings(snapshots={"max_total_bytes": 2500})).start(spawners=0)
    try:
        big = rig.add_snapshot(SnapshotKey("p", "a"), size_bytes=2000)
        rig.register(big)
        rig.clock.advance(1)
        small = rig.add_snapshot(SnapshotKey("p", "b"), size_bytes=2000)
        rig.register(dataclasses.replace(small, own_bytes=100))
        assert {s.key for s in rig.snapshots()} == {big.key, small.key}
        rig.clock.advance(1)
        third = rig.add_snapshot(SnapshotKey("p", "c"), size_bytes=2000)
        rig.register(third)
        assert {s.key for s in rig.snapshots()} == {small.key, third.key}
    finally:
        pykka.ActorRegistry.stop_all()


def test_image_in_use_survives_a_sweep_and_is_deleted_on_the_next(rig: MemoryRig) -> None:
    from actors.engine.base import ContainerSpec

    snap = rig.add_snapshot(KEY)
    rig.register(snap)
    container = rig.engine.create_container(ContainerSpec(image=snap.image_id))
    rig.engine.start_container(container)  # exits 0 at once; a stopped user still blocks rmi
    rig.clock.advance(rig.settings.snapshots.ttl_s + 1)
    rig.sweep()
    assert rig.snapshots() == []
    assert snap.image_id in rig.image_ids()
    rig.engine.remove_container(container)
    rig.sweep()
    assert snap.image_id not in rig.image_ids()


def test_sweep_drops_entries_whose_image_is_gone_with_one_list_call(rig: MemoryRig) -> None:
    gone = rig.add_snapshot(KEY)
    kept = rig.add_snapshot(OTHER)
    rig.register(gone)
    rig.register(kept)
    rig.engine.delete_image_behind_back(gone.image_id)
    before = len(rig.engine.calls_of("list_images"))
    rig.sweep()
    assert len(rig.engine.calls_of("list_images")) == before + 1
    assert [s.key for s in rig.snapshots()] == [OTHER]


def test_engine_error_in_a_sweep_is_retried_next_sweep_not_a_crash(rig: MemoryRig) -> None:
    snap = rig.add_snapshot(KEY)
    rig.register(snap)
    rig.clock.advance(rig.settings.snapshots.ttl_s + 1)
    rig.engine.set_unavailable(True)
    rig.sweep()
    assert rig.snapshots() == []  # evicted from the registry; its rmi is pending
    rig.engine.set_unavailable(False)
    assert snap.image_id in rig.image_ids()
    rig.sweep()
    assert snap.image_id not in rig.image_ids()


def test_restart_rebuilds_the_registry_and_deletes_older_duplicates(rig: MemoryRig) -> None:
    t0 = rig.clock.now()
    old = rig.add_snapshot(KEY, created_at=t0)
    older = rig.add_snapshot(KEY, created_at=t0 - 100)
    newest = rig.add_snapshot(KEY, created_at=t0 + 5)
    other = rig.add_snapshot(OTHER, created_at=t0)
    rig.restart_manager()
    assert {(s.key, s.image_id) for s in rig.snapshots()} == {
        (KEY, newest.image_id),
        (OTHER, other.image_id),
    }
    images = rig.image_ids()
    assert old.image_id not in images
    assert older.image_id not in images
    assert {newest.image_id, other.image_id} <= images
    found = rig.lookup(KEY)
    assert found is not None
    assert found.layers == newest.layers
    assert found.size_bytes == newest.size_bytes


def test_restart_with_the_engine_down_rebuilds_on_the_next_sweep(rig: MemoryRig) -> None:
    snap = rig.add_snapshot(KEY)
    rig.engine.set_unavailable(True)
    rig.restart_manager()
    assert rig.snapshots() == []
    rig.engine.set_unavailable(False)
    rig.sweep()
    assert [s.image_id for s in rig.snapshots()] == [snap.image_id]


def test_restart_leaves_another_repositorys_snapshots_alone(rig: MemoryRig) -> None:
    foreign = rig.add_snapshot(KEY, repository="someone-else")
    rig.restart_manager()
    rig.sweep()
    assert rig.snapshots() == []
    assert foreign.image_id in rig.image_ids()


def test_restart_leaves_another_instances_snapshots_alone(rig: MemoryRig) -> None:
    """Regression (issue 11, item 1): two instances sharing one repository
    adopted, and evicted, each other's snapshots on restart. Unlabelled ones
    (from before the instance label) may be another's: left alone too."""
    theirs = rig.add_snapshot(KEY, instance="other")
    unlabelled = rig.add_snapshot(OTHER, instance=None)
    ours = rig.add_snapshot(SnapshotKey("p", "mine"))
    rig.restart_manager()
    rig.sweep()
    assert [s.image_id for s in rig.snapshots()] == [ours.image_id]
    assert {theirs.image_id, unlabelled.image_id} <= set(rig.image_ids())


def test_new_base_image_invalidates_and_deletes_snapshots_of_the_old_base(rig: MemoryRig) -> None:
    snap = rig.add_snapshot(KEY)
    rig.register(snap)
    new_base = rig.engine.add_image("snapyard-worker:test", labels={LABEL_ROLE: "base"})
    rig.ask(SetBaseImage(new_base))
    assert rig.snapshots() == []
    assert snap.image_id not in rig.image_ids()
    # A late commit from the old base is refused too.
    late = rig.add_snapshot(OTHER, base_id=rig.base_id)
    rig.register(late)
    assert rig.snapshots() == []
    assert late.image_id not in rig.image_ids()


def test_a_snapshot_at_the_layer_cap_is_still_a_hit(rig: MemoryRig) -> None:
    """Regression (issue 11, item 2): at the cap the next run started from the base
    image with an empty workspace. The Spawner flattens such a commit now."""
    cap = rig.settings.snapshots.max_layers
    snap = rig.add_snapshot(KEY, layers=cap + 3)
    rig.register(snap)
    found = rig.lookup(KEY)
    assert found is not None
    assert found.image_id == snap.image_id


def test_a_rebuilt_registry_charges_each_snapshot_its_own_bytes() -> None:
    rig = make_rig(spawn_settings(snapshots={"max_total_bytes": 5 * 1024 * 1024})).start()
    try:
        for item in ("a", "b", "c"):
            rig.run(f"job-{item}", JobSpec(project="p", work_item=item))
        rig.restart_manager()
        rig.sweep()
        snaps = rig.snapshots()
        assert len(snaps) == 3
        for snap in snaps:
            assert snap.own_bytes is not None
            assert 0 < snap.own_bytes < 100_000 < snap.size_bytes
    finally:
        pykka.ActorRegistry.stop_all()


def test_remove_snapshot_drops_the_entry_and_deletes_the_image(rig: MemoryRig) -> None:
    snap = rig.add_snapshot(KEY)
    rig.register(snap)
    assert rig.ask(RemoveSnapshot(KEY)) is True
    assert rig.ask(RemoveSnapshot(KEY)) is False
    assert rig.snapshots() == []
    assert snap.image_id not in rig.image_ids()


def test_orphan_snapshot_image_is_deleted_only_after_the_grace_period(rig: MemoryRig) -> None:
    orphan = rig.add_snapshot(KEY)  # committed, but its Register never arrived
    rig.sweep()
    assert orphan.image_id in rig.image_ids()
    rig.clock.advance(rig.settings.supervisor.orphan_grace_s + 1)
    rig.sweep()
    assert orphan.image_id not in rig.image_ids()


def test_lookup_while_the_engine_is_down_still_answers(rig: MemoryRig) -> None:
    snap = rig.add_snapshot(KEY)
    rig.register(snap)
    rig.engine.fail_next("list_images", error=EngineUnavailable("down"))
    rig.sweep()
    assert rig.lookup(KEY) is not None


# --- supervision ----------------------------------------------------------------


def _break_once(monkeypatch: pytest.MonkeyPatch, method: str, times: int = 1) -> list[str]:
    """Make SnapshotManager.<method> raise ``times`` times, like a bug would."""
    original = getattr(SnapshotManager, method)
    raised: list[str] = []

    def broken(self: SnapshotManager, *args: Any) -> Any:
        if len(raised) < times:
            raised.append(method)
            raise RuntimeError(f"injected bug in {method}")
        return original(self, *args)

    monkeypatch.setattr(SnapshotManager, method, broken)
    return raised


def test_a_bug_in_a_told_message_restarts_the_manager_in_place_and_loses_no_snapshot(
    rig: MemoryRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    snap = rig.add_snapshot(KEY)
    rig.register(snap)
    raised = _break_once(monkeypatch, "_image_deleted")
    assert rig.manager is not None
    rig.manager.tell(ImageDeleted("sha256:" + "0" * 64))
    # Same address, still alive, and the registry was rebuilt from image labels.
    found = rig.lookup(KEY)
    assert raised == ["_image_deleted"]
    assert rig.manager.is_alive()
    assert found is not None
    assert found.image_id == snap.image_id


def test_a_bug_in_lookup_is_a_miss_not_a_crash(
    rig: MemoryRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    snap = rig.add_snapshot(KEY)
    rig.register(snap)
    _break_once(monkeypatch, "_lookup")
    assert rig.lookup(KEY) is None
    found = rig.lookup(KEY)
    assert found is not None
    assert found.image_id == snap.image_id


def test_past_the_restart_budget_the_manager_stops_and_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its parent (the Root) counts its crashes, stops it past the budget, and says why."""
    rig = make_rig(spawn_settings(supervisor={"restart_max": 2, "restart_window_s": 60.0}))
    rig.start(spawners=0)
    assert rig.manager is not None
    _break_once(monkeypatch, "_sweep", times=10)
    for _ in range(3):
        with contextlib.suppress(RuntimeError, pykka.ActorDeadError):
            rig.manager.ask(SweepSnapshots(), timeout=5)
    rig.manager.actor_stopped.wait(5)
    assert not rig.manager.is_alive()
    assert len(rig.fatal) == 1
    assert "failed 3 times within 60s (restart_max = 2)" in rig.fatal[0]
    assert "injected bug in _sweep" in rig.fatal[0]


def test_register_evicts_in_memory_without_listing_images_so_lookups_never_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = make_rig(spawn_settings(snapshots={"max_count": 1})).start(spawners=0)
    old = rig.add_snapshot(KEY)
    rig.register(old)
    rig.clock.advance(1)
    other = rig.add_snapshot(OTHER)
    listings = len(rig.engine.calls_of("list_images"))
    inspections = len(rig.engine.calls_of("inspect_image"))
    rig.register(other)
    # No engine listing in the manager's loop (that is the timer's sweep)...
    assert len(rig.engine.calls_of("list_images")) == listings
    assert len(rig.engine.calls_of("inspect_image")) == inspections
    # ...yet over max_count the older entry is evicted and its image deleted at once.
    assert [s.key for s in rig.snapshots()] == [OTHER]
    assert old.image_id not in rig.image_ids()
