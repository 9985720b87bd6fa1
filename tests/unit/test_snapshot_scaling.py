"""The SnapshotManager's rebuild and sweep grow linearly with the registry.

Regression (issue 15, scenario 7): the rebuild made a set of every registered
image ID for each image it adopted, so 10k snapshots took 8 s and 100k were
out of reach. No timings here (a loaded machine would make them flaky): the
work is counted as calls of ``bare_image_id``, the one helper every image-ID
comparison goes through, for n and 2n snapshots.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pykka
import pytest
from actor_kit import make_rig, spawn_settings

import actors.naming
from actors.messages import ImageDeleted, SweepSnapshots
from actors.model import SnapshotKey
from actors.snapshot_manager import SnapshotManager

N = 150


@pytest.fixture(autouse=True)
def _stop_actors() -> Iterator[None]:
    yield
    pykka.ActorRegistry.stop_all()


def _id_comparisons(n: int, monkeypatch: pytest.MonkeyPatch) -> int:
    """Rebuild n snapshots, sweep half of them away past max_count, hear each deletion."""
    rig = make_rig(spawn_settings(snapshots={"max_count": n // 2, "max_total_bytes": 10**15}))
    for i in range(n):
        rig.add_snapshot(SnapshotKey("proj", f"item-{i}"), created_at=rig.clock.now() - i)
    calls = 0
    original = actors.naming.bare_image_id

    def counted(image_id: str) -> str:
        nonlocal calls
        calls += 1
        return original(image_id)

    # Every module that imported it by name, the engine's aside (not under test).
    for name, module in list(sys.modules.items()):
        ours = name.startswith("actors") and not name.startswith("actors.engine")
        if ours and getattr(module, "bare_image_id", None) is original:
            monkeypatch.setattr(module, "bare_image_id", counted)
    before = set(rig.image_ids())
    manager = SnapshotManager.start(rig.engine, rig.settings, rig.clock)
    manager.ask(SweepSnapshots())
    gone = before - set(rig.image_ids())
    assert len(gone) == n - n // 2  # the sweep did evict (and delete) the oldest half
    for image_id in gone:
        manager.tell(ImageDeleted(image_id))
    manager.ask(SweepSnapshots())
    manager.stop()
    monkeypatch.undo()
    return calls


def test_rebuild_and_sweep_compare_image_ids_linearly_in_the_snapshot_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    small, large = _id_comparisons(N, monkeypatch), _id_comparisons(2 * N, monkeypatch)
    # Linear work doubles (plus a constant); quadratic work would quadruple.
    assert small > N
    assert large <= 2.2 * small, (small, large)
