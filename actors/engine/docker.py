"""DockerEngine: the ``Engine`` protocol on the docker SDK.

This module is the only place that imports ``docker``. Every SDK call goes
through ``_translate``, so the actors see only the typed errors of
``actors.engine.base``, classified the way docker-py classifies them: status
code first, the daemon's message only as a guard between a 404 on an image and
a 404 on a container.

Nothing here pulls: containers are created with the low-level API (never
``containers.run``, which pulls a missing image) and builds pass ``pull=False``.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import math
import os
import re
import tempfile
import threading
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import docker
import docker.errors
import requests

from actors.engine._docker_json import (
    EVENT_ACTIONS,
    container_state,
    engine_event,
    image_info,
    label_filter,
    since_param,
)
from actors.engine.base import (
    Conflict,
    ContainerMissing,
    ContainerSpec,
    ContainerState,
    EngineError,
    EngineEvent,
    EngineUnavailable,
    ImageConfig,
    ImageInfo,
    ImageMissing,
    Logs,
    encode_secret_env,
)
from actors.labels import SECRET_ENV_PATH

__all__ = ["DockerEngine"]

_START_HINT = "start it with `make engine` or `bash config/engine.sh`"
_BUILD_TAIL_LINES = 20
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# Enough for a wait per worker plus the event stream: blocking calls hold a connection.
_MAX_POOL_SIZE = 64


class DockerEngine:
    """The real engine. Thread-safe: docker-py's client keeps a pool of connections."""

    def __init__(self, url: str, timeout_s: float = 60.0, secrets_dir: str | None = None) -> None:
        """``secrets_dir``: a host directory (the daemon's host) for secret env files."""
        self.url = url
        self.timeout_s = timeout_s
        self.secrets_dir = Path(secrets_dir or Path(tempfile.gettempdir()) / "snapyard-secrets")
        self._client_lock = threading.Lock()
        self._client: Any = None

    def describe(self) -> str:
        return self.url

    # Plumbing

    def _api(self) -> Any:
        """The low-level client, connected on first use.

        docker-py asks the daemon for its API version when the client is made,
        so a daemon that is down would fail the constructor; connecting lazily
        turns that into an EngineUnavailable on the first call instead.
        """
        with self._client_lock:
            if self._client is None:
                try:
                    self._client = docker.DockerClient(
                        base_url=self.url, timeout=self.timeout_s, max_pool_size=_MAX_POOL_SIZE
                    )
                except requests.exceptions.RequestException as exc:
                    raise self._unavailable(exc) from exc
                except docker.errors.DockerException as exc:
                    # The version probe failed: the daemon is down or not there.
                    raise self._unavailable(exc) from exc
            return self._client.api

    def _unavailable(self, detail: object) -> EngineUnavailable:
        return EngineUnavailable(
            f"the Docker engine at {self.url} does not answer ({detail}); {_START_HINT}"
        )

    def _translate(
        self, exc: BaseException, image: str | None = None, container: str | None = None
    ) -> EngineError:
        """The one place SDK errors become ours; see the module docstring for the order."""
        if isinstance(exc, EngineError):
            return exc
        if isinstance(exc, docker.errors.APIError):
            status: int | None = exc.status_code
            message = str(exc.explanation or exc)
            lowered = message.lower()
            if status == 404:
                # Only a 404 that says "image" is ImageMissing: a missing network
                # must never look like a deleted snapshot.
                if isinstance(exc, docker.errors.ImageNotFound) or "no such image" in lowered:
                    return ImageMissing(image or message.rpartition(": ")[2], message)
                if "no such container" in lowered:
                    return ContainerMissing(container or message.rpartition(": ")[2], message)
                return EngineError(message, status_code=404)
            if status == 409:
                return Conflict(message, status_code=409)
            if status == 500 and "failed to get digest" in lowered:
                # Committing a container whose image was deleted: the daemon says 500,
                # but no retry brings the image back.
                found = _DIGEST.search(message)
                return ImageMissing(found.group(0) if found else image or "", message)
            if status is not None and status >= 500:
                return EngineUnavailable(
                    f"the Docker engine at {self.url} failed ({status}): {message}",
                    status_code=status,
                )
            return EngineError(message, status_code=status)
        if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return self._unavailable(exc)
        return EngineError(f"{type(exc).__name__}: {exc}")

    def _raise(
        self, exc: BaseException, image: str | None = None, container: str | None = None
    ) -> NoReturn:
        raise self._translate(exc, image=image, container=container) from exc

    @contextlib.contextmanager
    def _call(self, image: str | None = None, container: str | None = None) -> Iterator[Any]:
        try:
            yield self._api()
        except EngineError:
            raise
        except Exception as exc:
            self._raise(exc, image=image, container=container)

    # Daemon

    def ping(self) -> None:
        with self._call() as api:
            api.ping()

    # Containers

    def create_container(self, spec: ContainerSpec) -> str:
        secrets = self._write_secrets(spec.secret_env) if spec.secret_env else None
        try:
            return self._create(spec, secrets)
        except BaseException:
            if secrets is not None:
                secrets.unlink(missing_ok=True)
            raise

    def _write_secrets(self, secret_env: Mapping[str, str]) -> Path:
        """One private file per container, bind-mounted read-only: never in its config."""
        self.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.secrets_dir / f"{uuid.uuid4().hex}.env"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(encode_secret_env(secret_env))
        return path

    def _forget_secrets(self, mounts: list[Mapping[str, Any]]) -> None:
        for mount in mounts:
            source = Path(str(mount.get("Source", "")))
            if source.parent == self.secrets_dir and source.suffix == ".env":
                source.unlink(missing_ok=True)

    def _create(self, spec: ContainerSpec, secrets: Path | None) -> str:
        binds = {str(secrets): {"bind": SECRET_ENV_PATH, "mode": "ro"}} if secrets else None
        with self._call(image=spec.image) as api:
            host_config = api.create_host_config(
                binds=binds,
                mem_limit=spec.memory_bytes,
                memswap_limit=spec.memory_bytes,
                pids_limit=spec.pids_limit,
                network_mode=spec.network,
                init=spec.init,
                auto_remove=spec.auto_remove,
                cap_drop=["ALL"] if spec.cap_drop_all else None,
                security_opt=["no-new-privileges"] if spec.no_new_privileges else None,
            )
            created = api.create_container(
                image=spec.image,
                command=list(spec.command) if spec.command is not None else None,
                environment=dict(spec.env),
                labels=dict(spec.labels),
                name=spec.name,
                host_config=host_config,
            )
        return str(created["Id"])

    def start_container(self, container_id: str) -> None:
        with self._call(container=container_id) as api:
            api.start(container_id)

    def inspect_container(self, container_id: str) -> ContainerState:
        with self._call(container=container_id) as api:
            raw = api.inspect_container(container_id)
        return container_state(raw)

    def wait_container(self, container_id: str, timeout_s: float | None = None) -> int:
        try:
            with self._call(container=container_id) as api:
                result = api.wait(container_id, timeout=timeout_s)
        except EngineUnavailable as exc:
            # A read timeout here is the wait running out, not the daemon being down.
            # Over a unix socket requests reports it as a ConnectionError, not a Timeout.
            cause = exc.__cause__
            if timeout_s is not None and (
                isinstance(cause, requests.exceptions.Timeout) or "Read timed out" in str(cause)
            ):
                raise EngineUnavailable(
                    f"timed out after {timeout_s}s waiting for container {container_id[:12]}"
                ) from exc
            raise
        return int(result["StatusCode"])

    def stop_container(self, container_id: str, grace_s: float) -> None:
        with self._call(container=container_id) as api:
            # The API takes whole seconds; round up so the grace is never shortened.
            api.stop(container_id, timeout=max(0, math.ceil(grace_s)))

    def kill_container(self, container_id: str, signal: str = "SIGKILL") -> None:
        try:
            with self._call(container=container_id) as api:
                api.kill(container_id, signal=signal)
        except Conflict as exc:
            # 409 "is not running": the protocol promises no error for that.
            if "is not running" not in str(exc):
                raise

    def remove_container(self, container_id: str, force: bool = False) -> None:
        with self._call(container=container_id) as api:
            mounts = api.inspect_container(container_id).get("Mounts") or []
            api.remove_container(container_id, force=force)
        self._forget_secrets(mounts)

    def container_logs(self, container_id: str, tail: int = 200) -> Logs:
        # One call for both streams: the daemon tails its combined log in the
        # order it was written. Two calls (one per stream) lost that order, and
        # a stream whose lines all fell before the combined tail came back empty.
        with self._call(container=container_id) as api:
            both = api.logs(container_id, stdout=True, stderr=True, tail=max(0, tail))
        return Logs(text=both.decode("utf-8", "replace"))

    def follow_logs(self, container_id: str) -> DockerLogStream:
        with self._call(container=container_id) as api:
            stream = api.logs(container_id, stdout=True, stderr=True, stream=True, follow=True)
        return DockerLogStream(self, stream)

    def list_containers(self, labels: Mapping[str, str]) -> list[ContainerState]:
        with self._call() as api:
            found = api.containers(all=True, filters=label_filter(labels))
        states = []
        for summary in found:
            # A container may go between the listing and the inspect (auto-remove).
            with contextlib.suppress(ContainerMissing):
                states.append(self.inspect_container(summary["Id"]))
        return states

    # Images

    def commit_container(
        self,
        container_id: str,
        repository: str,
        tag: str,
        config: ImageConfig,
    ) -> str:
        conf: dict[str, Any] = {"Labels": dict(config.labels), "WorkingDir": config.working_dir}
        if config.env:
            conf["Env"] = list(config.env)
        if config.cmd is not None:
            conf["Cmd"] = list(config.cmd)
        if config.entrypoint is not None:
            conf["Entrypoint"] = list(config.entrypoint)
        with self._call(container=container_id) as api:
            result = api.commit(container_id, repository=repository, tag=tag, conf=conf)
        return str(result["Id"])

    def inspect_image(self, image: str) -> ImageInfo:
        with self._call(image=image) as api:
            raw = api.inspect_image(image)
        return image_info(raw)

    def list_images(self, labels: Mapping[str, str]) -> list[ImageInfo]:
        with self._call() as api:
            found = api.images(filters=label_filter(labels))
        infos = []
        for summary in found:
            with contextlib.suppress(ImageMissing):
                infos.append(self.inspect_image(summary["Id"]))
        return infos

    def remove_image(self, image: str, force: bool = False) -> None:
        with self._call(image=image) as api:
            api.remove_image(image, force=force)

    def tag_image(self, image: str, repository: str, tag: str) -> None:
        with self._call(image=image) as api:
            api.tag(image, repository, tag)

    def build_image(self, context: bytes, tag: str, labels: Mapping[str, str]) -> str:
        output: list[str] = []
        with self._call() as api:
            for chunk in api.build(
                fileobj=io.BytesIO(context),
                custom_context=True,
                tag=tag,
                labels=dict(labels),
                pull=False,
                rm=True,
                forcerm=True,
                decode=True,
                network_mode="none",
            ):
                if "stream" in chunk:
                    output.extend(chunk["stream"].splitlines())
                if "error" in chunk:
                    output.extend(str(chunk["error"]).splitlines())
                    tail = "\n".join(output[-_BUILD_TAIL_LINES:])
                    raise EngineError(f"building {tag} failed:\n{tail}")
        return self.inspect_image(tag).id

    # Events

    def events(self, since: float | None = None) -> DockerEventStream:
        filters = {
            "type": ["container", "image"],
            "event": list(EVENT_ACTIONS),
        }
        with self._call() as api:
            stream = api.events(
                since=None if since is None else since_param(since),
                filters=filters,
                decode=True,
            )
        return DockerEventStream(self, stream)


