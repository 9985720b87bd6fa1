"""The benchmark harness's own logic: its judges, its report, its fault relay.

The scenarios themselves run in ``python -m bench --quick`` (``make test``);
these tests hold the parts that decide what a run reports, with no timing.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.faults import OutageRelay, in_outage, overlapping
from bench.model import Figure, ScenarioResult
from bench.report import compare, markdown, missed, with_summary
from bench.s_engine import Timeline, dispatch_latencies
from bench.scenarios import SCENARIOS, Scenario, register
from tests.waiting import eventually


def test_the_registry_holds_the_issues_scenarios_1_to_9_in_order() -> None:
    numbered = sorted((s.number, name) for name, s in SCENARIOS.items() if s.number <= 9)
    assert [n for n, _ in numbered] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert not SCENARIOS["cluster"].docker  # MemoryEngines and a throwaway PostgreSQL
    # Process figures (CPU, RSS) start clean in their own interpreter.
    assert SCENARIOS["actor_cost"].own_process
    assert SCENARIOS["growth"].own_process
    assert not SCENARIOS["growth"].docker


def test_a_scenario_name_registers_once() -> None:
    with pytest.raises(ValueError, match="twice"):
        register(Scenario("dispatch", 1, SCENARIOS["dispatch"].run))


def test_the_outage_schedule_is_dark_for_the_end_of_each_period() -> None:
    assert not in_outage(0.0, 10.0, 2.0)
    assert not in_outage(7.9, 10.0, 2.0)
    assert in_outage(8.0, 10.0, 2.0)
    assert in_outage(19.9, 10.0, 2.0)
    assert not in_outage(20.1, 10.0, 2.0)
    assert not in_outage(9.0, 10.0, 0.0)


def test_overlapping_counts_runs_that_began_while_their_key_was_busy() -> None:
    intervals = {
        "a": [(0.0, 5.0), (1.0, 2.0), (3.0, 4.0), (6.0, 7.0)],  # two inside the first
        "b": [(0.0, 1.0), (1.0, 2.0)],  # back to back is not at once
    }
    assert overlapping(intervals) == 2


def test_dispatch_latency_counts_only_jobs_that_waited_for_a_slot() -> None:
    timelines = [
        Timeline(created=0.0, starting=0.0, running=0.5, finished=1.0),
        Timeline(created=0.0, starting=1.0, running=1.25, finished=2.0),  # slot freed at 1.0
        Timeline(created=1.5, starting=2.0, running=2.5, finished=3.0),  # arrived after 1.0
    ]
    # The third was created after the first end but got the second's slot at 2.0.
    assert dispatch_latencies(timelines) == [0.25, 0.5]


def _result() -> ScenarioResult:
    return ScenarioResult(
        name="dispatch",
        title="1. Dispatch",
        figures=[
            Figure("ratio", 1.2, "ratio", "lower", True, "medians"),
            Figure("rate", 3000.0, "jobs/s", "higher", True),
            Figure("raw_ms", 10.0, "ms", "lower"),
        ],
        targets={"ratio": ("<=", 1.05), "rate": (">=", 2000.0)},
    )


def test_targets_are_judged_and_a_miss_says_by_how_much() -> None:
    result = _result()
    assert result.verdicts() == {"ratio": False, "rate": True}
    assert missed([result]) == ["dispatch.ratio = 1.2 (target <= 1.05; 1.14x the limit)"]


def test_results_survive_json_with_their_targets() -> None:
    result = _result()
    again = ScenarioResult.from_json(result.to_json())
    assert again.targets == result.targets
    assert again.verdicts() == result.verdicts()


def test_the_markdown_table_shows_each_target_met_or_missed_and_the_load() -> None:
    result = _result()
    meta = {
        "created": "2026-11-30T00:00:00+00:00",
        "mode": "quick",
        "git": "abc1234",
        "numbers": {"dispatch": 1},
        "host": {"cpus": 2, "load_before": 1.5, "load_after": 2.5},
    }
    baselines = {"dispatch.ratio": {"value": 1.0}}
    text = markdown([result], compare([result], baselines, 0.5), {}, meta)
    assert "| 1 | dispatch | ratio | 1.2x  | <= 1.05x | MISSED | medians |" in text
    assert "| 1 | dispatch | rate | 3000 jobs/s | >= 2000 | met |  |" in text
    assert "load average (1 min) 1.5 before, 2.5 after" in text
    assert "+20%" in text  # against the baseline


def test_the_readme_gets_the_summary_table_between_its_markers() -> None:
    result = _result()
    meta = {
        "created": "now",
        "mode": "full",
        "git": "abc1234",
        "numbers": {"dispatch": 1},
        "host": {"cpus": 2, "load_before": 1.0, "load_after": 1.0},
    }
    text = markdown([result], compare([result], {}, 0.5), {}, meta)
    readme = "intro\n<!-- bench-table -->\nold table\n<!-- /bench-table -->\nafter\n"
    updated = with_summary(readme, text)
    assert "old table" not in updated
    assert "| 1 | dispatch | ratio | 1.2x  | <= 1.05x | MISSED | medians |" in updated
    assert "## Every figure" not in updated
    assert updated.startswith("intro\n")
    assert updated.endswith("after\n")
    assert with_summary(updated, text) == updated  # idempotent


@pytest.fixture
def echo_server(tmp_path: Path) -> Iterator[Path]:
    """A unix-socket echo server standing in for dockerd behind the relay."""
    path = tmp_path / "echo.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1024):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    yield path
    server.close()


def _connect(relay: OutageRelay) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5.0)
    sock.connect(str(relay.path))
    return sock


def test_the_relay_passes_bytes_then_cuts_every_connection_when_dark(
    echo_server: Path, tmp_path: Path
) -> None:
    # Lit for the first 0.5 s of each second: the test acts inside those windows.
    with OutageRelay(str(echo_server), tmp_path / "relay.sock", 1.0, 0.5) as relay:
        eventually(relay.dark, lambda dark: not dark, "the relay lit")
        live = _connect(relay)
        live.sendall(b"ping")
        assert live.recv(16) == b"ping"
        eventually(relay.dark, bool, "the relay dark")
        assert live.recv(16) == b""  # cut: the peer's end is closed
        refused = _connect(relay)
        assert refused.recv(16) == b""  # accepted and closed at once
        eventually(lambda: relay.outages, lambda n: n >= 1, "an outage counted")
        live.close()
        refused.close()
