"""The ``snapyard`` command.

``run`` and ``demo`` host a supervisor in this process; every other command
is a thin client of the HTTP API, so it works the same against a supervisor
started by systemd, by ``make run`` or in another terminal. Exit codes are a
contract scripts rely on: 0 ok, 1 the job failed (or the request was
refused), 2 usage or configuration error, 3 the supervisor is unreachable.

This module parses and dispatches; each command lives in the module that its
imports belong to (client commands, in-process commands, doctor) and is
imported only when it runs, so ``snapyard --help`` never loads Docker, pykka,
Sentry or the actor system.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import NoReturn, TextIO, cast

from actors.cli_common import (
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CliError,
    Command,
)
from actors.model import JobState

__all__ = [
    "EXIT_JOB_FAILED",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "main",
]


def _lazy(module: str, name: str) -> Command:
    """A command whose module is imported when it runs, not when the parser is built."""

    def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
        command = cast(Command, getattr(importlib.import_module(module), name))
        return command(args, out, err)

    return run


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so ``main`` returns the code."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{self.prog}: {message}\n{self.format_usage().rstrip()}", EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    # SUPPRESS: a subcommand's parser must not reset a --config given before it.
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="config file (default: $SNAPYARD_CONFIG, else the built-in defaults)",
    )
    parser = _Parser(
        prog="snapyard",
        description="Run every job in its own Docker worker container; reuse snapshots of clean runs.",
        parents=[common],
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    run = sub.add_parser(
        "run", parents=[common], help="the supervisor and its API, in the foreground"
    )
    run.add_argument(
        "--drain", action="store_true", help="on SIGTERM, let running jobs finish first"
    )
    run.set_defaults(func=_lazy("actors.cli_local", "cmd_run"))

    submit = sub.add_parser("submit", parents=[common], help="submit a job")
    submit.add_argument("--project", required=True)
    submit.add_argument("--work-item", required=True)
    submit.add_argument("--agent-type", default="default")
    submit.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    submit.add_argument("--timeout", type=float, metavar="SECONDS")
    submit.add_argument(
        "--wait", action="store_true", help="wait for the job to end; exit 1 unless it succeeded"
    )
    submit.add_argument("--json", action="store_true")
    submit.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARG...")
    submit.set_defaults(func=_lazy("actors.cli_jobs", "cmd_submit"))

    jobs = sub.add_parser("jobs", parents=[common], help="list jobs, newest first")
    jobs.add_argument("--state", choices=[s.value for s in JobState])
    jobs.add_argument("--project")
    jobs.add_argument("--limit", type=int, default=100)
    jobs.add_argument("--json", action="store_true")
    jobs.set_defaults(func=_lazy("actors.cli_jobs", "cmd_jobs"), jobs_cmd=None)
    jobs_sub = jobs.add_subparsers(dest="jobs_cmd", metavar="{prune}", parser_class=_Parser)
    prune_jobs = jobs_sub.add_parser(
        "prune", parents=[common], help="delete finished jobs older than supervisor.retention_s"
    )
    prune_jobs.add_argument("--json", action="store_true")

    job = sub.add_parser("job", parents=[common], help="show one job")
    job.add_argument("id")
    job.add_argument("--json", action="store_true")
    job.add_argument("--logs", action="store_true", help="also print the tail of its output")
    job.add_argument(
        "--follow",
        action="store_true",
        help="print its output as it is written until it ends; exit 1 unless it succeeded",
    )
    job.set_defaults(func=_lazy("actors.cli_jobs", "cmd_job"))

    events = sub.add_parser(
        "events", parents=[common], help="print job state changes as they happen"
    )
    events.add_argument(
        "--job", metavar="ID", help="only this job, until it ends (exit 1 unless it succeeded)"
    )
    events.add_argument("--json", action="store_true", help="one JSON object a line")
    events.set_defaults(func=_lazy("actors.cli_jobs", "cmd_events"))

    cancel = sub.add_parser("cancel", parents=[common], help="cancel a queued or running job")
    cancel.add_argument("id")
    cancel.add_argument("--json", action="store_true")
    cancel.set_defaults(func=_lazy("actors.cli_jobs", "cmd_cancel"))

    snaps = sub.add_parser("snapshots", parents=[common], help="list, remove or prune snapshots")
    snaps.add_argument("--json", action="store_true")
    snaps.set_defaults(func=_lazy("actors.cli_jobs", "cmd_snapshots"), snapshots_cmd=None)
    snaps_sub = snaps.add_subparsers(
        dest="snapshots_cmd", metavar="{rm,prune}", parser_class=_Parser
    )
    rm = snaps_sub.add_parser(
        "rm", parents=[common], help="invalidate a snapshot and delete its image"
    )
    rm.add_argument("project")
    rm.add_argument("work_item")
    rm.add_argument("--json", action="store_true")
    prune = snaps_sub.add_parser("prune", parents=[common], help="run the eviction sweep now")
    prune.add_argument("--json", action="store_true")

    hosts = sub.add_parser("hosts", parents=[common], help="list a cluster's hosts and leases")
    hosts.add_argument("--json", action="store_true")
    hosts.set_defaults(func=_lazy("actors.cli_jobs", "cmd_hosts"))

    doctor = sub.add_parser(
        "doctor", parents=[common], help="check the engine, base image, config, store and API port"
    )
    doctor.set_defaults(func=_lazy("actors.doctor", "cmd_doctor"))

    demo = sub.add_parser(
        "demo", parents=[common], help="tell the snapshot story on the real engine"
    )
    demo.set_defaults(func=_lazy("actors.cli_local", "cmd_demo"))

    cluster_demo = sub.add_parser(
        "cluster-demo",
        parents=[common],
        help="start PostgreSQL, a registry and three hosts here, and tell the cluster story",
    )
    cluster_demo.set_defaults(func=_lazy("actors.cli_local", "cmd_cluster_demo"))

    image = sub.add_parser("image", parents=[common], help="the base worker image")
    image_sub = image.add_subparsers(
        dest="image_cmd", required=True, metavar="{build}", parser_class=_Parser
    )
    build = image_sub.add_parser("build", parents=[common], help="build the base worker image")
    build.add_argument("--force", action="store_true", help="rebuild even if it exists")
    build.set_defaults(func=_lazy("actors.cli_local", "cmd_image_build"))
    return parser


def main(
    argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run one ``snapyard`` command; return its exit code (never raises for user errors)."""
    out = out or sys.stdout
    err = err or sys.stderr
    # Read before parsing: a usage error (a bad --limit) must be JSON too.
    as_json = "--json" in (sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
        as_json = bool(getattr(args, "json", False))
        func: Command = args.func
        return func(args, out, err)
    except CliError as exc:
        message = str(exc) if str(exc).startswith("snapyard") else f"snapyard: {exc}"
        _report(message, exc.field, as_json, err)
        return exc.code
    except (ValueError, UnicodeError) as exc:
        # An API address or an ID that cannot go into a URL (http.client.InvalidURL
        # is a ValueError): the caller's input. The message names no env value.
        message = f"snapyard: cannot send that request: {type(exc).__name__}: {exc}"
        _report(message, None, as_json, err)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except BrokenPipeError:
        # `snapyard jobs | head` closed the pipe: what was wanted was read. Point
        # stdout at /dev/null so the interpreter's final flush cannot fail again.
        if out is sys.stdout:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _report(message: str, field: str | None, as_json: bool, err: TextIO) -> None:
    """An error for people, or with ``--json`` the API's error shape, on stderr."""
    if as_json:
        error = message.removeprefix("snapyard: ")
        print(json.dumps({"error": error, "field": field}, ensure_ascii=False), file=err)
    else:
        print(message, file=err)


if __name__ == "__main__":
    sys.exit(main())
