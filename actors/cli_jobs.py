"""The client commands of ``snapyard``: submit, jobs, job, cancel, snapshots.

Each is a thin client of the HTTP API, so it works the same against a
supervisor started by systemd, by ``make run`` or in another terminal. It
speaks the API through ``actors.client`` and ``actors.wire`` only: the
actor system is never imported here.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, TextIO

from actors.cli_common import (
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CliError,
    Command,
    settings_of,
    short_id,
)
from actors.client import ApiClient, ApiError, ApiUnreachable
from actors.model import JobState
from actors.wire import parse_time

__all__ = ["cmd_cancel", "cmd_events", "cmd_job", "cmd_jobs", "cmd_snapshots", "cmd_submit"]

_POLL_FIRST_S = 0.1
_POLL_MAX_S = 1.0
# While waiting, a supervisor that answers 503 (restarting) is polled this many times.
_POLL_503_TRIES = 60


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
    t0 = parse_time(start)
    t1 = parse_time(end) if end else datetime.now(t0.tzinfo)
    return f"{(t1 - t0).total_seconds():.1f}s"


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


# --- the API ----------------------------------------------------------------------


def _client(args: argparse.Namespace) -> ApiClient:
    return ApiClient.from_settings(settings_of(args).api)


def _api_error(exc: ApiError) -> CliError:
    """422 and 400 are the caller's input (usage); the rest a refused request."""
    code = EXIT_USAGE if exc.status in (400, 413, 422) else EXIT_JOB_FAILED
    if exc.status == 503:  # its message says what is away: the supervisor, or its store
        return CliError(exc.message, EXIT_UNREACHABLE)
    if exc.status == 401:
        return CliError(
            f"the supervisor refused the request: {exc.message} "
            "(set SNAPYARD_API_TOKEN or [api] token)",
            EXIT_USAGE,
        )
    return CliError(exc.message, code, exc.field)


def _speaks_api(command: Command) -> Command:
    """Turn the API's failures into the CLI's exit codes (3 unreachable, 1 or 2 refused)."""

    @functools.wraps(command)
    def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
        try:
            return command(args, out, err)
        except ApiUnreachable as exc:
            raise CliError(f"snapyard: {exc}", EXIT_UNREACHABLE) from None
        except ApiError as exc:
            cli = _api_error(exc)
            raise CliError(f"snapyard: {cli}", cli.code, cli.field) from None

    return run


# --- commands ------------------------------------------------------------------------


def _parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    first: dict[str, int] = {}
    for number, pair in enumerate(pairs, start=1):
        name, sep, value = pair.partition("=")
        if not sep or not name:
            # Never echo the argument: `--env "$TOKEN"` is the usual slip.
            raise CliError(f"--env #{number}: expected NAME=VALUE", EXIT_USAGE)
        if name in first:
            # As the API refuses a repeated JSON key: which one was meant is a guess.
            raise CliError(
                f"--env #{number}: {name} is already set by --env #{first[name]}; give it once",
                EXIT_USAGE,
                "env",
            )
        first[name] = number
        env[name] = value
    return env


