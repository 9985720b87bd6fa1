"""The throwaway PostgreSQL of the tests and the demo (``actors.localcluster``)."""

from __future__ import annotations

import socket
from pathlib import Path

import psycopg
import pytest

from actors.localcluster import LocalPostgres, postgres

pytestmark = pytest.mark.postgres


def test_a_port_taken_before_the_server_binds_it_is_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Parallel sessions probe ports at once: losing the race must not fail the server."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = int(squatter.getsockname()[1])
        probes = iter([taken])
        real = postgres.free_port
        monkeypatch.setattr(postgres, "free_port", lambda: next(probes, None) or real())
        with LocalPostgres() as server:
            assert server.port != taken
            with psycopg.connect(server.url) as conn:
                assert conn.execute("SELECT current_database()").fetchone() == ("snapyard",)
            where = Path(server.dir)
    assert not where.exists()  # everything it made is gone