class DockerEventStream:
    """Docker's event stream, normalised.

    docker-py ends the iteration quietly both when we close the stream and
    when the daemon goes away; only the first is a normal end, so the second
    raises EngineUnavailable (as the in-memory engine does) and the Watcher
    knows to reconnect.
    """

    def __init__(self, engine: DockerEngine, stream: Any) -> None:
        self._engine = engine
        self._stream = stream
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[EngineEvent]:
        try:
            for raw in self._stream:
                event = engine_event(raw)
                if event is not None:
                    yield event
        except Exception as exc:
            if self._closed.is_set():
                return
            self._engine._raise(exc)
        if not self._closed.is_set():
            raise self._engine._unavailable("the event stream ended")

    def close(self) -> None:
        self._closed.set()
        # Closing a stream the daemon already dropped is not worth an error.
        with contextlib.suppress(Exception):
            self._stream.close()


class DockerLogStream:
    """docker-py's followed log, decoded: a UTF-8 character split across two
    chunks is held back until its second half arrives."""

    def __init__(self, engine: DockerEngine, stream: Any) -> None:
        self._engine = engine
        self._stream = stream
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        try:
            for chunk in self._stream:
                text = decoder.decode(chunk)
                if text:
                    yield text
        except Exception as exc:
            if self._closed.is_set():
                return
            self._engine._raise(exc)
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    def close(self) -> None:
        self._closed.set()
        self._stream.close()