@_speaks_api
def cmd_submit(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
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
    return _result(job)


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


@_speaks_api
def cmd_jobs(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.jobs_cmd == "prune":
        deleted = _client(args).prune_jobs()
        if args.json:
            _print_json({"deleted": deleted}, out)
        else:
            print(f"deleted {deleted} finished job(s)", file=out)
        return EXIT_OK
    jobs = _client(args).jobs(state=args.state, project=args.project, limit=args.limit)
    if args.json:
        _print_json(jobs, out)
    else:
        _table(_JOB_HEADERS, _job_rows(jobs), out)
    return EXIT_OK


def _result(job: Mapping[str, Any]) -> int:
    """As for ``submit --wait``: 0 only if the job succeeded."""
    return EXIT_OK if job["state"] == JobState.SUCCEEDED else EXIT_JOB_FAILED


def _follow(client: ApiClient, job_id: str, out: TextIO, err: TextIO) -> int:
    """Print the job's output as it is written; the job's result is the exit code."""
    try:
        for text in client.follow_logs(job_id):
            out.write(text)
            out.flush()
    except KeyboardInterrupt:
        raise CliError(f"stopped following; job {job_id} goes on", 130) from None
    job = _poll(client, client.job(job_id))
    exit_code = "-" if job["exit_code"] is None else job["exit_code"]
    print(f"job {job['id']}: {job['state']} (exit code {exit_code})", file=err)
    return _result(job)


@_speaks_api
def cmd_job(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    client = _client(args)
    if args.follow:
        return _follow(client, args.id, out, err)
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


@_speaks_api
def cmd_events(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Print job state changes as they happen; with --job, until that job ends."""
    last = None
    try:
        for event in _client(args).events(args.job):
            last = event
            if args.json:
                fields = {"seq": event.seq, "id": event.job_id, "state": event.state}
                print(json.dumps({**fields, "time": event.time}), file=out, flush=True)
            else:
                print(f"{_when(event.time)}  {event.job_id}  {event.state}", file=out, flush=True)
    except KeyboardInterrupt:
        return EXIT_OK  # the usual way to stop watching
    if args.job:
        return _result({"state": last.state if last else None})
    raise CliError("the supervisor closed the event stream (stopping?)", EXIT_UNREACHABLE)


@_speaks_api
def cmd_cancel(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    job = _client(args).cancel(args.id)
    if args.json:
        _print_json(job, out)
    elif (handed := job.get("cancel_handed_to")) is not None:
        api = f" (its API at {handed['api']})" if handed.get("api") else ""
        print(
            f"job {job['id']}: {job['state']} on host {handed['host']}{api}; "
            "the cancel was handed to it",
            file=out,
        )
    else:
        print(f"job {job['id']}: {job['state']}", file=out)
    return EXIT_OK


@_speaks_api
def cmd_hosts(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    hosts = _client(args).hosts()
    if args.json:
        _print_json(hosts, out)
    elif not hosts:
        print("a single host: no [cluster] database_url is set", file=out)
    else:
        _table(_HOST_HEADERS, [_host_row(h) for h in hosts], out)
    return EXIT_OK


_HOST_HEADERS = ("HOST", "STATE", "RUNNING", "LAST SEEN", "LEASE UNTIL", "API")


def _host_row(h: Mapping[str, Any]) -> list[object]:
    """A host whose lease ended runs nothing here any more (its jobs are rescued):
    its last reported running count is stale, so RUNNING is '-'."""
    live = bool(h["live"])
    return [
        h["host_id"],
        ("draining" if h["draining"] else "live") if live else "lease ended",
        f"{h['running']}/{h['max_workers']}" if live else "-",
        _when(h["last_seen"]),
        _when(h["lease_until"]),
        h["api"],
    ]


# OWN is what the snapshot adds (what max_total_bytes counts); SIZE its whole image.
_SNAPSHOT_HEADERS = (
    "PROJECT",
    "WORK ITEM",
    "IMAGE",
    "OWN",
    "SIZE",
    "LAYERS",
    "CREATED",
    "LAST USED",
)


def _sized(s: Mapping[str, Any]) -> bool:
    """Whether the entry's sizes are known: another host's snapshot, from the
    cluster's index, has none (0 layers; a committed snapshot has at least one)."""
    return not ("host" in s and s["layers"] == 0)


def _snapshot_rows(snaps: Sequence[Mapping[str, Any]]) -> list[list[object]]:
    return [
        [
            s["project"],
            s["work_item"],
            short_id(s["image_id"]),
            "-" if s.get("own_bytes") is None else _size(s["own_bytes"]),
            _size(s["size_bytes"]) if _sized(s) else "-",
            s["layers"] if _sized(s) else "-",
            _when(s["created_at"]),
            _when(s["last_used_at"]),
        ]
        for s in snaps
    ]


@_speaks_api
def cmd_snapshots(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
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
        return EXIT_OK
    headers: tuple[str, ...] = _SNAPSHOT_HEADERS
    rows = _snapshot_rows(snaps)
    if any("host" in s for s in snaps):  # a cluster's: where each one is
        headers = (*headers, "HOST")
        rows = [[*row, s.get("host")] for row, s in zip(rows, snaps, strict=True)]
    _table(headers, rows, out)
    return EXIT_OK
