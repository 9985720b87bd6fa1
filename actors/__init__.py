"""Snapyard: run every job in its own Docker worker container, reuse snapshots of clean runs."""

from __future__ import annotations

import logging

__all__ = ["__version__"]

__version__ = "0.1.0"

# A library never configures logging for its user; the CLI does that.
logging.getLogger(__name__).addHandler(logging.NullHandler())
