"""The registry's own HTTP API, for what Docker cannot do: ping and delete a manifest.

Docker pushes and pulls (``Engine.push_image``/``pull_image``) but cannot
delete anything from a registry; eviction must, or the registry only grows.
This speaks the distribution API (``GET /v2/``, ``DELETE
/v2/<name>/manifests/<digest>``) to the one configured registry and nowhere
else, with the engine's typed errors.

Deleting a manifest frees no disk by itself: the registry only unlinks it
(and the tags that pointed at it), and the layers and config blobs stay.
The registry's own garbage collector reclaims every blob no manifest
references any more::

    docker-registry garbage-collect /etc/docker/registry/config.yml

Run it while the registry is stopped or read-only (``storage.maintenance.
readonly.enabled: true``): a push that races the collector can lose a layer
it thought was there. ``--delete-untagged`` also removes manifests no tag
points at. ``LocalRegistry.garbage_collect()`` (actors/localcluster) does
this for the throwaway registry; a cluster runs it from a timer unit on the
registry's host, e.g. nightly.

Deletes need ``storage.delete.enabled: true`` in the registry's config; without
it the registry answers 405 and this says so.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
from typing import Protocol
from urllib.parse import urlsplit

from actors.engine.base import EngineError, ImageMissing, RegistryUnavailable
from actors.engine.references import registry_of, split_digest

__all__ = ["ManifestStore", "RegistryHttp"]

_TIMEOUT_S = 10.0
_OK = (200, 202)


class ManifestStore(Protocol):
    """What a host asks of the registry beyond Docker: RegistryHttp, or a MemoryRegistry."""

    def ping(self) -> None:
        """RegistryUnavailable unless the registry answers."""

    def delete_manifest(self, reference: str) -> None:
        """Delete ``HOST:PORT/name@sha256:...``; ImageMissing when the registry lacks it."""


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RegistryHttp:
    """The registry at ``address`` (``HOST:PORT``, as ``[cluster] registry`` holds it).

    Plain HTTP to a loopback registry, HTTPS to any other, as Docker does
    without an ``insecure-registries`` entry. Each call opens its own
    connection, so any thread may call it.
    """

    def __init__(self, address: str, timeout_s: float = _TIMEOUT_S) -> None:
        if not address or "/" in address:
            raise EngineError(f"the registry {address!r} should be HOST:PORT, e.g. 127.0.0.1:5000")
        self.address = address
        self.timeout_s = timeout_s
        parts = urlsplit(f"//{address}")
        try:
            self._host, self._port = parts.hostname or address, parts.port
        except ValueError as exc:
            raise EngineError(f"the registry {address!r} has a bad port: {exc}") from exc
        self._secure = not _loopback(self._host)

    def describe(self) -> str:
        return f"{'https' if self._secure else 'http'}://{self.address}"

    def ping(self) -> None:
        status, body = self._request("GET", "/v2/")
        if status == 401:
            raise EngineError(
                f"the registry at {self.address} asks for credentials; Snapyard's cluster "
                "registry must allow it without (keep it on a private network)",
                status_code=401,
            )
        if status != 200:
            raise self._unexpected("GET /v2/", status, body)

    def delete_manifest(self, reference: str) -> None:
        repository, digest = split_digest(reference)
        registry = registry_of(repository)
        if registry != self.address:
            raise EngineError(
                f"{reference} is not on the configured registry {self.address}: "
                "Snapyard deletes only from its own registry",
                status_code=400,
            )
        name = repository.removeprefix(f"{registry}/")
        path = f"/v2/{name}/manifests/{digest}"
        status, body = self._request("DELETE", path)
        if status in _OK:
            return
        if status == 404:
            raise ImageMissing(reference, f"manifest unknown: {reference}")
        if status == 405:
            raise EngineError(
                f"the registry at {self.address} refuses deletes: set "
                "storage.delete.enabled: true in its config and restart it",
                status_code=405,
            )
        raise self._unexpected(f"DELETE {path}", status, body)

    def _unexpected(self, what: str, status: int, body: bytes) -> EngineError:
        detail = _error_text(body)
        if status >= 500:
            return RegistryUnavailable(self.address, f"{what} answered {status}: {detail}")
        return EngineError(
            f"the registry at {self.address} answered {what} with {status}: {detail}",
            status_code=status,
        )

    def _request(self, method: str, path: str) -> tuple[int, bytes]:
        connection_type = (
            http.client.HTTPSConnection if self._secure else http.client.HTTPConnection
        )
        conn = connection_type(self._host, self._port, timeout=self.timeout_s)
        try:
            conn.request(method, path, headers={"Accept": "application/json"})
            response = conn.getresponse()
            return response.status, response.read()
        except OSError as exc:  # refused, reset, timed out, TLS
            raise RegistryUnavailable(
                self.address, f"{method} {self.describe()}{path}: {exc}"
            ) from exc
        except http.client.HTTPException as exc:
            raise RegistryUnavailable(
                self.address, f"{method} {self.describe()}{path}: {exc!r}"
            ) from exc
        finally:
            conn.close()


def _error_text(body: bytes) -> str:
    """The distribution API's ``{"errors": [{"code", "message"}]}`` as one line."""
    try:
        errors = json.loads(body).get("errors") or []
        return "; ".join(f"{e.get('code', '?')}: {e.get('message', '')}" for e in errors) or "-"
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace") or "-"
