"""A job's secrets are masked out of its output, as CI systems do."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from actors.masking import MASK, mask_secrets

# '*' is left out: a secret made of the mask's own character could reappear.
SECRET = st.text(st.characters(codec="utf-8", exclude_characters="*"), min_size=4, max_size=30)
TEXT = st.text(st.characters(codec="utf-8", exclude_characters="*"), max_size=60)


@given(before=TEXT, secret=SECRET, after=TEXT, others=st.lists(SECRET, max_size=3))
def test_no_secret_of_four_or_more_characters_survives(
    before: str, secret: str, after: str, others: list[str]
) -> None:
    masked = mask_secrets(before + secret + after + secret, [secret, *others])
    for value in (secret, *others):
        assert value not in masked
    assert MASK in masked


def test_short_values_are_left_alone() -> None:
    assert mask_secrets("retries=3 on", ["3", "on"]) == "retries=3 on"


def test_a_secret_containing_another_is_masked_whole() -> None:
    assert mask_secrets("token=abcd-efgh", ["abcd", "abcd-efgh"]) == "token=***"
