"""The MemoryEngine's Dockerfile interpreter: enough of the classic builder for
layers, config, labels and COPY'd text files, so a build here yields an image
shaped like the one the daemon builds from the same context."""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import tarfile
from collections.abc import Callable, Iterator, Mapping

from actors.engine._memory_records import MemoryImage, merge_env
from actors.engine.base import EngineError

__all__ = ["build"]


def _dockerfile_lines(text: str) -> Iterator[tuple[str, str]]:
    joined = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            joined += line[:-1] + " "
            continue
        joined += line
        instruction, _, rest = joined.partition(" ")
        yield instruction.upper(), rest.strip()
        joined = ""


def _exec_form(rest: str) -> tuple[str, ...]:
    if rest.startswith("["):
        return tuple(json.loads(rest))
    return ("/bin/sh", "-c", rest)


def _key_values(rest: str) -> list[tuple[str, str]]:
    if "=" not in rest.split(" ", 1)[0]:
        key, _, value = rest.partition(" ")
        return [(key, value.strip())]
    return [(k, v) for k, _, v in (part.partition("=") for part in shlex.split(rest))]


def build(
    context: bytes,
    labels: Mapping[str, str],
    *,
    image_id: str,
    created_at: float,
    find_image: Callable[[str], MemoryImage],
) -> MemoryImage:
    """Interpret the Dockerfile of a tar context the way the classic builder layers it."""
    try:
        with tarfile.open(fileobj=io.BytesIO(context)) as tar:
            members = {
                m.name.removeprefix("./"): tar.extractfile(m)
                for m in tar.getmembers()
                if m.isfile()
            }
            blobs = {name: f.read() for name, f in members.items() if f is not None}
    except tarfile.TarError as exc:
        raise EngineError(f"build context is not a tar archive: {exc}") from None
    if "Dockerfile" not in blobs:
        raise EngineError("Cannot locate specified Dockerfile: Dockerfile", status_code=500)
    image = MemoryImage(
        id=image_id,
        tags=[],
        labels={},
        layers=0,
        size_bytes=0,
        created_at=created_at,
    )
    ran: list[str] = []
    for instruction, rest in _dockerfile_lines(blobs["Dockerfile"].decode()):
        if instruction == "FROM" and rest != "scratch":
            base = find_image(rest)
            image.parent = base.id
            image.layers, image.size_bytes = base.layers, base.size_bytes
            image.labels, image.env = dict(base.labels), base.env
            image.cmd, image.entrypoint = base.cmd, base.entrypoint
            image.working_dir, image.files = base.working_dir, dict(base.files)
        elif instruction in {"COPY", "ADD"}:
            *sources, dest = _exec_form(rest) if rest.startswith("[") else rest.split()
            for source in sources:
                if source not in blobs:
                    raise EngineError(f"COPY failed: file not found in build context: {source}")
                blob = blobs[source]
                image.size_bytes += len(blob)
                target = dest.rstrip("/") + "/" + source if dest.endswith("/") else dest
                # Binaries (busybox) count for size only.
                with contextlib.suppress(UnicodeDecodeError):
                    image.files[target] = blob.decode()
            image.layers += 1
        elif instruction == "RUN":
            image.layers += 1
            ran.append(rest)
        elif instruction == "WORKDIR":
            # The classic builder commits a layer only when WORKDIR has to create
            # the directory; RUN's effects are invisible here, so read its text.
            if not any(rest in command for command in ran) and not any(
                path.startswith(rest.rstrip("/") + "/") for path in image.files
            ):
                image.layers += 1
            image.working_dir = rest
        elif instruction == "ENV":
            image.env = tuple(merge_env([f"{k}={v}" for k, v in _key_values(rest)], image.env))
        elif instruction == "LABEL":
            image.labels.update(_key_values(rest))
        elif instruction == "CMD":
            image.cmd = _exec_form(rest)
        elif instruction == "ENTRYPOINT":
            image.entrypoint = _exec_form(rest)
    image.labels.update(labels)
    return image
