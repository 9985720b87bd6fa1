"""``snapyard run`` as its own process, and the CLI in this one: what an operator does."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from actors.cli import main
from actors.client import ApiClient, ApiUnreachable

START_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Supervisor:
    process: subprocess.Popen[bytes]
    env: dict[str, str]
    project: str
    url: str
    log: Path


def cli(env: Mapping[str, str], *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        code = main(list(argv), out=out, err=err)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return code, out.getvalue(), err.getvalue()


def start_run(env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "actors.cli", "run"],
            env={**os.environ, **env},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


@contextmanager
def running_supervisor(
    tmp_path: Path, project: str, extra_env: Mapping[str, str]
) -> Iterator[Supervisor]:
    """A `snapyard run` that answers /healthz; killed afterwards if still up."""
    port = free_port()
    env = {
        "SNAPYARD_API": f"127.0.0.1:{port}",
        "SNAPYARD_DATA_DIR": str(tmp_path / "data"),
        "SNAPYARD_LOG__FORMAT": "json",
        **extra_env,
    }
    log = tmp_path / "supervisor.log"
    process = start_run(env, log)
    url = f"http://127.0.0.1:{port}"
    client = ApiClient(url, timeout_s=5)
    deadline = time.monotonic() + START_S
    while True:
        try:
            if client.health()[0]:
                break
        except ApiUnreachable:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"snapyard run did not come up:\n{log.read_text()}")
        time.sleep(0.1)
    try:
        yield Supervisor(process, env, project, url, log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
