"""The ``snapyard`` commands that work in this process: run, demo, image build.

``run`` and ``demo`` host a supervisor here, so this module imports the actor
system, pykka and Sentry; ``actors.cli`` imports it only when one of these
commands runs, which keeps every other command (and ``--help``) quick.
"""

from __future__ import annotations

import argparse
from typing import TextIO

from actors.api import ApiServer, raise_fd_limit
from actors.cli_common import (
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    config_error,
    make_engine,
    settings_of,
    short_id,
)
from actors.demo import run_demo
from actors.engine.base import Engine, EngineError
from actors.run import run_forever
from actors.settings import LogSettings, Settings, SettingsError
from actors.telemetry import setup_logging
from actors.worker_image import WorkerImageError, ensure_base_image

__all__ = ["cmd_cluster_demo", "cmd_demo", "cmd_image_build", "cmd_run"]


def cmd_run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """The supervisor and its API in the foreground, until SIGTERM or SIGINT."""
    settings = settings_of(args)
    raise_fd_limit()  # each API connection is a descriptor; 1024 is a common default
    try:
        # Bound before any actor starts: a taken port or an unsafe address is a
        # configuration error (exit 2), not a half-started supervisor.
        server = ApiServer(None, settings.api)
    except SettingsError as exc:
        raise config_error(exc) from None
    except OSError as exc:
        raise CliError(
            f"cannot listen on {settings.api.host}:{settings.api.port}: {exc.strerror or exc}; "
            "is another `snapyard run` up? Change [api] port or SNAPYARD_API",
            EXIT_USAGE,
        ) from None
    server.start()
    try:
        return run_forever(settings, args.drain, on_started=server.attach)
    finally:
        server.stop()


def cmd_demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """The snapshot story, told on the real engine."""
    settings = settings_of(args)
    return run_demo(settings, _demo_engine(settings, err), out)


def cmd_cluster_demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """The cluster story: PostgreSQL, a registry and three hosts on this machine."""
    from actors.cluster_demo import run_cluster_demo  # noqa: PLC0415 - only this command needs it
    from actors.engine.docker import DockerEngine  # noqa: PLC0415

    settings = settings_of(args)
    engine = _demo_engine(settings, err)
    if not isinstance(engine, DockerEngine):  # pragma: no cover - make_engine makes one
        raise CliError("the cluster demo needs the Docker engine", EXIT_JOB_FAILED)
    return run_cluster_demo(settings, engine, out)


def _demo_engine(settings: Settings, err: TextIO) -> Engine:
    # The story goes to stdout; the actors' expected warnings (a deleted
    # snapshot, a dead host are the point of the stories) would only blur it.
    setup_logging(LogSettings(level="ERROR", format="text"), stream=err)
    engine = make_engine(settings)
    try:
        engine.ping()
    except EngineError as exc:
        raise CliError(
            f"no container engine answers at {engine.describe()}: {exc}; "
            "start one with `make engine` (config/engine.sh) or set DOCKER_HOST",
            EXIT_JOB_FAILED,
        ) from None
    return engine


def cmd_image_build(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Build the base worker image unless the tag already has this context's digest."""
    settings = settings_of(args)
    tag = settings.worker.image
    try:
        image_id, built = ensure_base_image(make_engine(settings), tag, force=args.force)
    except (WorkerImageError, EngineError) as exc:
        raise CliError(f"cannot build {tag}: {exc}", EXIT_JOB_FAILED) from None
    print(
        f"built {tag} ({short_id(image_id)})"
        if built
        else f"{tag} is up to date ({short_id(image_id)})",
        file=out,
    )
    return EXIT_OK
