"""One wiring, one supervision policy: every actor's crash reaches its parent.

The Yard kit starts the actors with ``actors.wiring.start_actors``, as the
application does, so these run the production tree: Root -> SnapshotManager,
Reaper; Supervisor -> Spawners.
"""

from __future__ import annotations

from pathlib import Path

import pykka
from yard_kit import Yard, eventually, yard_settings

from actors.messages import GetStatus, Reconcile, Register
from actors.model import JobState


def _bug() -> None:
    raise RuntimeError("injected bug")


def test_the_actors_start_together_and_stop_in_reverse(tmp_path: Path) -> None:
    yard = Yard(tmp_path).start()
    actors = yard.actors
    refs = [actors.root, actors.snapshots, actors.reaper, actors.supervisor]
    assert all(ref is not None and ref.is_alive() for ref in refs)
    assert actors.watcher is not None
    assert actors.watcher.alive
    yard.stop()
    assert not any(ref is not None and ref.is_alive() for ref in refs)
    assert not pykka.ActorRegistry.get_all()
    assert actors.supervisor is None  # nothing left to stop twice


def test_a_reaper_bug_reaches_the_root_which_stops_it_past_the_budget(tmp_path: Path) -> None:
    """Found in review: the Reaper was neither injected nor supervised; a bug in it
    was logged and forgotten however often it happened."""
    yard = Yard(tmp_path, yard_settings(restart_max=1, restart_window_s=60.0)).start()
    reaper = yard.actors.reaper
    assert reaper is not None
    yard.sup.ask(GetStatus(), timeout=10)  # its own start-up listing is done
    yard.engine.before("list_containers", _bug, once=False)
    yard.sup.tell(Reconcile())
    yard.sup.tell(Reconcile())
    fatal = eventually(lambda: list(yard.fatal), bool, "the Root to give up")
    assert "reaper failed 2 times within 60s (restart_max = 1)" in fatal[0]
    assert "injected bug" in fatal[0]
    reaper.actor_stopped.wait(10)
    assert not reaper.is_alive()


def test_a_snapshot_manager_crash_reaches_the_root_which_counts_it(tmp_path: Path) -> None:
    """Found in review: the SnapshotManager restarted itself with a crash report
    nobody received. Now its parent hears it: within the budget the manager
    goes on (rebuilt from labels, same address); past it, the Root stops it."""
    yard = Yard(tmp_path, yard_settings(restart_max=2, restart_window_s=60.0)).start()
    job = yard.running_job(yard.submit().id)
    yard.engine.exit_container(job.container_id or "", 0)
    assert yard.wait_state(job.id, JobState.SUCCEEDED).snapshot_committed
    broken = Register(None)  # type: ignore[arg-type]  # a bug, as a message carries it
    yard.snapshots.tell(broken)
    second = yard.submit()
    assert yard.running_job(second.id).from_snapshot  # rebuilt from labels, same address
    assert yard.fatal == []
    yard.snapshots.tell(broken)
    yard.snapshots.tell(broken)
    fatal = eventually(lambda: list(yard.fatal), bool, "the Root to give up")
    assert "snapshot-manager failed 3 times within 60s (restart_max = 2)" in fatal[0]
    yard.snapshots.actor_stopped.wait(10)
    assert not yard.snapshots.is_alive()


def test_a_snapshot_manager_that_dies_at_start_stops_snapyard_with_the_reason(
    tmp_path: Path,
) -> None:
    """A child dead outside a message cannot be restarted in place (everyone holds
    its address): before, Snapyard ran on without a registry and nobody knew."""
    yard = Yard(tmp_path)
    yard.engine.before("list_images", _bug, once=True)  # its first rebuild, in on_start
    yard.start()
    fatal = eventually(lambda: list(yard.fatal), bool, "the Root to give up")
    assert "snapshot-manager died and cannot be restarted" in fatal[0]
    assert "injected bug" in fatal[0]
