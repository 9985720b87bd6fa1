"""Docker's JSON read into the Engine's types, without the SDK or a daemon."""

from __future__ import annotations

from actors.engine._docker_json import (
    EVENT_ACTIONS,
    container_state,
    engine_event,
    label_filter,
    parse_time,
    since_param,
)


def test_times_keep_microseconds_of_nanosecond_stamps_and_zero_is_unset() -> None:
    assert parse_time("2024-01-02T03:04:05.123456789Z") == 1704164645.123456
    assert parse_time("0001-01-01T00:00:00Z") is None
    assert parse_time(None) is None


def test_since_is_seconds_dot_nanoseconds() -> None:
    """Docker parses "secs.nanos", so a bare ".5" would mean 5 ns."""
    assert since_param(0.5) == "0.500000000"
    assert since_param(12.0) == "12.000000000"


def test_an_exit_event_splits_the_exit_code_from_the_labels() -> None:
    raw = {
        "Type": "container",
        "Action": "die",
        "timeNano": 2_000_000_000,
        "Actor": {"ID": "c1", "Attributes": {"exitCode": "3", "image": "x", "team": "a"}},
    }
    event = engine_event(raw)
    assert event is not None
    assert (event.kind, event.id, event.time, event.exit_code) == ("container_exited", "c1", 2.0, 3)
    assert event.labels == {"team": "a"}
    assert engine_event({"Type": "network", "Action": "connect"}) is None
    assert set(EVENT_ACTIONS) == {"die", "oom", "delete", "untag"}


def test_a_running_container_has_no_exit_code_yet() -> None:
    """Docker reports ExitCode 0 before a container exits; that is not a success."""
    state = container_state(
        {"Id": "c1", "State": {"Status": "running", "ExitCode": 0}, "Created": None}
    )
    assert state.exit_code is None
    assert label_filter({}) == {}
    assert label_filter({"a": "1"}) == {"label": ["a=1"]}
