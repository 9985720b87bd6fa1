"""The API's HTTP plumbing on Starlette: errors, the bearer token, JSON in and out.

Routes (``actors.api_routes``) raise ``HttpError`` and return bodies; this
module turns both into responses with the README's error shape,
``{"error": "...", "field": ... | null}``, and reads request bodies under the
README's rules (411 without a length, 413 past 1 MiB before reading, 400 for
anything that is not a JSON document, or that gives a key twice).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from actors.wire import MAX_BODY_BYTES

__all__ = [
    "BODY_TIMEOUT_S",
    "JSON_TYPE",
    "MAX_BODY_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_TARGET_BYTES",
    "Call",
    "HttpError",
    "authorized",
    "error_body",
    "json_response",
    "read_json",
]

# A body announced and not sent holds only a coroutine, but not forever.
BODY_TIMEOUT_S = 30.0
# The longest request target (path and query) served; longer is 414. The
# longest work item, URL-encoded, fits several times over.
MAX_TARGET_BYTES = 8192
# Request headers past this are 431. h11 enforces it only while a request is
# incomplete (a trickle); one that arrives whole is measured here.
MAX_HEADER_BYTES = 16 * 1024

JSON_TYPE = "application/json; charset=utf-8"
_UNAUTHORIZED = "a bearer token is required: Authorization: Bearer <api.token>"


class HttpError(Exception):
    """A request refused with a status and a message a person can act on."""

    def __init__(
        self,
        status: HTTPStatus,
        message: str,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = dict(headers or {})


def error_body(message: str, field: str | None = None) -> dict[str, Any]:
    """Every non-2xx body carries these two keys, so clients need one rule."""
    return {"error": message, "field": field}


def json_response(status: int, body: object, headers: Mapping[str, str] | None = None) -> Response:
    data = (json.dumps(body, ensure_ascii=False) + "\n").encode()
    answer = Response(data, status_code=status, headers=dict(headers or {}), media_type=JSON_TYPE)
    answer.headers["Cache-Control"] = "no-store"
    return answer


def authorized(request: Request, token: str) -> None:
    """Raise 401 unless the request carries the bearer token (or none is set)."""
    if not token:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken must not reveal how much of the token matched.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        raise HttpError(
            HTTPStatus.UNAUTHORIZED,
            _UNAUTHORIZED,
            headers={"WWW-Authenticate": 'Bearer realm="snapyard"'},
        )


class Call:
    """One request as the routes see it: the path parts, the query, the body rules."""

    def __init__(
        self,
        request: Request,
        parts: list[str],
        query: dict[str, list[str]],
        body_timeout_s: float = BODY_TIMEOUT_S,
    ) -> None:
        self.request = request
        self.body_timeout_s = body_timeout_s
        self.parts = parts
        self.query = query
        self.body_read = False
        # The route template (metrics label, log lines); "?" until a route matches.
        self.route = "?"

    @property
    def method(self) -> str:
        return self.request.method

    def declares_body(self) -> bool:
        length = self.request.headers.get("content-length", "0").strip()
        return length not in ("", "0") or "transfer-encoding" in self.request.headers

    def one(self, name: str) -> str | None:
        """A query parameter given at most once (422 when repeated)."""
        values = self.query.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise HttpError(HTTPStatus.UNPROCESSABLE_ENTITY, f"{name} given more than once", name)
        return values[0]


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, refusing a repeated key: ``json`` keeps the last
    silently, and a proxy or a log reader that keeps the first would see
    another job than the one that runs."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


async def read_json(call: Call) -> object:
    """The body as JSON, under the README's rules; raises HttpError."""
    headers = call.request.headers
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise HttpError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length")
    raw_length = headers.get("content-length")
    if raw_length is None:
        raise HttpError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length")
    length = int(raw_length)  # h11 refused anything but digits (and conflicting copies)
    if length > MAX_BODY_BYTES:
        raise HttpError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"the body is {length} bytes; at most {MAX_BODY_BYTES} are accepted",
        )
    chunks: list[bytes] = []
    try:
        async with asyncio.timeout(call.body_timeout_s):
            async for chunk in call.request.stream():
                chunks.append(chunk)
    except TimeoutError:
        raise HttpError(
            HTTPStatus.REQUEST_TIMEOUT,
            f"the body did not arrive within {call.body_timeout_s:g}s; send as many bytes "
            "as Content-Length says",
        ) from None
    call.body_read = True
    raw = b"".join(chunks)
    ctype = headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise HttpError(
            HTTPStatus.BAD_REQUEST,
            f"the body must be JSON with Content-Type: application/json, not {ctype or 'none'!r}",
        )
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise HttpError(
            HTTPStatus.BAD_REQUEST,
            f"the body gives the key {exc.key!r} more than once; give each key once",
            exc.key,
        ) from None
    except UnicodeDecodeError:
        raise HttpError(HTTPStatus.BAD_REQUEST, "the body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON: {exc}") from None
    except (ValueError, RecursionError):
        # Numbers past Python's digit limit, nesting past the recursion limit.
        raise HttpError(HTTPStatus.BAD_REQUEST, "the body is not JSON this API accepts") from None
