"""One throwaway registry per test session, for the tests that push and pull on Docker.

A module that needs it imports the fixture: ``from registry_kit import local_registry``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from actors.localcluster.registry import LocalRegistry


@pytest.fixture(scope="session")
def local_registry() -> Iterator[LocalRegistry]:
    """A real ``docker-registry`` on 127.0.0.1; a test that stops it starts it again."""
    with LocalRegistry() as registry:
        yield registry
