"""``snapyard doctor``: check what ``snapyard run`` needs, one line per check.

Every failed check says what to do. The checks are independent: no engine
still checks the store and the API port, so one run shows every problem.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TextIO

from actors.api import ApiServer, check_bind_allowed
from actors.cli_common import EXIT_JOB_FAILED, EXIT_OK, EXIT_USAGE, make_engine, short_id
from actors.client import ApiClient, ApiUnreachable
from actors.doctor_cluster import cluster_checks
from actors.engine.base import Engine, EngineError, ImageMissing
from actors.labels import LABEL_WORKER_DIGEST
from actors.private_files import ensure_private_dir, loose_permissions
from actors.settings import Settings, SettingsError, config_path_from_env, load_settings
from actors.store import SqliteStore
from actors.worker_helper import INSTALL_HINT, HelperError, write_helper_dir
from actors.worker_image import (
    WorkerImageError,
    build_context,
    is_demo_image,
    missing_image_hint,
)

__all__ = ["cmd_doctor"]

_IMAGE_HINT = "build it with `make image` or `snapyard image build`"

_Check = tuple[str, bool, str, str]  # name, ok, what was found, what to do when not ok


def _check_private(settings: Settings) -> _Check:
    """The data dir holds queued jobs' env and secret files: only its owner may read it."""
    loose = [
        problem
        for path in (settings.data_dir, settings.store_path, settings.data_dir / "secrets")
        if (problem := loose_permissions(path)) is not None
    ]
    if loose:
        return (
            "permissions",
            False,
            "; ".join(loose),
            f"chmod -R go= {settings.data_dir} (Snapyard creates it 0700, its files 0600)",
        )
    return "permissions", True, f"{settings.data_dir}: only its owner can read it", ""


def _check_store(settings: Settings) -> _Check:
    path = settings.store_path
    try:
        ensure_private_dir(settings.data_dir)
        with SqliteStore(path) as store:
            counts = store.count_by_state()
    except Exception as exc:
        return (
            "store",
            False,
            f"{path}: {exc}",
            "make supervisor.data_dir writable by this user, or set SNAPYARD_DATA_DIR",
        )
    total = sum(counts.values())
    unfinished = sum(n for state, n in counts.items() if not state.terminal)
    return "store", True, f"{path}: {total} jobs, {unfinished} unfinished", ""


def _check_api_port(settings: Settings) -> _Check:
    api = settings.api
    address = f"{api.host}:{api.port}"
    try:
        check_bind_allowed(api)
    except SettingsError as exc:
        return (
            "api port",
            False,
            f"{address}: {exc.allowed}",
            "set SNAPYARD_API_TOKEN or listen on 127.0.0.1",
        )
    client = ApiClient.from_settings(api, timeout_s=3.0)
    try:
        ok, reason = client.health()
    except ApiUnreachable:
        pass
    else:
        if ok:
            return "api port", True, f"{address}: a supervisor answers ({reason})", ""
        return (
            "api port",
            False,
            f"{address}: a supervisor answers but is unhealthy: {reason}",
            "see its log (journalctl -u snapyard, or the `snapyard run` terminal)",
        )
    try:
        ApiServer(None, api).stop()
    except OSError as exc:
        return (
            "api port",
            False,
            f"{address}: cannot listen ({exc.strerror or exc}) and no supervisor answers there",
            "free the port or change [api] port / SNAPYARD_API",
        )
    return "api port", True, f"{address}: free; `snapyard run` will listen there", ""


def _check_helper(settings: Settings) -> _Check:
    """The env helper every worker runs: the host's static busybox, written once."""
    try:
        path = write_helper_dir(settings.data_dir / "helper")
    except (HelperError, OSError) as exc:
        return "env helper", False, str(exc), INSTALL_HINT
    return "env helper", True, str(path), ""


def _print_checks(checks: Sequence[_Check], out: TextIO) -> int:
    width = max(len(name) for name, *_ in checks)
    for name, ok, found, fix in checks:
        print(f"{'ok  ' if ok else 'FAIL'}  {name.ljust(width)}  {found}", file=out)
        if not ok and fix:
            print(f"      {' ' * width}  -> {fix}", file=out)
    failed = [name for name, ok, *_ in checks if not ok]
    print(
        "all checks passed"
        if not failed
        else f"{len(failed)} check(s) failed: {', '.join(failed)}",
        file=out,
    )
    return EXIT_OK if not failed else EXIT_JOB_FAILED


def _image_check_name(settings: Settings, image: str) -> str:
    """``base image`` for worker.image; the agent types that use any other."""
    if image == settings.worker.image:
        return "base image"
    users = sorted(name for name, t in settings.agent_types.items() if t.image == image)
    return f"image of {', '.join(users)}"


def _check_image(engine: Engine, name: str, tag: str) -> _Check:
    try:
        image = engine.inspect_image(tag)
    except ImageMissing:
        return name, False, f"{tag}: missing", missing_image_hint(tag)
    except EngineError as exc:
        return name, False, f"{tag}: {exc}", missing_image_hint(tag)
    note = "" if is_demo_image(tag) else " (your image, used as it is)"
    try:
        if is_demo_image(tag) and image.labels.get(LABEL_WORKER_DIGEST) != build_context().digest:
            note = f" (older than actors/worker; {_IMAGE_HINT} to refresh)"
    except WorkerImageError as exc:
        note = f" (cannot rebuild it here: {exc})"
    return name, True, f"{tag}: {short_id(image.id)}{note}", ""


def _check_engine(settings: Settings) -> tuple[Engine | None, list[_Check]]:
    """The engine, then every configured image on it (skipped when there is no engine)."""
    images = [(_image_check_name(settings, tag), tag) for tag in settings.worker_images()]
    engine = make_engine(settings)
    try:
        engine.ping()
    except EngineError as exc:
        return None, [
            (
                "engine",
                False,
                f"{engine.describe()}: {exc}",
                "start it with `make engine` (config/engine.sh), or set engine.url / DOCKER_HOST",
            ),
            *(
                (name, False, f"{tag}: not checked, no engine", "fix the engine first")
                for name, tag in images
            ),
        ]
    checks: list[_Check] = [("engine", True, engine.describe(), "")]
    checks.extend(_check_image(engine, name, tag) for name, tag in images)
    return engine, checks


def cmd_doctor(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Check what ``snapyard run`` needs; each failed check says what to do."""
    source = config_path_from_env(getattr(args, "config", None))
    try:
        settings = load_settings(getattr(args, "config", None))
    except SettingsError as exc:
        _print_checks(
            [
                (
                    "config",
                    False,
                    f"{source or '(defaults)'}: {exc.key} = {exc.value!r}: {exc.allowed}",
                    "fix that key in the file or its SNAPYARD_* variable",
                )
            ],
            out,
        )
        return EXIT_USAGE
    checks: list[_Check] = [("config", True, str(source or "built-in defaults"), "")]
    checks.extend(_check_engine(settings)[1])
    if settings.cluster.enabled:  # the jobs are in the cluster's database
        ensure_private_dir(settings.data_dir)
        checks.extend(cluster_checks(settings))
    else:
        checks.append(_check_store(settings))  # creates the data dir, private
    checks.append(_check_helper(settings))
    checks.append(_check_private(settings))
    checks.append(_check_api_port(settings))
    return _print_checks(checks, out)
