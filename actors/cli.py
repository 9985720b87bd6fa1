"""The ``snapyard`` command.

``run`` and ``demo`` host a supervisor in this process; every other command
is a thin client of the HTTP API, so it works the same against a supervisor
started by systemd, by ``make run`` or in another terminal. Exit codes are a
contract scripts rely on: 0 ok, 1 the job failed (or the request was
refused), 2 usage or configuration error, 3 the supervisor is unreachable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn, TextIO

from actors.api import ApiServer, check_bind_allowed
from actors.app import run_forever
from actors.client import ApiClient, ApiError, ApiUnreachable
from actors.demo import run_demo
from actors.engine.base import Engine, EngineError, ImageMissing
from actors.model import JobState
from actors.settings import (
    LogSettings,
    Settings,
    SettingsError,
    config_path_from_env,
    load_settings,
)
from actors.store import SqliteStore
from actors.telemetry import setup_logging
from actors.worker_image import DIGEST_LABEL, WorkerImageError, build_context, ensure_base_image

__all__ = [
    "EXIT_JOB_FAILED",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "main",
]

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

_POLL_FIRST_S = 0.1
_POLL_MAX_S = 1.0
# While waiting, a supervisor that answers 503 (restarting) is polled this many times.
_POLL_503_TRIES = 60


class CliError(Exception):
    """Stop the command: print ``message`` to stderr and exit with ``code``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# --- output helpers -------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], out: TextIO) -> None:
    """Aligned columns two spaces apart; "-" marks an empty cell."""
    cells = [list(headers)] + [
        ["-" if c is None or c == "" else str(c) for c in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def _when(iso: str | None) -> str:
    return iso.replace("T", " ")[:19] if iso else "-"


def _took(job: Mapping[str, Any]) -> str:
    start, end = job.get("started_at"), job.get("finished_at")
    if not start:
        return "-"
    t0 = datetime.fromisoformat(start)
    t1 = datetime.fromisoformat(end) if end else datetime.now(t0.tzinfo)
    return f"{(t1 - t0).total_seconds():.1f}s"


def _short(image_id: str | None) -> str:
    return image_id.removeprefix("sha256:")[:12] if image_id else "-"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def _print_json(value: object, out: TextIO) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False), file=out)


def _origin(job: Mapping[str, Any]) -> str:
    if not job.get("image_id"):
        return "-"
    return "snapshot" if job.get("from_snapshot") else "base"


def _job_rows(jobs: Sequence[Mapping[str, Any]]) -> list[list[object]]:
    return [
        [
            j["id"],
            j["state"],
            j["project"],
            j["work_item"],
            j["agent_type"],
            _origin(j),
            j["exit_code"],
            _took(j),
            _when(j["created_at"]),
        ]
        for j in jobs
    ]


_JOB_HEADERS = ("ID", "STATE", "PROJECT", "WORK ITEM", "AGENT", "IMAGE", "EXIT", "TOOK", "CREATED")


def _print_job(job: Mapping[str, Any], out: TextIO) -> None:
    rows = [
        ("id", job["id"]),
        ("state", job["state"]),
        ("project", job["project"]),
        ("work item", job["work_item"]),
        ("agent type", job["agent_type"]),
        ("image", job["image_id"] or "-"),
        ("from snapshot", "yes" if job["from_snapshot"] else "no"),
        ("snapshot committed", "yes" if job["snapshot_committed"] else "no"),
        ("exit code", "-" if job["exit_code"] is None else job["exit_code"]),
        ("error", job["error"] or "-"),
        ("created", _when(job["created_at"])),
        ("started", _when(job["started_at"])),
        ("finished", _when(job["finished_at"])),
        ("took", _took(job)),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}", file=out)


# --- settings and the client ----------------------------------------------------


def _settings(args: argparse.Namespace) -> Settings:
    try:
        return load_settings(getattr(args, "config", None))
    except SettingsError as exc:
        raise CliError(
            f"configuration error: {exc.key} = {exc.value!r}: {exc.allowed}", EXIT_USAGE
        ) from None


