"""The env helper's pure parts: the argv Docker would run, the files it mounts,
and, in the MemoryEngine, the container config a commit merges with."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from actors.clock import FakeClock
from actors.engine.base import ContainerSpec, ImageConfig
from actors.engine.memory import MemoryEngine
from actors.labels import SECRET_ENV_PATH
from actors.worker_helper import (
    BUSYBOX,
    HELPER_MOUNT,
    HELPER_SCRIPT,
    HelperError,
    helper_entrypoint,
    job_argv,
    write_helper_dir,
)


def test_a_jobs_command_replaces_cmd_and_keeps_the_entrypoint() -> None:
    """Docker's rule for `docker run IMAGE ARGS`: the helper must exec the same argv."""
    assert job_argv(("/agent",), ("--serve",), ("--once", "x")) == ("/agent", "--once", "x")
    assert job_argv(("/agent",), ("--serve",), None) == ("/agent", "--serve")
    assert job_argv(None, ("sh", "-c", "x"), None) == ("sh", "-c", "x")
    assert job_argv((), ("sh",), ("echo", "hi")) == ("echo", "hi")
    assert job_argv(("/app",), None, ()) == ("/app",)
    assert job_argv(None, None, None) == ()


def test_the_helper_is_the_whole_entrypoint_run_by_its_own_busybox() -> None:
    entrypoint = helper_entrypoint(("/agent", "--once"))
    assert entrypoint == (
        f"{HELPER_MOUNT}/busybox",
        "sh",
        f"{HELPER_MOUNT}/snapyard-init",
        "/agent",
        "--once",
    )


def test_the_script_reads_the_secret_env_path_the_engine_mounts() -> None:
    assert f"SNAPYARD_INIT_FILE={SECRET_ENV_PATH}\n" in HELPER_SCRIPT.read_text()


def test_the_helper_dir_is_written_once_per_content_and_readable_by_anyone(
    tmp_path: Path,
) -> None:
    first = write_helper_dir(tmp_path)
    again = write_helper_dir(tmp_path)
    assert first == again
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no staging left over
    assert (first / "busybox").read_bytes() == BUSYBOX.read_bytes()
    assert (first / "snapyard-init").read_bytes() == HELPER_SCRIPT.read_bytes()
    assert stat.S_IMODE(first.stat().st_mode) == 0o755
    assert stat.S_IMODE((first / "busybox").stat().st_mode) == 0o755
    assert stat.S_IMODE((first / "snapyard-init").stat().st_mode) == 0o644


def test_a_helper_dir_made_private_by_chmod_is_made_runnable_again(tmp_path: Path) -> None:
    """`chmod -R go= <data_dir>` (doctor's fix for loose modes) must not lock the
    image's non-root user out of the helper."""
    first = write_helper_dir(tmp_path / "data" / "helper")
    for path in (first / "busybox", first / "snapyard-init", first):
        path.chmod(0o700)
    assert write_helper_dir(tmp_path / "data" / "helper") == first
    assert stat.S_IMODE((first / "busybox").stat().st_mode) == 0o755
    assert stat.S_IMODE(first.stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700  # the data dir: private


def test_another_busybox_gets_its_own_helper_dir(tmp_path: Path) -> None:
    """A container still running the old helper keeps its files."""
    other = tmp_path / "busybox"
    shutil.copyfile(BUSYBOX, other)
    with other.open("ab") as handle:
        handle.write(b"\0")
    assert write_helper_dir(tmp_path / "h") != write_helper_dir(tmp_path / "h", busybox=other)


def test_a_dynamic_or_missing_busybox_is_refused_with_the_package_to_install(
    tmp_path: Path,
) -> None:
    dynamic = Path(shutil.which("python3") or "/usr/bin/python3").resolve()
    with pytest.raises(HelperError, match="busybox-static"):
        write_helper_dir(tmp_path, busybox=dynamic)
    with pytest.raises(HelperError, match="busybox-static"):
        write_helper_dir(tmp_path, busybox=tmp_path / "absent")


# --- MemoryEngine: the config Docker records under the helper ----------------


def _engine_with_cmd_only_image() -> tuple[MemoryEngine, str]:
    engine = MemoryEngine(clock=FakeClock())
    image = engine.add_image("user/agent:1", cmd=("agent", "--serve"), env=("PATH=/bin",))
    return engine, image


def test_the_container_config_holds_the_helper_and_an_empty_cmd() -> None:
    engine, image = _engine_with_cmd_only_image()
    container = engine.container(
        engine.create_container(ContainerSpec(image=image, command=("agent", "--once")))
    )
    assert container.config_entrypoint == helper_entrypoint(("agent", "--once"))
    assert container.config_cmd == ()
    # What the job runs, as the image defines it.
    assert (container.entrypoint, container.cmd) == (None, ("agent", "--once"))


def test_a_commit_that_names_no_entrypoint_gets_the_images_own_not_the_helpers() -> None:
    """The hazard: Docker would copy the helper's argv (the job's command in it)."""
    engine, image = _engine_with_cmd_only_image()
    own_cmd = engine.inspect_image(image).cmd
    container_id = engine.create_container(ContainerSpec(image=image, command=("agent", "-1")))
    plain = engine.inspect_image(engine.commit_container(container_id, "s", "a", ImageConfig()))
    assert (plain.entrypoint, plain.cmd) == ((), own_cmd)
    own = engine.inspect_image(
        engine.commit_container(
            container_id, "s", "b", ImageConfig(entrypoint=(), cmd=("agent", "--serve"))
        )
    )
    assert (own.entrypoint, own.cmd) == ((), ("agent", "--serve"))


def test_without_the_helper_the_secret_env_never_reaches_the_process() -> None:
    engine, image = _engine_with_cmd_only_image()
    spec = ContainerSpec(image=image, secret_env={"TOKEN": "t"})
    helped = engine.container(engine.create_container(spec))
    bare = engine.container(
        engine.create_container(
            ContainerSpec(image=image, secret_env={"TOKEN": "t"}, env_helper=False)
        )
    )
    assert helped.process_env["TOKEN"] == "t"
    assert "TOKEN" not in bare.process_env
    assert bare.config_entrypoint is None
