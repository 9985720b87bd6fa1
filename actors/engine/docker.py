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

import contextlib
import io
import math
import re
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import docker
import docker.errors
import requests

from actors.engine import _docker_registry, squash
from actors.engine._docker_json import (
    EVENT_ACTIONS,
    container_state,
    image_info,
    label_filter,
    since_param,
)
from actors.engine._docker_mounts import HostFiles
from actors.engine._docker_streams import DockerEventStream, DockerLogStream
from actors.engine.base import (
    Conflict,
    ContainerMissing,
    ContainerSpec,
    ContainerState,
    EngineError,
    EngineUnavailable,
    ImageConfig,
    ImageInfo,
    ImageMissing,
    Logs,
)
from actors.labels import SECRET_ENV_PATH
from actors.worker_helper import (
    HELPER_MOUNT,
    helper_entrypoint,
    is_helper_entrypoint,
    job_argv,
    unwrapped,
)

__all__ = ["DockerEngine", "DockerEventStream", "DockerLogStream"]

_START_HINT = "start it with `make engine` or `bash config/engine.sh`"
_BUILD_TAIL_LINES = 20
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# Enough for a wait per worker plus the event stream: blocking calls hold a connection.
_MAX_POOL_SIZE = 64
_NANO = 1_000_000_000


class DockerEngine:
    """The real engine. Thread-safe: docker-py's client keeps a pool of connections."""

    def __init__(
        self,
        url: str,
        timeout_s: float = 60.0,
        secrets_dir: str | None = None,
        helper_dir: str | None = None,
    ) -> None:
        """``secrets_dir`` and ``helper_dir``: host directories (the daemon's host) for
        secret env files and the env helper (actors/worker_helper.py)."""
        self.url = url
        self.timeout_s = timeout_s
        self._files = HostFiles(
            Path(secrets_dir or Path(tempfile.gettempdir()) / "snapyard-secrets"),
            Path(helper_dir or Path(tempfile.gettempdir()) / "snapyard-helper"),
        )
        self._client_lock = threading.Lock()
        self._client: Any = None

    @property
    def secrets_dir(self) -> Path:
        return self._files.secrets_dir

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
        entrypoint: list[str] | None = None
        if spec.env_helper:
            # Read the image first: its 404 is the create's 404 (ImageMissing),
            # and its entrypoint and CMD are what the helper execs.
            image = self.inspect_image(spec.image)
            argv = job_argv(image.entrypoint, image.cmd, spec.command)
            entrypoint = list(helper_entrypoint(argv))
        secrets = self._files.write_secrets(spec.secret_env) if spec.secret_env else None
        try:
            return self._create(spec, secrets, entrypoint)
        except BaseException:
            if secrets is not None:
                secrets[0].unlink(missing_ok=True)
            raise

    def _create(
        self, spec: ContainerSpec, secrets: tuple[Path, int] | None, entrypoint: list[str] | None
    ) -> str:
        binds: dict[str, dict[str, str]] = {}
        if secrets is not None:
            binds[str(secrets[0])] = {"bind": SECRET_ENV_PATH, "mode": "ro"}
        if entrypoint is not None:
            binds[str(self._files.helper())] = {"bind": HELPER_MOUNT, "mode": "ro"}
        with self._call(image=spec.image) as api:
            host_config = api.create_host_config(
                binds=binds or None,
                group_add=[secrets[1]] if secrets is not None else None,
                mem_limit=spec.memory_bytes,
                memswap_limit=spec.memory_bytes,
                nano_cpus=round(spec.cpus * _NANO) if spec.cpus else None,
                pids_limit=spec.pids_limit,
                network_mode=spec.network,
                init=spec.init,
                auto_remove=spec.auto_remove,
                cap_drop=["ALL"] if spec.cap_drop_all else None,
                security_opt=["no-new-privileges"] if spec.no_new_privileges else None,
            )
            created = api.create_container(
                image=spec.image,
                # Under the helper the entrypoint holds the whole argv and CMD
                # stays empty (see helper_entrypoint for why).
                command=[] if entrypoint is not None else _command(spec),
                entrypoint=entrypoint,
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
        self._files.forget_secrets(mounts)

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
        if config.entrypoint is None or config.cmd is None:
            with self._call(container=container_id) as api:
                raw = api.inspect_container(container_id)
                wrapped = (raw.get("Config") or {}).get("Entrypoint")
                if is_helper_entrypoint(wrapped):
                    own = api.inspect_image(raw["Image"]).get("Config") or {}
                    config = unwrapped(config, wrapped, own.get("Entrypoint"), own.get("Cmd"))
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

    def flatten_image(self, image: str, base: str, repository: str, tag: str) -> str:
        # docker save, merge the layers above the base (actors.engine.squash), docker
        # load: the daemon skips the base layers it has, so only the merged one travels.
        with self._call(image=base) as api:
            base_layers = list((api.inspect_image(base).get("RootFS") or {}).get("Layers") or ())
            base_history_len = len(api.history(base))
        with tempfile.TemporaryDirectory(prefix="snapyard-flatten-") as work:
            saved = Path(work) / "saved.tar"
            with self._call(image=image) as api, saved.open("wb") as out:
                for chunk in api.get_image(image):
                    out.write(chunk)
            loading = Path(work) / "load.tar"
            try:
                flattened = squash.flatten_archive(
                    saved,
                    loading,
                    base_layers,
                    base_history_len,
                    f"{repository}:{tag}",
                    f"snapyard: flattened {image} above {base}",
                )
            except squash.SquashError as exc:
                raise EngineError(f"cannot flatten {image} onto {base}: {exc}") from exc
            saved.unlink()
            with self._call(image=image) as api, loading.open("rb") as archive:
                for message in api.load_image(archive):
                    if "error" in message:
                        raise EngineError(
                            f"loading the flattened {image} failed: {message['error']}"
                        )
        return flattened.image_id

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

    # Registry (actors/engine/_docker_registry.py reads the streams)

    def push_image(self, image_id: str, repository: str) -> str:
        with self._call(image=image_id) as api:
            return _docker_registry.push(api, image_id, repository, self._raise)

    def pull_image(self, reference: str) -> str:
        with self._call(image=reference) as api:
            return _docker_registry.pull(api, reference, self._raise)

    def copy_image_to(self, image: str, target: DockerEngine) -> str:
        """``docker save`` here piped into ``docker load`` on ``target``; return the ID.

        The image arrives with its ID and tags, layers the target has are kept:
        how a stand-in host (actors/localcluster/dockerd.py) gets the base image
        without any registry. Not part of the Engine protocol.
        """
        with self._call(image=image) as api, target._call(image=image) as into:
            for message in into.load_image(api.get_image(image)):
                if "error" in message:
                    raise EngineError(
                        f"loading {image} into {target.url} failed: {message['error']}"
                    )
        return target.inspect_image(image).id

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


def _command(spec: ContainerSpec) -> list[str] | None:
    return list(spec.command) if spec.command is not None else None
