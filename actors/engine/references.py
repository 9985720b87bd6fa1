"""Image references on a registry: pure rules shared by both engines.

Snapyard names a registry explicitly (``127.0.0.1:5000/snapyard/snapshots``):
a bare ``name`` means Docker Hub to the daemon, and no snapshot may ever go
there, so both engines refuse such a name before the daemon sees it.
"""

from __future__ import annotations

import re

from actors.engine.base import EngineError

__all__ = ["digest_reference", "push_tag", "registry_of", "split_digest"]

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# Docker's reference grammar, the parts we use: lowercase path components.
_NAME = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")


def registry_of(repository: str) -> str:
    """The ``HOST[:PORT]`` of a repository or reference; EngineError when it names none.

    Docker's rule: the first component is a registry when it holds a ``.`` or
    a ``:``, or is ``localhost``; anything else would mean Docker Hub.
    """
    name = repository.split("@", 1)[0]
    first, slash, rest = name.partition("/")
    if not slash or not ("." in first or ":" in first or first == "localhost"):
        raise EngineError(
            f"{repository!r} names no registry: write it as HOST:PORT/name "
            "(e.g. 127.0.0.1:5000/snapyard/snapshots); Snapyard never uses Docker Hub",
            status_code=400,
        )
    path = rest.rsplit(":", 1)[0] if ":" in rest.rsplit("/", 1)[-1] else rest
    if not all(_NAME.match(part) for part in path.split("/")):
        raise EngineError(
            f"{repository!r} is not a valid repository name: lowercase letters, digits and "
            "separators (. _ -) in each /-separated part",
            status_code=400,
        )
    return first


def split_digest(reference: str) -> tuple[str, str]:
    """``repo@sha256:...`` -> (repo, digest); EngineError unless it is pinned by digest.

    Pulls go by digest only: a tag could bring back another image than the
    one the index recorded.
    """
    repository, at, digest = reference.partition("@")
    if not at or not _DIGEST.match(digest):
        raise EngineError(
            f"{reference!r} is not pinned by digest: pull HOST:PORT/name@sha256:<64 hex>",
            status_code=400,
        )
    registry_of(repository)
    return repository, digest


def digest_reference(repository: str, digest: str) -> str:
    return f"{repository}@{digest}"


def push_tag(image_id: str) -> str:
    """The registry tag a push uses: the image ID's hex, so no two images share one.

    Two hosts pushing the same image write the same tag and manifest; two
    pushes of different images never move each other's tag.
    """
    return "sha256-" + image_id.removeprefix("sha256:")
