"""Secrets at rest: the data dir is private, and so is every file in it."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from api_kit import served

from actors.model import JobState, validate_spec
from actors.private_files import ensure_private_file, loose_permissions


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_data_dir_and_its_database_are_private(tmp_path: Path) -> None:
    """Regression: snapyard.db was created 0644 in a 0755 directory, job env inside."""
    data = tmp_path / "fresh" / "data"
    with served(data) as live:
        job = live.app.wait(live.app.submit(validate_spec("p", "w", env={"T": "x"})).id, 10)
        assert job.state is JobState.SUCCEEDED
        files = sorted(data.glob("snapyard.db*"))
        assert [f.name for f in files][:1] == ["snapyard.db"]
        assert mode(data) == 0o700
        for path in files:  # the database and SQLite's -wal and -shm
            assert mode(path) == 0o600, path


def test_an_existing_database_is_tightened(tmp_path: Path) -> None:
    database = tmp_path / "snapyard.db"
    database.write_bytes(b"")
    database.chmod(0o644)
    ensure_private_file(database)
    assert mode(database) == 0o600


@pytest.mark.parametrize(("bits", "loose"), [(0o700, False), (0o750, True), (0o755, True)])
def test_loose_permissions_are_named(tmp_path: Path, bits: int, loose: bool) -> None:
    tmp_path.chmod(bits)
    problem = loose_permissions(tmp_path)
    assert (problem is not None) is loose
    if problem is not None:
        assert f"mode {bits:04o}" in problem


def test_a_data_dir_first_made_as_the_parent_of_its_secrets_is_private(tmp_path: Path) -> None:
    """Regression: a cluster host's first job wrote data/secrets/ before anything made
    data/, and ``mkdir(mode, parents=True)`` left data/ 0755."""
    from actors.engine._docker_mounts import HostFiles

    data = tmp_path / "new" / "data"
    mounts = HostFiles(secrets_dir=data / "secrets", helper_dir=data / "helper")
    path, _group = mounts.write_secrets({"TOKEN": "s3cret"})
    assert path.read_bytes()  # the job's env arrived
    for directory in (tmp_path / "new", data, data / "secrets"):
        assert mode(directory) == 0o700, directory
    assert loose_permissions(data) is None