def _client(args: argparse.Namespace) -> ApiClient:
    return ApiClient.from_settings(_settings(args).api)


def _api_error(exc: ApiError) -> CliError:
    """422 and 400 are the caller's input (usage); the rest a refused request."""
    code = EXIT_USAGE if exc.status in (400, 413, 422) else EXIT_JOB_FAILED
    if exc.status == 503:
        return CliError(f"the supervisor is not serving: {exc.message}", EXIT_UNREACHABLE)
    if exc.status == 401:
        return CliError(
            f"the supervisor refused the request: {exc.message} "
            "(set SNAPYARD_API_TOKEN or [api] token)",
            EXIT_USAGE,
        )
    return CliError(exc.message, code)


# --- client commands ------------------------------------------------------------


def _parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for number, pair in enumerate(pairs, start=1):
        name, sep, value = pair.partition("=")
        if not sep or not name:
            # Never echo the argument: `--env "$TOKEN"` is the usual slip.
            raise CliError(f"--env #{number}: expected NAME=VALUE", EXIT_USAGE)
        env[name] = value
    return env


def _cmd_submit(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    spec: dict[str, Any] = {
        "project": args.project,
        "work_item": args.work_item,
        "agent_type": args.agent_type,
    }
    if command:
        spec["command"] = command
    if args.env:
        spec["env"] = _parse_env(args.env)
    if args.timeout is not None:
        spec["timeout_s"] = args.timeout
    client = _client(args)
    job = client.submit(spec)
    if not args.wait:
        if args.json:
            _print_json(job, out)
        else:
            print(
                f"submitted job {job['id']} ({job['project']}/{job['work_item']}): {job['state']}",
                file=out,
            )
        return EXIT_OK
    job = _wait(client, job, err, progress=err.isatty() and not args.json)
    if args.json:
        _print_json(job, out)
    else:
        _print_job(job, out)
    return EXIT_OK if job["state"] == JobState.SUCCEEDED else EXIT_JOB_FAILED


def _wait(client: ApiClient, job: dict[str, Any], err: TextIO, progress: bool) -> dict[str, Any]:
    """Poll until the job ends; a progress line on a terminal, nothing otherwise."""
    delay = _POLL_FIRST_S
    started = time.monotonic()
    try:
        while not JobState(job["state"]).terminal:
            if progress:
                elapsed = time.monotonic() - started
                print(
                    f"\rjob {job['id']}: {job['state']:<9} {elapsed:6.1f}s",
                    end="",
                    file=err,
                    flush=True,
                )
            time.sleep(delay)
            delay = min(delay * 1.5, _POLL_MAX_S)
            job = _poll(client, job)
    except KeyboardInterrupt:
        if progress:
            print(file=err)
        raise CliError(
            f"stopped waiting; job {job['id']} goes on (follow it with `snapyard job {job['id']}`)",
            130,
        ) from None
    if progress:
        print(f"\rjob {job['id']}: {job['state']:<9} {time.monotonic() - started:6.1f}s", file=err)
    return job


def _poll(client: ApiClient, job: dict[str, Any]) -> dict[str, Any]:
    """The job again; a supervisor briefly not serving (503: restarting) is waited out."""
    for _ in range(_POLL_503_TRIES):
        try:
            fresh: dict[str, Any] = client.job(job["id"])
        except ApiError as exc:
            if exc.status != 503:
                raise
            time.sleep(_POLL_MAX_S)
            continue
        return fresh
    return dict(client.job(job["id"]))


def _cmd_jobs(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    jobs = _client(args).jobs(state=args.state, project=args.project, limit=args.limit)
    if args.json:
        _print_json(jobs, out)
    else:
        _table(_JOB_HEADERS, _job_rows(jobs), out)
    return EXIT_OK


def _cmd_job(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    client = _client(args)
    job = client.job(args.id)
    logs = client.logs(args.id) if args.logs else None
    if args.json:
        _print_json(job if logs is None else {**job, "logs": logs}, out)
        return EXIT_OK
    _print_job(job, out)
    if logs is not None:
        print("--- logs (tail) ---", file=out)
        print(logs.rstrip("\n") if logs else "(no output)", file=out)
    return EXIT_OK


def _cmd_cancel(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    job = _client(args).cancel(args.id)
    if args.json:
        _print_json(job, out)
    else:
        print(f"job {job['id']}: {job['state']}", file=out)
    return EXIT_OK


_SNAPSHOT_HEADERS = ("PROJECT", "WORK ITEM", "IMAGE", "SIZE", "LAYERS", "CREATED", "LAST USED")


def _snapshot_rows(snaps: Sequence[Mapping[str, Any]]) -> list[list[object]]:
    return [
        [
            s["project"],
            s["work_item"],
            _short(s["image_id"]),
            _size(s["size_bytes"]),
            s["layers"],
            _when(s["created_at"]),
            _when(s["last_used_at"]),
        ]
        for s in snaps
    ]


def _cmd_snapshots(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    client = _client(args)
    if args.snapshots_cmd == "rm":
        result = client.remove_snapshot(args.project, args.work_item)
        if args.json:
            _print_json(result, out)
        else:
            print(
                f"removed the snapshot of {args.project}/{args.work_item} and its image", file=out
            )
        return EXIT_OK
    if args.snapshots_cmd == "prune":
        evicted = client.prune()
        if args.json:
            _print_json(evicted, out)
        elif evicted:
            print(f"evicted {len(evicted)} snapshot(s):", file=out)
            _table(_SNAPSHOT_HEADERS, _snapshot_rows(evicted), out)
        else:
            print("nothing to evict", file=out)
        return EXIT_OK
    snaps = client.snapshots()
    if args.json:
        _print_json(snaps, out)
    else:
        _table(_SNAPSHOT_HEADERS, _snapshot_rows(snaps), out)
    return EXIT_OK


# --- the parser -----------------------------------------------------------------

Command = Callable[[argparse.Namespace, TextIO, TextIO], int]


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
        help="config file (default: $SNAPYARD_CONFIG, else config/snapyard.toml)",
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
    run.set_defaults(func=_cmd_run)

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
    submit.set_defaults(func=_cmd_submit)

    jobs = sub.add_parser("jobs", parents=[common], help="list jobs, newest first")
    jobs.add_argument("--state", choices=[s.value for s in JobState])
    jobs.add_argument("--project")
    jobs.add_argument("--limit", type=int, default=100)
    jobs.add_argument("--json", action="store_true")
    jobs.set_defaults(func=_cmd_jobs)

    job = sub.add_parser("job", parents=[common], help="show one job")
    job.add_argument("id")
    job.add_argument("--json", action="store_true")
    job.add_argument("--logs", action="store_true", help="also print the tail of its output")
    job.set_defaults(func=_cmd_job)

    cancel = sub.add_parser("cancel", parents=[common], help="cancel a queued or running job")
    cancel.add_argument("id")
    cancel.add_argument("--json", action="store_true")
    cancel.set_defaults(func=_cmd_cancel)

    snaps = sub.add_parser("snapshots", parents=[common], help="list, remove or prune snapshots")
    snaps.add_argument("--json", action="store_true")
    snaps.set_defaults(func=_cmd_snapshots, snapshots_cmd=None)
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

    doctor = sub.add_parser(
        "doctor", parents=[common], help="check the engine, base image, config, store and API port"
    )
    doctor.set_defaults(func=_cmd_doctor)

    demo = sub.add_parser(
        "demo", parents=[common], help="tell the snapshot story on the real engine"
    )
    demo.set_defaults(func=_cmd_demo)

    image = sub.add_parser("image", parents=[common], help="the base worker image")
    image_sub = image.add_subparsers(
        dest="image_cmd", required=True, metavar="{build}", parser_class=_Parser
    )
    build = image_sub.add_parser("build", parents=[common], help="build the base worker image")
    build.add_argument("--force", action="store_true", help="rebuild even if it exists")
    build.set_defaults(func=_cmd_image_build)
    return parser


def main(
    argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run one ``snapyard`` command; return its exit code (never raises for user errors)."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        args = _parser().parse_args(argv)
        func: Command = args.func
        return func(args, out, err)
    except CliError as exc:
        print(f"snapyard: {exc}" if not str(exc).startswith("snapyard") else str(exc), file=err)
        return exc.code
    except ApiUnreachable as exc:
        print(f"snapyard: {exc}", file=err)
        return EXIT_UNREACHABLE
    except ApiError as exc:
        cli = _api_error(exc)
        print(f"snapyard: {cli}", file=err)
        return cli.code
    except (ValueError, UnicodeError) as exc:
        # An API address or an ID that cannot go into a URL (http.client.InvalidURL
        # is a ValueError): the caller's input. The message names no env value.
        print(f"snapyard: cannot send that request: {type(exc).__name__}: {exc}", file=err)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


# --- in-process commands --------------------------------------------------------


def _cmd_run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    settings = _settings(args)
    try:
        # Bound before any actor starts: a taken port or an unsafe address is a
        # configuration error (exit 2), not a half-started supervisor.
        server = ApiServer(None, settings.api)
    except SettingsError as exc:
        raise CliError(
            f"configuration error: {exc.key} = {exc.value!r}: {exc.allowed}", EXIT_USAGE
        ) from None
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


_Check = tuple[str, bool, str, str]  # name, ok, what was found, what to do when not ok


def _check_store(settings: Settings) -> _Check:
    path = settings.data_dir / "snapyard.db"
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
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


def _cmd_demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    settings = _settings(args)
    # The story goes to stdout; the actors' expected warnings (the deleted
    # snapshot is the point of the story) would only blur it, errors do not.
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
    return run_demo(settings, engine, out)


_IMAGE_HINT = "build it with `make image` or `snapyard image build`"


def make_engine(settings: Settings) -> Engine:
    """The engine the settings point at; the docker SDK is imported only when used."""
    from actors.engine.docker import DockerEngine  # noqa: PLC0415 - keeps --help fast

    return DockerEngine(
        settings.engine.url,
        timeout_s=settings.engine.timeout_s,
        secrets_dir=str(settings.data_dir / "secrets"),
    )


def _check_engine(settings: Settings) -> tuple[Engine | None, list[_Check]]:
    """The engine, then the base image on it (skipped when there is no engine)."""
    tag = settings.worker.image
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
            ("base image", False, f"{tag}: not checked, no engine", "fix the engine first"),
        ]
    checks: list[_Check] = [("engine", True, engine.describe(), "")]
    try:
        image = engine.inspect_image(tag)
    except ImageMissing:
        checks.append(("base image", False, f"{tag}: missing", _IMAGE_HINT))
    except EngineError as exc:
        checks.append(("base image", False, f"{tag}: {exc}", _IMAGE_HINT))
    else:
        note = ""
        try:
            if image.labels.get(DIGEST_LABEL) != build_context().digest:
                note = f" (older than config/worker; {_IMAGE_HINT} to refresh)"
        except WorkerImageError as exc:
            note = f" (cannot rebuild it here: {exc})"
        checks.append(("base image", True, f"{tag}: {_short(image.id)}{note}", ""))
    return engine, checks


def _cmd_doctor(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
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
    checks.append(_check_store(settings))
    checks.append(_check_api_port(settings))
    return _print_checks(checks, out)


def _cmd_image_build(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    settings = _settings(args)
    tag = settings.worker.image
    try:
        image_id, built = ensure_base_image(make_engine(settings), tag, force=args.force)
    except (WorkerImageError, EngineError) as exc:
        raise CliError(f"cannot build {tag}: {exc}", EXIT_JOB_FAILED) from None
    print(
        f"built {tag} ({_short(image_id)})"
        if built
        else f"{tag} is up to date ({_short(image_id)})",
        file=out,
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
