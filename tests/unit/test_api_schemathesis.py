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

import http.client
import json
import re
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
    unsupported_method,
)

from actors.api_schema import openapi_document

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    unsupported_method,
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


# Every operation, streams included: these requests are refused before a stream opens.
every_operation = schemathesis.openapi.from_dict(openapi_document())
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def test_oversized_headers_get_the_431_every_operation_documents(live_api: Served) -> None:
    """Found by a newcomer: the server answered 431 and the document did not say so."""
    for result in every_operation.get_all_operations():
        operation = result.ok()
        case = operation.Case(
            path_parameters={name: "x" for name in re.findall(r"{(\w+)}", operation.path)},
            headers={"X-Big": "a" * 20_000},
        )
        response = case.call(base_url=live_api.url, timeout=10)
        assert response.status_code == 431, operation.label
        case.validate_response(response, checks=CHECKS)


def test_an_undeclared_method_gets_the_405_and_allow_every_operation_documents(
    live_api: Served,
) -> None:
    """Found by a newcomer: the server answered 405 and the document did not say so."""
    for path, item in openapi_document()["paths"].items():
        declared = sorted(m.upper() for m in item if m != "parameters")
        target = path.replace("{id}", "j-none").replace("{project}", "p")
        target = target.replace("{work_item}", "w")
        for method in set(HTTP_METHODS) - set(declared):
            conn = http.client.HTTPConnection("127.0.0.1", live_api.server.port, timeout=10)
            try:
                conn.request(method, target)
                resp = conn.getresponse()
                body = json.loads(resp.read())
            finally:
                conn.close()
            assert resp.status == 405, (method, path)
            assert resp.headers["Allow"] == ", ".join(declared), (method, path)
            assert set(body) == {"error", "field"}
            for name in declared:
                documented = item[name.lower()]["responses"]["405"]
                assert documented["headers"]["Allow"]["required"] is True, (name, path)
