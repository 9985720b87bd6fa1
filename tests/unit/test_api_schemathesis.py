"""schemathesis against the live API: generated requests, every answer checked
against the OpenAPI document the server publishes.

The server is a real Snapyard on the MemoryEngine (one per operation: the
autouse fixture stops every actor after each test). Requests come from the
document itself, valid and invalid ones; the checks are that nothing answers
5xx and that every status, content type, header and body is the one the
document declares. ``/events`` is left out: it is a stream that never ends
by design, so a request-response checker cannot read it (its own tests are in
``test_api_streams.py``). Examples are bounded and derandomized, so the run
is quick and the same every time.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from api_kit import Served, served
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from actors.api_schema import openapi_document

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture
def live_api(tmp_path: Path) -> Iterator[Served]:
    with served(tmp_path) as live:
        yield live


# The document the server publishes, loaded at collection (schemathesis's lazy
# from_fixture loader breaks on pytest 9); the first test pins that the live
# server serves exactly this document.
schema = schemathesis.openapi.from_dict(openapi_document()).exclude(path="/events")


def test_the_checked_document_is_the_one_the_server_publishes(live_api: Served) -> None:
    with urllib.request.urlopen(f"{live_api.url}/openapi.json", timeout=10) as resp:
        assert json.loads(resp.read()) == openapi_document()


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_answer_matches_the_published_schema(
    case: schemathesis.Case, live_api: Served
) -> None:
    case.call_and_validate(base_url=live_api.url, checks=CHECKS, timeout=10)
