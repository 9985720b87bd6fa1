"""Which snapshots the sweep evicts past the count and size caps: LRU first."""

from __future__ import annotations

import random

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


def _over_limits_by_popping(
    entries: list[Snapshot], max_count: int, max_total_bytes: int
) -> list[tuple[Snapshot, str]]:
    """The rule as first written (pop the LRU head until it fits), kept as the oracle."""
    by_lru = sorted(entries, key=lambda s: (s.last_used_at, s.created_at))
    evicted: list[tuple[Snapshot, str]] = []
    while len(by_lru) > max_count:
        evicted.append((by_lru.pop(0), "over snapshots.max_count"))
    total = sum(s.charged_bytes for s in by_lru)
    while by_lru and total > max_total_bytes:
        victim = by_lru.pop(0)
        total -= victim.charged_bytes
        evicted.append((victim, "over snapshots.max_total_bytes"))
    return evicted


def test_over_limits_decides_as_popping_the_lru_head_did() -> None:
    rng = random.Random(15)
    for _ in range(300):
        entries = [
            snap(f"s{i}", float(rng.randint(0, 5)), rng.choice([None, 10, 100, 1_000]), 2_000)
            for i in range(rng.randint(0, 12))
        ]
        max_count, max_bytes = rng.randint(0, 13), rng.choice([0, 50, 500, 5_000, 10**9])
        assert over_limits(entries, max_count, max_bytes) == _over_limits_by_popping(
            entries, max_count, max_bytes
        )
