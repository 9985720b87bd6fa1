"""Bounded polling for tests: the one way a test waits for "eventually".

Tests wait on futures where a message has a reply; for conditions no single
reply covers, they poll here, and a condition that never holds fails loudly
with what was last seen instead of hanging.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

EVENTUALLY_S = 10.0


def eventually(
    query: Callable[[], T],
    predicate: Callable[[T], bool],
    what: str,
    timeout_s: float = EVENTUALLY_S,
) -> T:
    """Poll ``query`` until ``predicate`` holds; AssertionError after ``timeout_s`` real seconds."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = query()
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s}s waiting for {what}; last: {value!r}"
            )
        time.sleep(0.002)  # a polling interval, bounded by the deadline above
