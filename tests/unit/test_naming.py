"""Snapshot image names: injective over (project, work item), always valid for Docker."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from actors.naming import snapshot_image_name

REPOSITORY = "snapyard-snapshot"

# Docker's reference grammar (distribution/reference, regexp.go): a name is
# [domain[:port]/]path-component(/path-component)*, at most 255 characters.
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?"
REPOSITORY_RE = re.compile(rf"^(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
NAME_MAX = 255

# Any Unicode, lone surrogates included: IDs are validated elsewhere, but the
# name function must never be the thing that breaks.
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=300) | st.text()


def _assert_valid(repository: str, tag: str) -> None:
    assert REPOSITORY_RE.match(repository), repository
    assert len(repository) <= NAME_MAX
    assert TAG_RE.match(tag), tag


@given(project=any_text, work_item=any_text)
def test_names_are_valid_docker_references(project: str, work_item: str) -> None:
    _assert_valid(*snapshot_image_name(REPOSITORY, project, work_item))


@given(
    a=st.tuples(any_text, any_text),
    b=st.tuples(any_text, any_text),
)
def test_distinct_pairs_get_distinct_names(a: tuple[str, str], b: tuple[str, str]) -> None:
    assume(a != b)
    assert snapshot_image_name(REPOSITORY, *a) != snapshot_image_name(REPOSITORY, *b)


@given(project=any_text, work_item=any_text, cut=st.integers(min_value=0, max_value=600))
def test_moving_the_boundary_between_project_and_work_item_changes_the_tag(
    project: str, work_item: str, cut: int
) -> None:
    joined = project + work_item
    cut = min(cut, len(joined))
    assume(joined[:cut] != project)
    _, tag_a = snapshot_image_name(REPOSITORY, project, work_item)
    _, tag_b = snapshot_image_name(REPOSITORY, joined[:cut], joined[cut:])
    assert tag_a != tag_b


@given(project=any_text, work_item=any_text)
def test_names_are_stable(project: str, work_item: str) -> None:
    assert snapshot_image_name(REPOSITORY, project, work_item) == snapshot_image_name(
        REPOSITORY, project, work_item
    )


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("Proj_1", "w"), ("proj-1", "w")),
        (("ab", "c"), ("a", "bc")),
        (("1:a", ""), ("", "1:a")),
        (("a", "1:b"), ("a1", ":b")),
        (("\U0001f600", "x"), ("\ud83d\ude00", "x")),  # astral char vs its surrogate pair
        (("x" * 300, "y"), ("x" * 299, "y")),  # differ only past the slug's cut
        (("é", "w"), ("e\u0301", "w")),  # NFC vs NFD: different IDs, different names
    ],
)
def test_known_lookalikes_differ(a: tuple[str, str], b: tuple[str, str]) -> None:
    name_a = snapshot_image_name(REPOSITORY, *a)
    name_b = snapshot_image_name(REPOSITORY, *b)
    assert name_a != name_b
    _assert_valid(*name_a)
    _assert_valid(*name_b)


def test_readable_slug_and_case_folding() -> None:
    repository, tag = snapshot_image_name(REPOSITORY, "Proj_1", "Issue #42")
    assert repository == "snapyard-snapshot/proj-1.issue-42"
    assert tag.startswith("k")
    assert len(tag) == 65


def test_unsluggable_ids_still_get_a_valid_component() -> None:
    repository, tag = snapshot_image_name(REPOSITORY, "日本", "---")
    assert repository == "snapyard-snapshot/x.x"
    _assert_valid(repository, tag)


def test_a_registry_prefixed_repository_stays_valid() -> None:
    repository, tag = snapshot_image_name("registry.local:5000/team/snaps", "P", "W")
    assert repository.startswith("registry.local:5000/team/snaps/")
    _assert_valid(repository, tag)
