"""A small client for the HTTP API: what the ``snapyard`` command talks through.

Standard library only (``urllib.request``), and with proxies switched off:
the supervisor is on this machine, and an ``http_proxy`` in the environment
must never route a job's env through somebody else's server.
"""

from __future__ import annotations

import codecs
import json
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from actors.settings import ApiSettings
from actors.wire import MAX_BODY_BYTES, client_host

__all__ = ["ApiClient", "ApiError", "ApiUnreachable", "JobEvent"]

# A stream's reads wait this long at most: /events sends a comment every 15 s;
# a followed log may be quiet as long as the job is, so it waits without limit.
_EVENTS_READ_TIMEOUT_S = 60.0


class ApiUnreachable(Exception):
    """Nothing answers at the API address: the supervisor is not running there."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(
            f"cannot reach the Snapyard supervisor at {url} ({reason}); "
            "start it with `snapyard run` (or point SNAPYARD_API at it)"
        )


class ApiError(Exception):
    """The API answered with an error status; ``message`` is its explanation."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        self.status = status
        self.message = message
        self.field = field
        super().__init__(f"{status}: {message}")


@dataclass(frozen=True)
class JobEvent:
    """One ``GET /events`` event: a job's state changed (``seq`` resumes the stream)."""

    seq: int
    job_id: str
    state: str
    time: str | None


class ApiClient:
    def __init__(self, base_url: str, token: str = "", timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @classmethod
    def from_settings(cls, api: ApiSettings, timeout_s: float = 30.0) -> ApiClient:
        host = client_host(api.host)
        host = f"[{host}]" if ":" in host else host
        return cls(f"http://{host}:{api.port}", api.token, timeout_s)

    # --- transport ---------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        body: object = None,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> urllib.request.Request:
        url = self.base_url + path
        if query:
            url += "?" + urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        if data is not None and len(data) > MAX_BODY_BYTES:
            # The server's own 413, said before sending: it would close the
            # connection mid-body, which reads as "unreachable" (exit 3).
            raise ApiError(
                413, f"the body is {len(data)} bytes; at most {MAX_BODY_BYTES} are accepted"
            )
        req = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - http only
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        for name, value in (headers or {}).items():
            req.add_header(name, value)
        return req

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        query: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        """Send one request; return (status, decoded body). Raises ApiUnreachable or ApiError."""
        req = self._request(method, path, body, query)
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                return resp.status, self._decode(resp.headers.get("Content-Type", ""), resp.read())
        except urllib.error.HTTPError as exc:
            raise self._error(exc) from None
        except urllib.error.URLError as exc:
            raise ApiUnreachable(self.base_url, str(exc.reason)) from None
        except (ConnectionError, TimeoutError) as exc:
            raise ApiUnreachable(self.base_url, str(exc) or type(exc).__name__) from None

    def _stream(
        self,
        path: str,
        query: Mapping[str, str] | None,
        headers: Mapping[str, str] | None,
        read_timeout_s: float | None,
        lines: bool,
    ) -> Iterator[bytes]:
        """The body of a streamed answer as it arrives: line by line, or as read."""
        req = self._request("GET", path, query=query, headers=headers)
        try:
            # The timeout bounds every read; on loopback a connect is refused at once.
            resp = self._opener.open(req, timeout=read_timeout_s)
        except urllib.error.HTTPError as exc:
            raise self._error(exc) from None
        except urllib.error.URLError as exc:
            raise ApiUnreachable(self.base_url, str(exc.reason)) from None
        except (ConnectionError, TimeoutError) as exc:
            raise ApiUnreachable(self.base_url, str(exc) or type(exc).__name__) from None
        with resp:
            try:
                while chunk := resp.readline() if lines else resp.read1(65536):
                    yield chunk
            except (ConnectionError, TimeoutError) as exc:
                raise ApiUnreachable(self.base_url, str(exc) or type(exc).__name__) from None

    def _error(self, exc: urllib.error.HTTPError) -> ApiError:
        payload = self._decode(exc.headers.get("Content-Type", ""), exc.read())
        if isinstance(payload, dict):
            message = str(payload.get("error") or exc.reason)
            field = payload.get("field")
            return ApiError(exc.code, message, field if isinstance(field, str) else None)
        return ApiError(exc.code, str(payload).strip() or str(exc.reason))

    @staticmethod
    def _decode(ctype: str, raw: bytes) -> Any:
        text = raw.decode("utf-8", "replace")
        if ctype.startswith("application/json"):
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                return text
        return text

    # --- endpoints ---------------------------------------------------------

    def submit(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self.request("POST", "/jobs", dict(spec))[1])

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/jobs/{quote(job_id, safe='')}")[1])

    def logs(self, job_id: str) -> str:
        return str(self.request("GET", f"/jobs/{quote(job_id, safe='')}/logs")[1]["logs"])

    def follow_logs(self, job_id: str) -> Iterator[str]:
        """The job's output as it is written, until the job ends."""
        path = f"/jobs/{quote(job_id, safe='')}/logs"
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        for chunk in self._stream(path, {"follow": "true"}, None, None, lines=False):
            if text := decoder.decode(chunk):
                yield text
        if text := decoder.decode(b"", final=True):
            yield text

    def events(self, job_id: str | None = None, after: int | None = None) -> Iterator[JobEvent]:
        """Job state changes as they happen (all jobs, or one until it ends);
        ``after`` resumes after an event's ``seq`` (Last-Event-ID)."""
        query = {"job": job_id} if job_id else None
        headers = {"Accept": "text/event-stream"}
        if after is not None:
            headers["Last-Event-ID"] = str(after)
        seq, data = None, ""
        for raw in self._stream("/events", query, headers, _EVENTS_READ_TIMEOUT_S, lines=True):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line.startswith("id:"):
                seq = int(line[3:].strip())
            elif line.startswith("data:"):
                data += line[5:].strip()
            elif not line and data and seq is not None:
                fields = json.loads(data)
                yield JobEvent(seq, str(fields["id"]), str(fields["state"]), fields.get("time"))
                seq, data = None, ""

    def jobs(
        self, state: str | None = None, project: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        query = {"limit": str(limit)}
        if state:
            query["state"] = state
        if project:
            query["project"] = project
        return list(self.request("GET", "/jobs", query=query)[1]["jobs"])

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self.request("DELETE", f"/jobs/{quote(job_id, safe='')}")[1])

    def snapshots(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/snapshots")[1]["snapshots"])

    def hosts(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/hosts")[1]["hosts"])

    def remove_snapshot(self, project: str, work_item: str) -> dict[str, Any]:
        path = f"/snapshots/{quote(project, safe='')}/{quote(work_item, safe='')}"
        return dict(self.request("DELETE", path)[1])

    def prune(self) -> list[dict[str, Any]]:
        return list(self.request("POST", "/snapshots/prune", {})[1]["evicted"])

    def prune_jobs(self) -> int:
        return int(self.request("POST", "/jobs/prune", {})[1]["deleted"])

    def health(self) -> tuple[bool, str]:
        try:
            _, body = self.request("GET", "/healthz")
        except ApiError as exc:
            return False, exc.message
        return bool(body["ok"]), str(body["reason"])

    def metrics(self) -> str:
        return str(self.request("GET", "/metrics")[1])
