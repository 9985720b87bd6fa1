"""Masking a job's secrets out of its output, as CI systems do.

A worker may print its own token (a verbose client, a failing curl). The
job's env values are secrets, so what Snapyard stores and serves of the
output shows ``***`` in their place. Values under four characters are left
alone: masking every "1" or "on" would make the logs unreadable and hides
nothing worth hiding.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["MASK", "MIN_MASKED_LENGTH", "mask_secrets"]

MASK = "***"
MIN_MASKED_LENGTH = 4


def mask_secrets(text: str, values: Iterable[str]) -> str:
    """``text`` with every secret value of 4+ characters replaced by ``***``.

    Longest first, so a secret that contains another is masked whole, not
    left half-visible around the shorter one's mask.
    """
    secrets = sorted({v for v in values if len(v) >= MIN_MASKED_LENGTH}, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text
