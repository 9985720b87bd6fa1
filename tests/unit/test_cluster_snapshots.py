"""Snapshots across a cluster's hosts: pushed in the background, superseded, evicted.

Two hosts (``cluster_kit``) on one real PostgreSQL, MemoryEngines sharing a
MemoryRegistry that a test can take down.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from cluster_kit import ASK_S, BEAT_S, REGISTRY, Host, finished, shared_base
from waiting import eventually

from actors.cli_jobs import _snapshot_rows
from actors.clock import FakeClock
from actors.cluster.member import cluster_snapshots, held_elsewhere
from actors.engine.base import ImageMissing
from actors.engine.memory import MemoryRegistry
from actors.engine.references import split_digest
from actors.labels import LABEL_ROLE, ROLE_SNAPSHOT
from actors.messages import ListSnapshots, RemoveSnapshot
from actors.model import JobState, SnapshotKey
from actors.store.cluster import SnapshotRecord
from actors.wire import SNAPSHOT_FIELDS, snapshot_json

MakeHost = Callable[..., Host]
KEY = SnapshotKey("p", "w")


@pytest.fixture
def registry() -> MemoryRegistry:
    return MemoryRegistry(REGISTRY)


@pytest.fixture
def make_host(postgres_url: str, registry: MemoryRegistry) -> Iterator[MakeHost]:
    clock = FakeClock()
    base = shared_base(clock, registry)
    hosts: list[Host] = []

    def make(name: str, max_workers: int = 2) -> Host:
        host = Host(name, postgres_url, clock, registry, base, max_workers)
        hosts.append(host)
        return host.start()

    yield make
    for host in hosts:
        host.close()


def run_once(host: Host, work_item: str = "w") -> str:
    """Run a job of the key to a clean exit on ``host``; its snapshot's image ID."""
    job = host.submit(work_item)
    host.engine.exit_container(host.wait_running(job.id).id, 0)
    done = finished(host.store, job.id)
    assert done.state is JobState.SUCCEEDED
    assert done.snapshot_committed
    record = eventually(
        lambda: host.store.newest_snapshot(SnapshotKey("p", work_item)),
        lambda r: r is not None and r.host_id == host.name,
        "the snapshot indexed",
    )
    assert record is not None
    return record.image_id


def pushed(host: Host, key: SnapshotKey = KEY) -> SnapshotRecord:
    record = eventually(
        lambda: host.store.newest_snapshot(key),
        lambda r: r is not None and r.digest is not None,
        "the digest indexed",
    )
    assert record is not None
    return record


def live_for(seconds: float, *hosts: Host) -> None:
    """Time passes with every host renewing its lease (a host whose lease ended claims nothing)."""
    clock = hosts[0].clock
    end = clock.now() + seconds
    while clock.now() < end:
        clock.advance(BEAT_S)
        for host in hosts:
            host.beat()


def has_image(host: Host, image_id: str) -> bool:
    try:
        host.engine.inspect_image(image_id)
    except ImageMissing:
        return False
    return True


def test_a_push_while_the_registry_is_down_is_retried_later_and_the_job_succeeds(
    make_host: MakeHost, registry: MemoryRegistry
) -> None:
    a = make_host("host-a")
    registry.set_unavailable(True)
    image_id = run_once(a)
    a.ship()
    record = a.store.newest_snapshot(KEY)
    assert record is not None
    assert record.digest is None
    registry.set_unavailable(False)
    a.clock.advance(60.0)  # past the backoff
    a.ship()
    record = pushed(a)
    assert record.image_id == image_id
    repository, digest = split_digest(record.digest or "")
    assert digest in registry.manifests(repository)


