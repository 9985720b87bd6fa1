"""The ``snapyard`` command.

One function per subcommand, registered in ``_COMMANDS``; each takes the parsed
arguments and a ``Console`` and returns the exit code, so adding ``submit`` or
``jobs`` is one function and one parser. Users see messages that say what to do,
never a stack trace: 0 ok, 1 something failed, 2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from actors.engine.base import Engine, EngineError, ImageMissing
from actors.settings import Settings, SettingsError, config_path_from_env, load_settings
from actors.worker_image import DIGEST_LABEL, WorkerImageError, build_context, ensure_base_image

__all__ = ["main"]

OK, FAILED, USAGE = 0, 1, 2
_IMAGE_HINT = "build it with `make image` or `snapyard image build`"


@dataclass(frozen=True)
class Console:
    out: TextIO
    err: TextIO

    def say(self, text: str) -> None:
        print(text, file=self.out)

    def warn(self, text: str) -> None:
        print(text, file=self.err)


def make_engine(settings: Settings) -> Engine:
    """The engine the settings point at; imported late so ``--help`` stays fast."""
    from actors.engine.docker import DockerEngine  # noqa: PLC0415

    return DockerEngine(settings.engine.url, timeout_s=settings.engine.timeout_s)


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


# Subcommands


def cmd_image_build(args: argparse.Namespace, console: Console) -> int:
    settings = _settings(args)
    tag = settings.worker.image
    try:
        image_id, built = ensure_base_image(make_engine(settings), tag, force=args.force)
    except WorkerImageError as exc:
        console.warn(f"cannot build {tag}: {exc}")
        return FAILED
    except EngineError as exc:
        console.warn(f"cannot build {tag}: {exc}")
        return FAILED
    short = image_id.removeprefix("sha256:")[:12]
    console.say(f"built {tag} ({short})" if built else f"{tag} is up to date ({short})")
    return OK


def cmd_doctor(args: argparse.Namespace, console: Console) -> int:
    """Check what ``snapyard run`` needs, each check saying what to do when it fails."""
    source = config_path_from_env(args.config, os.environ)
    try:
        settings = _settings(args)
    except SettingsError as exc:
        console.say(f"FAIL  config {source or '(defaults)'}: {exc}")
        return USAGE
    console.say(f"ok    config: {source or 'built-in defaults'}")
    healthy = True
    engine = make_engine(settings)
    try:
        engine.ping()
    except EngineError as exc:
        console.say(f"FAIL  engine: {exc}")
        console.say(f"FAIL  base image {settings.worker.image}: not checked, no engine")
        return FAILED
    console.say(f"ok    engine: {engine.describe()}")
    try:
        image = engine.inspect_image(settings.worker.image)
    except ImageMissing:
        console.say(f"FAIL  base image {settings.worker.image}: missing; {_IMAGE_HINT}")
        healthy = False
    except EngineError as exc:
        console.say(f"FAIL  base image {settings.worker.image}: {exc}")
        healthy = False
    else:
        short = image.id.removeprefix("sha256:")[:12]
        note = ""
        try:
            if image.labels.get(DIGEST_LABEL) != build_context().digest:
                note = f" (older than config/worker; {_IMAGE_HINT} to refresh)"
        except WorkerImageError as exc:
            note = f" (cannot rebuild it here: {exc})"
        console.say(f"ok    base image {settings.worker.image}: {short}{note}")
    return OK if healthy else FAILED


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    # The supervisor lands here; until then, `run` is a readiness check.
    return cmd_doctor(args, console)


Command = Callable[[argparse.Namespace, Console], int]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snapyard",
        description="Run every job in its own Docker worker and reuse snapshots of clean runs.",
    )
    parser.add_argument(
        "--config", help="TOML settings file (default: $SNAPYARD_CONFIG, config/snapyard.toml)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    image = commands.add_parser("image", help="manage the base worker image")
    image_commands = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    build = image_commands.add_parser("build", help="build the base worker image if it changed")
    build.add_argument("--force", action="store_true", help="build even if it is up to date")
    build.set_defaults(handler=cmd_image_build)

    commands.add_parser("doctor", help="check config, engine and base image").set_defaults(
        handler=cmd_doctor
    )
    commands.add_parser("run", help="run the supervisor").set_defaults(handler=cmd_run)
    return parser


def main(
    argv: list[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    console = Console(out or sys.stdout, err or sys.stderr)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse has already printed the usage.
        return exc.code if isinstance(exc.code, int) else USAGE
    handler: Command = args.handler
    try:
        return handler(args, console)
    except SettingsError as exc:
        console.warn(f"configuration error: {exc}")
        return USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
