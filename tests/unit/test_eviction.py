"""Which snapshots the sweep evicts past the count and size caps: LRU first."""

from __future__ import annotations

from actors.eviction import over_limits
from actors.model import Snapshot, SnapshotKey


def snap(item: str, used: float, own: int | None, size: int = 10_000) -> Snapshot:
    return Snapshot(SnapshotKey("p", item), f"sha256:{item}", item, "b", 0.0, used, size, 2, own)


def test_count_then_size_evict_the_least_recently_used_first() -> None:
    a, b, c = snap("a", 1.0, 100), snap("b", 3.0, 100), snap("c", 2.0, 100)
    assert over_limits([a, b, c], max_count=2, max_total_bytes=10**9) == [
        (a, "over snapshots.max_count")
    ]
    assert over_limits([a, b, c], max_count=9, max_total_bytes=150) == [
        (a, "over snapshots.max_total_bytes"),
        (c, "over snapshots.max_total_bytes"),
    ]


def test_a_snapshot_is_charged_its_own_bytes_or_its_whole_size_when_unknown() -> None:
    known, unknown = snap("k", 2.0, 100), snap("u", 1.0, None, size=5_000)
    assert over_limits([known, unknown], 9, 5_000) == [(unknown, "over snapshots.max_total_bytes")]
    assert over_limits([known, unknown], 9, 5_100) == []
