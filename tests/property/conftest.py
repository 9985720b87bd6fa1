"""Hypothesis profiles for the property suite, chosen by ``HYPOTHESIS_PROFILE``.

``ci`` (the default) keeps ``pytest tests/property`` within a few minutes on a
2-core machine; ``thorough`` (``make test-thorough``) runs the state machine
for at least 2,000 examples. Both keep the example database (``.hypothesis``),
so a failure found once is replayed first on every later run.

Budgets that only some tests use (the state machine's example count and step
count) live in ``budget.py``, so the tests read them without importing this file.
"""

from __future__ import annotations

from budget import PROFILE, register_profiles
from hypothesis import settings

register_profiles()
settings.load_profile(PROFILE)