def test_a_newer_snapshot_elsewhere_deletes_the_older_copy_and_its_manifest(
    make_host: MakeHost, registry: MemoryRegistry
) -> None:
    a = make_host("host-a", max_workers=1)
    old = run_once(a)
    old_reference = pushed(a).digest or ""
    b = make_host("host-b")
    busy = a.submit("z")  # A's only place is taken: the next job of KEY goes to B
    a.wait_running(busy.id)
    job = b.submit("w")
    live_for(31.0, a, b)  # past locality_wait_s: B may take the key from A
    b.tick()
    container = b.wait_running(job.id)
    assert container.image_id == old  # B pulled A's snapshot
    b.engine.exit_container(container.id, 0)
    assert finished(b.store, job.id).state is JobState.SUCCEEDED
    newest = eventually(
        lambda: b.store.newest_snapshot(KEY),
        lambda r: r is not None and r.host_id == "host-b" and r.image_id != old,
        "B's newer snapshot indexed",
    )
    assert newest is not None
    a.ship()  # A learns its copy is superseded
    eventually(lambda: has_image(a, old), lambda h: not h, "A's older copy deleted")
    assert a.sup is not None
    assert a.actors is not None
    assert a.actors.snapshots is not None
    assert a.actors.snapshots.ask(ListSnapshots(), timeout=10.0) == []
    repository, digest = split_digest(old_reference)
    eventually(lambda: registry.manifests(repository), lambda m: digest not in m, "manifest gone")


def test_an_evicted_snapshot_leaves_the_index_and_the_registry(
    make_host: MakeHost, registry: MemoryRegistry
) -> None:
    a = make_host("host-a")
    run_once(a)
    repository, digest = split_digest(pushed(a).digest or "")
    assert a.actors is not None
    assert a.actors.snapshots is not None
    assert a.actors.snapshots.ask(RemoveSnapshot(KEY), timeout=10.0)
    eventually(lambda: a.store.newest_snapshot(KEY), lambda r: r is None, "forgotten")
    eventually(lambda: registry.manifests(repository), lambda m: digest not in m, "manifest gone")


def test_a_failed_pull_starts_the_job_from_base_and_it_succeeds(
    make_host: MakeHost, registry: MemoryRegistry
) -> None:
    a = make_host("host-a", max_workers=1)
    b = make_host("host-b")
    run_once(a)
    pushed(a)
    registry.set_unavailable(True)
    busy = a.submit("z")
    a.wait_running(busy.id)
    job = b.submit("w")
    live_for(31.0, a, b)
    b.tick()
    container = b.wait_running(job.id)
    assert container.image_id == b.base_id
    b.engine.exit_container(container.id, 0)
    done = finished(b.store, job.id)
    assert done.state is JobState.SUCCEEDED
    assert not done.from_snapshot


def test_a_snapshot_registered_while_the_database_is_away_is_indexed_when_it_returns(
    make_host: MakeHost,
) -> None:
    a = make_host("host-a")
    job = a.submit("w")
    container = a.wait_running(job.id)
    a.engine.before("commit_container", a.cable.cut)  # cut off as it commits
    a.engine.exit_container(container.id, 0)
    eventually(
        lambda: [i.id for i in a.engine.list_images({LABEL_ROLE: ROLE_SNAPSHOT})],
        bool,
        "the commit",
    )
    a.ship()  # the index is away: nothing recorded yet
    a.cable.mend()
    a.tick()  # the kept Finished is recorded now
    assert finished(a.store, job.id).state is JobState.SUCCEEDED
    a.ship()
    record = pushed(a)
    assert record.host_id == "host-a"


def test_another_hosts_snapshot_lists_unknown_sizes_as_dash_and_rm_names_its_host(
    make_host: MakeHost,
) -> None:
    """Regression: B listed A's snapshot as "SIZE 0 B LAYERS 0", and `snapshots rm`
    on B said "no snapshot for p/w" although the list showed it."""
    a, b = make_host("host-a"), make_host("host-b")
    run_once(a)
    local = b.actors.snapshots.ask(ListSnapshots(), timeout=ASK_S)  # type: ignore[union-attr]
    listed = [snapshot_json(s) for s in cluster_snapshots(local, b.store)]
    assert [(s["host"], s["base_image_id"], s["own_bytes"]) for s in listed] == [
        ("host-a", None, None)  # unknown: null where the schema allows it
    ]
    assert set(listed[0]) == {*SNAPSHOT_FIELDS, "host"}  # the shape is unchanged
    [row] = _snapshot_rows(listed)
    assert row[3:6] == ["-", "-", "-"]  # OWN, SIZE, LAYERS: unknown, not zero

    assert held_elsewhere(a.store, KEY) is None  # A's own: removed there as usual
    elsewhere = held_elsewhere(b.store, KEY)
    assert elsewhere is not None
    assert str(elsewhere) == (
        "the snapshot of p/w is held by host host-a, not this one; remove it there: "
        "SNAPYARD_API=host-a:8750 snapyard snapshots rm p w"
    )
