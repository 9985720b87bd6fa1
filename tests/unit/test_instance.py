"""The instance ID: generated once, kept private, and the rule of what is ours."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from actor_kit import BASE_TAG, kit_settings

from actors.clock import FakeClock
from actors.engine.base import ContainerMissing, ContainerSpec, ContainerState
from actors.engine.memory import MemoryEngine
from actors.instance import INSTANCE_ID_FILE, mine, resolve_instance_id
from actors.labels import LABEL_INSTANCE, LABEL_JOB_ID, MANAGED_FILTER
from actors.messages import RemoveContainer
from actors.reaper import Reaper


def test_an_empty_instance_id_is_generated_once_and_kept_0600(tmp_path: Path) -> None:
    settings = kit_settings(supervisor={"instance_id": "", "data_dir": str(tmp_path / "data")})
    first = resolve_instance_id(settings).supervisor.instance_id
    again = resolve_instance_id(settings).supervisor.instance_id
    assert first
    assert first == again
    path = tmp_path / "data" / INSTANCE_ID_FILE
    assert path.read_text().strip() == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_configured_instance_id_wins_and_writes_nothing(tmp_path: Path) -> None:
    settings = kit_settings(supervisor={"instance_id": "a-1", "data_dir": str(tmp_path / "d")})
    assert resolve_instance_id(settings).supervisor.instance_id == "a-1"
    assert not (tmp_path / "d").exists()


def _container(cid: str, labels: dict[str, str]) -> ContainerState:
    return ContainerState(
        id=cid,
        status="running",
        image_id="sha256:" + "0" * 64,
        labels={**MANAGED_FILTER, **labels},
        exit_code=None,
        oom_killed=False,
        created_at=0.0,
    )


def test_ours_is_our_label_or_an_unlabelled_container_of_our_own_job() -> None:
    containers = [
        _container("a", {LABEL_INSTANCE: "me", LABEL_JOB_ID: "j1"}),
        _container("b", {LABEL_INSTANCE: "you", LABEL_JOB_ID: "j2"}),
        _container("c", {LABEL_JOB_ID: "j3"}),  # before the label: our job
        _container("d", {LABEL_JOB_ID: "j4"}),  # before the label: not our job
        _container("e", {}),
        # Another instance's label wins even over a job ID we know.
        _container("f", {LABEL_INSTANCE: "you", LABEL_JOB_ID: "j3"}),
    ]
    found = mine(containers, "me", lambda job_id: job_id in {"j1", "j3"})
    assert [c.id for c in found] == ["a", "c"]


def test_the_reaper_never_removes_another_instances_container() -> None:
    """Belt and braces behind the listing filter: a wrong ID from a caller
    must not kill another instance's worker."""
    engine = MemoryEngine(clock=FakeClock())
    engine.add_worker_image(BASE_TAG)
    theirs = engine.create_container(
        ContainerSpec(image=BASE_TAG, labels={**MANAGED_FILTER, LABEL_INSTANCE: "you"})
    )
    ours = engine.create_container(
        ContainerSpec(image=BASE_TAG, labels={**MANAGED_FILTER, LABEL_INSTANCE: "me"})
    )
    reaper = Reaper.start(engine, instance_id="me")
    try:
        for cid in (theirs, ours):
            reaper.ask(RemoveContainer(cid, 0.0, "test"), timeout=10.0)
    finally:
        reaper.stop()
    assert engine.inspect_container(theirs).id == theirs
    with pytest.raises(ContainerMissing):
        engine.inspect_container(ours)
