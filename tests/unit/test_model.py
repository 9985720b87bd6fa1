"""validate_spec: a JobSpec that exists can run; a refused one says which field to fix."""

from __future__ import annotations

import math
import unicodedata
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.model import MAX_ID_LENGTH, InvalidJob, Job, JobSpec, JobState, validate_spec

_REFUSED_CATEGORIES = ["Cc", "Cs", "Cn", "Co", "Zl", "Zp"]
printable_ids = st.text(
    alphabet=st.characters(exclude_categories=_REFUSED_CATEGORIES),  # type: ignore[arg-type]
    min_size=1,
    max_size=MAX_ID_LENGTH,
).filter(lambda s: any(not c.isspace() and unicodedata.category(c) != "Cf" for c in s))


def _refused(field: str, **kwargs: Any) -> InvalidJob:
    args: dict[str, Any] = {"project": "p", "work_item": "w"}
    args.update(kwargs)
    with pytest.raises(InvalidJob) as info:
        validate_spec(**args)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    return info.value


@pytest.mark.parametrize("field", ["project", "work_item", "agent_type"])
@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("x" * (MAX_ID_LENGTH + 1), "characters long"),
        ("a\x00b", "U+0000"),
        ("a\nb", "U+000A"),
        ("a\x1bb", "U+001B"),
        ("a\x7fb", "U+007F"),
        ("a\u2028b", "U+2028"),
        ("a\ue000b", "U+E000"),  # private use
        ("a\ud800b", "U+D800"),  # lone surrogate
        (5, "string"),
        (None, "string"),
    ],
)
def test_bad_ids_are_refused_naming_the_field(field: str, value: object, problem: str) -> None:
    error = _refused(field, **{field: value})
    assert problem in error.problem


def test_an_id_of_exactly_the_maximum_length_is_accepted() -> None:
    spec = validate_spec("p" * MAX_ID_LENGTH, "w")
    assert len(spec.project) == MAX_ID_LENGTH


@pytest.mark.parametrize("name", ["1ABC", "A-B", "", "A B", "Ä", "A=B", "A\x00", 5, None])
def test_bad_env_names_are_refused(name: object) -> None:
    error = _refused("env", env={name: "v"})
    assert "not a valid variable name" in error.problem


@pytest.mark.parametrize("name", ["SNAPYARD_JOB_ID", "SNAPYARD_", "SNAPYARD_SETUP_SECONDS"])
def test_reserved_env_names_are_refused(name: str) -> None:
    error = _refused("env", env={name: "v"})
    assert "reserved" in error.problem


def test_lowercase_snapyard_prefix_is_not_reserved() -> None:
    assert validate_spec("p", "w", env={"snapyard_x": "v"}).env == {"snapyard_x": "v"}


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"A": "x\x00y"}, "NUL"),
        ({"A": "\udc80"}, "surrogate"),
        ({"A": 5}, "must be a string"),
        ({"A": "x" * (32 * 1024 + 1)}, "longer than"),
        ({f"V{i}": "x" for i in range(257)}, "at most"),
        (["A=1"], "object"),
        ("A=1", "object"),
    ],
)
def test_bad_env_values_are_refused(env: object, problem: str) -> None:
    assert problem in _refused("env", env=env).problem


@pytest.mark.parametrize(
    "command",
    ["echo hi", 5, {"sh": "-c"}, b"echo", [], ["ok", 1], ["a\x00b"], ["\ud800"], ["x"] * 257],
)
def test_bad_commands_are_refused(command: object) -> None:
    _refused("command", command=command)


@pytest.mark.parametrize(
    "timeout", [0, 0.0, -1, -0.5, math.inf, -math.inf, math.nan, True, False, "10", [10]]
)
def test_bad_timeouts_are_refused(timeout: object) -> None:
    _refused("timeout_s", timeout_s=timeout)


def test_a_good_spec_is_normalised() -> None:
    spec = validate_spec(
        "proj",
        "item",
        agent_type="review",
        command=["sh", "-c", "echo ünï"],
        env={"API_TOKEN": "secret-value", "EMPTY": ""},
        timeout_s=5,
    )
    assert spec.command == ("sh", "-c", "echo ünï")
    assert spec.timeout_s == 5.0
    assert isinstance(spec.timeout_s, float)
    assert dict(spec.env) == {"API_TOKEN": "secret-value", "EMPTY": ""}
    assert spec.key.project == "proj"
    assert str(spec.key) == "proj/item"


def test_env_never_appears_in_reprs() -> None:
    spec = validate_spec("p", "w", env={"API_TOKEN": "secret-value"})
    job = Job(id="j-1", spec=spec, state=JobState.QUEUED, created_at=0.0)
    for text in (repr(spec), str(spec), repr(job), str(job)):
        assert "secret-value" not in text
        assert "API_TOKEN" not in text


def test_terminal_states() -> None:
    assert {s for s in JobState if s.terminal} == {
        JobState.SUCCEEDED,
        JobState.FAILED,
        JobState.TIMED_OUT,
        JobState.CANCELLED,
    }


@given(project=printable_ids, work_item=printable_ids)
def test_any_printable_unicode_id_is_accepted(project: str, work_item: str) -> None:
    spec = validate_spec(project, work_item)
    assert spec.key.project == project
    assert spec.key.work_item == work_item


@given(
    prefix=st.text(max_size=50),
    bad=st.characters(categories=["Cc", "Cs", "Co", "Zl", "Zp"]),
    suffix=st.text(max_size=50),
)
def test_any_id_with_an_unprintable_character_is_refused(
    prefix: str, bad: str, suffix: str
) -> None:
    with pytest.raises(InvalidJob) as info:
        validate_spec("p", prefix + bad + suffix)
    assert info.value.field == "work_item"


@given(project=st.text(), work_item=st.text(), agent_type=st.text())
def test_validation_answers_every_text_with_a_spec_or_invalid_job(
    project: str, work_item: str, agent_type: str
) -> None:
    refused: InvalidJob | None = None
    spec: JobSpec | None = None
    try:
        spec = validate_spec(project, work_item, agent_type=agent_type)
    except InvalidJob as error:
        refused = error
    if refused is not None:
        assert refused.field in {"project", "work_item", "agent_type"}
    else:
        assert isinstance(spec, JobSpec)
        assert 0 < len(spec.project) <= MAX_ID_LENGTH
        assert all(unicodedata.category(c) not in _REFUSED_CATEGORIES for c in spec.work_item)


@given(
    invisible=st.text(
        st.one_of(st.characters(categories=["Cf"]), st.sampled_from(" \t\u3000")), min_size=1
    )
)
def test_an_id_of_only_invisible_characters_is_refused(invisible: str) -> None:
    """Regression: a work item of only U+200B (category Cf) was accepted."""
    with pytest.raises(InvalidJob) as info:
        validate_spec("p", invisible)
    assert info.value.field == "work_item"


def test_env_names_with_a_trailing_newline_are_refused() -> None:
    with pytest.raises(InvalidJob) as caught:
        validate_spec("p", "w", env={"FOO\n": "x"})
    assert caught.value.field == "env"


def test_a_timeout_too_large_for_a_float_is_refused_not_a_crash() -> None:
    with pytest.raises(InvalidJob) as caught:
        validate_spec("p", "w", timeout_s=10**400)
    assert caught.value.field == "timeout_s"
