"""Any input at all: refused at submit naming the field, or accepted and run to the end.

IDs come from the whole of Unicode (controls, surrogates, whitespace, empty,
10k characters), with env names and values, commands and timeouts of every
shape. ``validate_spec`` and the HTTP API must agree on what they refuse, and
what they accept must run to a terminal state on the MemoryEngine. Accepted
ID pairs must map to distinct, valid image names.
"""

from __future__ import annotations

import http.client
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from actor_kit import kit_settings
from budget import budget
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from waiting import eventually

from actors.api import ApiServer
from actors.api_routes import check_agent_type
from actors.app import Snapyard
from actors.engine.memory import MemoryContainer, MemoryEngine
from actors.labels import LABEL_ROLE
from actors.model import MAX_ID_LENGTH, InvalidJob, JobSpec, validate_spec
from actors.naming import snapshot_image_name
from actors.settings import Settings

BASE_TAG = "snapyard-worker:latest"
FIELDS = {"project", "work_item", "agent_type", "command", "env", "timeout_s"}
# Docker's reference grammar (distribution/reference): path components and a tag.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")

any_text = st.one_of(
    st.text(),  # every code point, surrogates included
    st.text(min_size=1, max_size=5),
    st.sampled_from(["", " ", "\t", "\n", "\x00", "\u2028", "\ud800", "a\x7fb", "\u200b"]),
    st.text(st.characters(codec="utf-8"), min_size=MAX_ID_LENGTH - 2, max_size=MAX_ID_LENGTH + 2),
    st.builds(lambda c, n: c * n, st.characters(), st.sampled_from([10_000, 201, 200])),
)
ids = st.one_of(any_text, st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True))
env_names = st.one_of(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True), any_text)
commands = st.one_of(
    st.none(),
    st.lists(any_text, max_size=4),
    st.lists(st.sampled_from(["sh", "-c", "exit 0", "exit 3"]), min_size=1, max_size=3),
    any_text,
    st.integers(),
)
timeouts = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.text(max_size=3),
)
envs = st.one_of(
    st.none(),
    st.dictionaries(env_names, any_text, max_size=3),
    st.lists(st.text(max_size=3), max_size=2),
)
bodies = st.fixed_dictionaries(
    {"project": ids, "work_item": ids},
    optional={"agent_type": ids, "command": commands, "env": envs, "timeout_s": timeouts},
)


def _policy(container: MemoryContainer) -> int:
    """The worker: ``exit N`` as the last word exits N; anything else succeeds."""
    last = (container.cmd or ("",))[-1]
    match = re.fullmatch(r"exit (\d+)", last)
    return int(match.group(1)) if match else 0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ApiServer, Snapyard]]:
    data_dir: Path = tmp_path_factory.mktemp("bad-input")
    settings = kit_settings(
        BASE_TAG,
        supervisor={"data_dir": str(data_dir), "tick_interval_s": 0.05},
        retry={"attempts": 2, "backoff_initial_s": 0.01, "backoff_max_s": 0.05},
        api={"host": "127.0.0.1", "port": 0, "token": ""},
    )
    engine = MemoryEngine(exit_policy=_policy)
    engine.add_image(BASE_TAG, labels={LABEL_ROLE: "base"}, cmd=("sh", "-c", "true"))
    app = Snapyard(settings, engine=engine).start()
    try:
        with ApiServer(app, settings.api) as server:
            yield server, app
    finally:
        app.stop(timeout_s=10.0)


def _post(server: ApiServer, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    # NaN and Infinity go out as JSON's non-standard literals, as a sloppy client sends them;
    # lone surrogates as \ud800 escapes, which a JSON parser turns back into them.
    data = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("POST", "/jobs", body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()
    return response.status, answer


def _validate(body: dict[str, Any]) -> JobSpec | InvalidJob:
    try:
        spec = validate_spec(**body)
        # The server has no [agent_types.NAME] table: any agent type but "default" is refused.
        check_agent_type(spec, Settings())
        return spec
    except InvalidJob as exc:
        return exc


@settings(max_examples=budget().bad_input_examples, suppress_health_check=list(HealthCheck))
@given(body=bodies)
def test_any_input_is_refused_naming_the_field_or_runs_to_the_end(
    served: tuple[ApiServer, Snapyard], body: dict[str, Any]
) -> None:
    server, app = served
    verdict = _validate(body)
    status, answer = _post(server, body)
    if isinstance(verdict, InvalidJob):
        assert verdict.field in FIELDS
        assert verdict.problem.strip()
        assert status == 422, (status, answer)
        assert answer["field"] == verdict.field
        assert answer["error"] == f"{verdict.field} {verdict.problem}"
        return
    assert status == 201, (status, answer)
    assert (answer["project"], answer["work_item"]) == (verdict.project, verdict.work_item)
    if verdict.timeout_s is not None:
        assert math.isfinite(verdict.timeout_s)
        assert verdict.timeout_s > 0
    job = eventually(
        lambda: app.get(answer["id"]),
        lambda j: j is not None and j.state.terminal,
        f"job {answer['id']} to end",
        timeout_s=20.0,
    )
    # A tiny timeout may fire first; an accepted job is never left queued or running.
    assert job.state.value in {"succeeded", "failed", "timed_out"}, job


@settings(max_examples=budget().bad_input_examples)
@given(first=st.tuples(ids, ids), second=st.tuples(ids, ids))
def test_accepted_id_pairs_map_to_distinct_valid_image_names(
    first: tuple[str, str], second: tuple[str, str]
) -> None:
    names = []
    for project, work_item in (first, second):
        try:
            validate_spec(project, work_item)
        except InvalidJob:
            return
        repository, tag = snapshot_image_name("snapyard-snapshot", project, work_item)
        assert _REPOSITORY.match(repository), repository
        assert len(repository) <= 255
        assert _TAG.match(tag), tag
        names.append(f"{repository}:{tag}")
    assert (names[0] == names[1]) == (first == second), (first, second, names)
