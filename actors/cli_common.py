"""What every ``snapyard`` command shares: exit codes, the error that carries
one, settings loading and the engine factory.

Light on purpose: ``snapyard --help`` imports this module, so nothing here
imports Docker, pykka, Sentry or the actor system at module level.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

from actors.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from actors.engine.base import Engine

__all__ = [
    "EXIT_JOB_FAILED",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "CliError",
    "Command",
    "config_error",
    "make_engine",
    "settings_of",
    "short_id",
]

# Exit codes are a contract scripts rely on.
EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

Command = Callable[[argparse.Namespace, TextIO, TextIO], int]


class CliError(Exception):
    """Stop the command: print ``message`` to stderr and exit with ``code``.

    ``field`` names the input at fault when the API said so (its 422s), so a
    ``--json`` caller gets the same ``{"error", "field"}`` shape the API sends.
    """

    def __init__(self, message: str, code: int, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field


def config_error(exc: SettingsError) -> CliError:
    """A bad setting is the caller's to fix: exit 2, naming the key and the rule."""
    return CliError(f"configuration error: {exc.key} = {exc.value!r}: {exc.allowed}", EXIT_USAGE)


def settings_of(args: argparse.Namespace) -> Settings:
    """The settings for this invocation (``--config``, env, defaults)."""
    try:
        return load_settings(getattr(args, "config", None))
    except SettingsError as exc:
        raise config_error(exc) from None


def short_id(image_id: str | None) -> str:
    """An image ID as people read it: 12 hex digits, no ``sha256:``."""
    return image_id.removeprefix("sha256:")[:12] if image_id else "-"


def make_engine(settings: Settings) -> Engine:
    """The engine the settings point at; the docker SDK is imported only when used."""
    from actors.engine.docker import DockerEngine  # noqa: PLC0415 - keeps --help fast

    return DockerEngine(
        settings.engine.url,
        timeout_s=settings.engine.timeout_s,
        secrets_dir=str(settings.data_dir / "secrets"),
        helper_dir=str(settings.data_dir / "helper"),  # the env helper
    )
