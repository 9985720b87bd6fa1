"""Push and pull through a registry with the docker SDK: the streams and their errors.

Docker reports a registry's failures two ways: as the HTTP status of the call
(a pull that fails before any byte: 404 "manifest unknown", 500 "dial tcp ...
connection refused") or as an ``error`` message inside the JSON stream (every
push failure, a pull that fails later). Both land in ``registry_error`` so the
caller sees one typed error whatever the path: ImageMissing for a manifest the
registry lacks, RegistryUnavailable when it cannot be reached.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import docker.errors

from actors.engine.base import EngineError, ImageMissing, RegistryUnavailable
from actors.engine.references import digest_reference, push_tag, registry_of, split_digest

__all__ = ["PushReport", "pull", "push", "read_push", "registry_error"]

log = logging.getLogger(__name__)

# The engine's own SDK error translation (DockerEngine._raise), for daemon-only calls.
RaiseAs = Callable[..., NoReturn]

_DIGEST = re.compile(r"digest: (sha256:[0-9a-f]{64})")
_MISSING = ("manifest unknown", "not found", "name unknown")
# What the daemon says when it cannot talk to the registry (Go's net/http errors).
_UNREACHABLE = (
    "dial tcp",
    "connection refused",
    "connection reset",
    "i/o timeout",
    "no such host",
    "eof",
    "unexpected http status: 5",
    "server gave http response to https client",
)
# Push status lines per layer: uploaded, or the registry already had it.
_UPLOADED = "Pushed"
_PRESENT = ("Layer already exists", "Mounted from")


@dataclass
class PushReport:
    """What one push stream said: the manifest digest and what each layer did."""

    digest: str = ""
    uploaded: set[str] = field(default_factory=set)
    present: set[str] = field(default_factory=set)


def registry_error(registry: str, reference: str, message: str) -> EngineError:
    """One registry failure, typed by what the daemon's message says happened."""
    lowered = message.lower()
    if any(word in lowered for word in _MISSING):
        return ImageMissing(reference, message)
    if any(word in lowered for word in _UNREACHABLE):
        return RegistryUnavailable(registry, message)
    return EngineError(f"{reference}: {message}")


def read_push(stream: Iterable[Mapping[str, Any]], registry: str, reference: str) -> PushReport:
    """Read a push's JSON stream to the end; raise its error as ours."""
    report = PushReport()
    for message in stream:
        if "error" in message:
            raise registry_error(registry, reference, str(message["error"]))
        aux = message.get("aux") or {}
        if aux.get("Digest"):
            report.digest = str(aux["Digest"])
        status = str(message.get("status") or "")
        layer = message.get("id")
        if layer and status == _UPLOADED:
            report.uploaded.add(str(layer))
        elif layer and status.startswith(_PRESENT):
            report.present.add(str(layer))
        elif not report.digest and (found := _DIGEST.search(status)):
            report.digest = found.group(1)
    if not report.digest:
        raise EngineError(f"the push of {reference} ended without a digest")
    return report


def push(api: Any, image_id: str, repository: str, raise_as: RaiseAs) -> str:
    """Tag under ``repository``, push, untag what we tagged; return ``repository@digest``."""
    registry = registry_of(repository)
    try:
        info = api.inspect_image(image_id)
        tag = push_tag(str(info["Id"]))  # by ID even when given a tag
        reference = f"{repository}:{tag}"
        # Removing the image's last tag would delete it: keep ours then.
        keep_tag = not set(info.get("RepoTags") or ()) - {reference}
        api.tag(info["Id"], repository, tag)
    except Exception as exc:
        raise_as(exc, image=image_id)
    try:
        stream = api.push(repository, tag, stream=True, decode=True)
        report = read_push(stream, registry, reference)
    except EngineError:
        raise
    except Exception as exc:
        raise_as(exc, image=image_id)
    finally:
        if not keep_tag:
            try:
                api.remove_image(reference, noprune=True)
            except Exception as exc:  # the push's own outcome matters more
                log.warning("could not untag %s after its push: %s", reference, exc)
    log.info(
        "pushed %s to %s: %d layer(s) uploaded, %d already there",
        image_id,
        repository,
        len(report.uploaded),
        len(report.present),
    )
    return digest_reference(repository, report.digest)


def pull(api: Any, reference: str, raise_as: RaiseAs) -> str:
    """Pull by digest; return the image ID (the same as the pusher's)."""
    repository, digest = split_digest(reference)
    registry = registry_of(repository)
    try:
        for message in api.pull(repository, tag=digest, stream=True, decode=True):
            if "error" in message:
                raise registry_error(registry, reference, str(message["error"]))
    except EngineError:
        raise
    except docker.errors.APIError as exc:
        # The daemon answered for the registry: it lacks the manifest (404) or
        # did not answer (500 "dial tcp ..."). Anything else is the daemon's own.
        error = registry_error(registry, reference, str(exc.explanation or exc))
        if type(error) is not EngineError:
            raise error from exc
        raise_as(exc, image=reference)
    except Exception as exc:
        raise_as(exc, image=reference)
    try:
        return str(api.inspect_image(reference)["Id"])
    except Exception as exc:
        raise_as(exc, image=reference)
