"""Squash an image's layers above its base into one: pure tar and config work.

A snapshot of a snapshot adds one layer per run, and a layer chain has a hard
limit (Docker refuses more than 125). Starting over from the base loses the
workspace, so a deep snapshot is flattened instead: the layers above the base
are merged into ONE layer that, applied on the base, gives the same files.

This module knows the OCI/Docker layer rules and the ``docker save`` archive
layout, and nothing of the daemon: ``DockerEngine.flatten_image`` feeds it a
saved archive and loads what it writes. The rules it applies between the
merged layers (those of ``pkg/archive`` in Docker 20.10):

- ``DIR/.wh.NAME`` deletes ``DIR/NAME`` (and all under it) of the layers below;
- ``DIR/.wh..wh..opq`` hides everything below in ``DIR`` (the dir stays);
- a later layer re-creating a path cancels an earlier deletion of it; a
  re-created directory is opaque, or the base's old contents would show again;
- a hardlink names a file of its own layer.

Whiteouts and opaque markers are KEPT in the merged layer: they may hide files
of the base, which the merged layer sits on.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import posixpath
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

__all__ = [
    "OPAQUE_MARKER",
    "WHITEOUT_PREFIX",
    "FlattenedArchive",
    "SquashError",
    "flatten_archive",
    "flattened_config",
    "merge_layers",
]

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
# PAX records tarfile recomputes from a member's fields; a stale copy would override them.
_RECOMPUTED_PAX = frozenset({"path", "linkpath", "size"})
_CHUNK = 1024 * 1024


class SquashError(ValueError):
    """The input is not what a flatten needs (not a descendant of the base, a broken archive)."""


@dataclass
class _Node:
    """What the merged layers hold at one path: a member of layer ``layer``, or a whiteout."""

    kind: Literal["member", "whiteout"]
    layer: int
    member: tarfile.TarInfo


@dataclass
class _Merged:
    nodes: dict[str, _Node] = field(default_factory=dict)
    children: dict[str, set[str]] = field(default_factory=dict)
    opaque: set[str] = field(default_factory=set)

    def put(self, path: str, node: _Node) -> None:
        self.nodes[path] = node
        # Index every ancestor, listed or not: a layer may write a/b/c with no entry for a.
        child = path
        while child:
            parent = posixpath.dirname(child)
            self.children.setdefault(parent, set()).add(child)
            child = parent

    def drop(self, path: str) -> None:
        """Forget ``path`` and everything under it."""
        for child in list(self.children.pop(path, ())):
            self.drop(child)
        self.nodes.pop(path, None)
        self.children.get(posixpath.dirname(path), set()).discard(path)
        self.opaque.discard(path)

    def drop_below(self, path: str) -> None:
        """Forget everything under ``path``, keeping ``path`` itself."""
        for child in list(self.children.get(path, ())):
            self.drop(child)


def _normalize(name: str) -> str:
    """Tar names come as ``./a/b/``, ``a/b`` or ``/a/b``: one spelling, relative, no slash."""
    path = posixpath.normpath("/" + name).lstrip("/")
    return "" if path == "." else path


def _is_dir(node: _Node | None) -> bool:
    return node is not None and node.kind == "member" and node.member.isdir()


def _synthetic_dir(path: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info


def _apply_layer(merged: _Merged, index: int, members: Sequence[tarfile.TarInfo]) -> None:
    """Put one layer on top of ``merged``: opaque markers, then whiteouts, then entries.

    In one layer a whiteout and a re-created path cannot both exist, and an
    opaque directory keeps the entries of its own layer, so this order is the
    order the layer means.
    """
    opaques: list[tuple[str, tarfile.TarInfo]] = []
    whiteouts: list[tuple[str, tarfile.TarInfo]] = []
    entries: list[tuple[str, tarfile.TarInfo]] = []
    for member in members:
        path = _normalize(member.name)
        if not path:
            continue  # the root entry: nothing to merge
        parent, base = posixpath.split(path)
        if base == OPAQUE_MARKER:
            opaques.append((parent, member))
        elif base.startswith(WHITEOUT_PREFIX):
            whiteouts.append((posixpath.join(parent, base[len(WHITEOUT_PREFIX) :]), member))
        else:
            entries.append((path, member))
    for directory, _marker in opaques:
        merged.drop_below(directory)
        merged.opaque.add(directory)
    for path, marker in whiteouts:
        merged.drop(path)
        merged.put(path, _Node("whiteout", index, marker))
    for path, member in entries:
        _ensure_parents(merged, path, index)
        previous = merged.nodes.get(path)
        if not member.isdir():
            # Anything below a path that is now a file is gone, listed or not.
            merged.drop_below(path)
        if previous is not None and not (_is_dir(previous) and member.isdir()):
            merged.drop(path)
            if member.isdir():
                # A directory where a layer below deleted the path or put a file:
                # whatever the base had in it must stay hidden.
                merged.opaque.add(path)
        merged.put(path, _Node("member", index, member))


def _ensure_parents(merged: _Merged, path: str, index: int) -> None:
    """A path under a deleted (or non-directory) ancestor revives that ancestor as an
    opaque directory: whatever the base had there stays hidden."""
    parts = path.split("/")[:-1]
    for depth in range(1, len(parts) + 1):
        ancestor = "/".join(parts[:depth])
        node = merged.nodes.get(ancestor)
        if node is None or _is_dir(node):
            continue
        merged.drop(ancestor)
        merged.put(ancestor, _Node("member", index, _synthetic_dir(ancestor)))
        merged.opaque.add(ancestor)


def _sort_key(path: str) -> tuple[str, ...]:
    # By components: a directory comes before everything in it.
    return tuple(path.split("/"))


class _HashingWriter:
    """A write-only file that hashes what passes through: the layer's diff ID."""

    def __init__(self, target: IO[bytes]) -> None:
        self._target = target
        self._digest = hashlib.sha256()
        self._offset = 0

    def write(self, data: bytes) -> int:
        self._digest.update(data)
        self._offset += len(data)
        self._target.write(data)
        return len(data)

    def tell(self) -> int:
        return self._offset

    def flush(self) -> None:
        self._target.flush()

    def diff_id(self) -> str:
        return "sha256:" + self._digest.hexdigest()


def _copy_member(member: tarfile.TarInfo, name: str) -> tarfile.TarInfo:
    info = copy.copy(member)
    info.name = name
    info.pax_headers = {
        key: value for key, value in member.pax_headers.items() if key not in _RECOMPUTED_PAX
    }
    return info


def merge_layers(layers: Sequence[IO[bytes]], out: IO[bytes]) -> str:
    """Write to ``out`` one layer tar equal to ``layers`` (bottom first) applied in order.

    ``layers`` must be seekable uncompressed tars. Returns the merged layer's
    diff ID: the sha256 of every byte written, as the daemon computes it on load.
    """
    with contextlib.ExitStack() as stack:
        tars = [stack.enter_context(tarfile.open(fileobj=layer, mode="r:")) for layer in layers]
        by_layer: list[dict[str, tarfile.TarInfo]] = []
        merged = _Merged()
        for index, tar in enumerate(tars):
            try:
                members = tar.getmembers()
            except tarfile.TarError as exc:
                raise SquashError(f"layer {index} is not a readable tar: {exc}") from exc
            by_layer.append({_normalize(m.name): m for m in members})
            _apply_layer(merged, index, members)
        writer = _HashingWriter(out)
        with tarfile.open(fileobj=writer, mode="w", format=tarfile.PAX_FORMAT) as result:  # type: ignore[call-overload]
            _write_merged(result, merged, tars, by_layer)
        return writer.diff_id()


def _write_merged(
    result: tarfile.TarFile,
    merged: _Merged,
    tars: Sequence[tarfile.TarFile],
    by_layer: Sequence[Mapping[str, tarfile.TarInfo]],
) -> None:
    """Everything but hardlinks in path order (parents first), then the hardlinks,
    so that every link's target is already written when the link is applied."""
    links: list[tuple[str, _Node]] = []
    for path in sorted(merged.nodes, key=_sort_key):
        node = merged.nodes[path]
        if node.kind == "whiteout":
            parent, base = posixpath.split(path)
            result.addfile(
                _copy_member(node.member, posixpath.join(parent, WHITEOUT_PREFIX + base))
            )
            continue
        if node.member.islnk():
            links.append((path, node))
            continue
        _write_member(result, path, node.member, tars[node.layer])
        if path in merged.opaque:
            result.addfile(_opaque_marker(path, by_layer[node.layer].get(path)))
    # A directory made opaque without an entry of its own (the root) still needs its marker.
    for directory in sorted(merged.opaque, key=_sort_key):
        if directory not in merged.nodes:
            result.addfile(_opaque_marker(directory, None))
    _write_links(result, merged, links, tars, by_layer)


def _opaque_marker(directory: str, source: tarfile.TarInfo | None) -> tarfile.TarInfo:
    marker = tarfile.TarInfo(posixpath.join(directory, OPAQUE_MARKER))
    marker.mode = 0o600
    if source is not None:
        marker.uid, marker.gid, marker.mtime = source.uid, source.gid, source.mtime
    return marker


def _write_member(
    result: tarfile.TarFile, path: str, member: tarfile.TarInfo, source: tarfile.TarFile
) -> None:
    info = _copy_member(member, path)
    if member.isreg():
        data = source.extractfile(member)
        if data is None:  # pragma: no cover - tarfile gives a file for every regular member
            raise SquashError(f"cannot read {path} from its layer")
        with data:
            result.addfile(info, data)
    else:
        result.addfile(info)


def _write_links(
    result: tarfile.TarFile,
    merged: _Merged,
    links: Sequence[tuple[str, _Node]],
    tars: Sequence[tarfile.TarFile],
    by_layer: Sequence[Mapping[str, tarfile.TarInfo]],
) -> None:
    """A link whose target a later layer replaced or deleted keeps the old data:
    the first such link of its group becomes the file, the others link to it."""
    stand_in: dict[tuple[int, str], str] = {}
    for path, node in links:
        target = _normalize(node.member.linkname)
        original = by_layer[node.layer].get(target)
        if original is None or not original.isreg():
            raise SquashError(
                f"hardlink {path} of layer {node.layer} names {target!r}, "
                "which is not a file of its own layer"
            )
        kept = merged.nodes.get(target)
        if kept is not None and kept.kind == "member" and kept.member is original:
            stand_in[(node.layer, target)] = target
        group = (node.layer, target)
        if group in stand_in:
            info = _copy_member(node.member, path)
            info.linkname = stand_in[group]
            result.addfile(info)
            continue
        stand_in[group] = path
        _write_member(result, path, original, tars[node.layer])


@dataclass(frozen=True)
class FlattenedArchive:
    """What ``flatten_archive`` wrote: the new image's ID and its one layer's diff ID."""

    image_id: str
    diff_id: str
    layers_merged: int


def flattened_config(
    config: Mapping[str, Any],
    base_diff_ids: Sequence[str],
    base_history_len: int,
    diff_id: str,
    created_by: str,
) -> dict[str, Any]:
    """The snapshot's config with its layers above the base replaced by ``diff_id``.

    Env, entrypoint, cmd, workdir and labels are the snapshot's, untouched; the
    history keeps the base's entries and says what happened to the rest.
    """
    rootfs = config.get("rootfs") or {}
    diff_ids = list(rootfs.get("diff_ids") or ())
    if diff_ids[: len(base_diff_ids)] != list(base_diff_ids):
        raise SquashError("the image is not built on the given base: its first layers differ")
    history = list(config.get("history") or ())
    if len(history) < base_history_len:
        raise SquashError("the image's history is shorter than its base's")
    created = config.get("created")
    entry: dict[str, Any] = {"created_by": created_by, "comment": "snapyard flatten"}
    if created is not None:
        entry["created"] = created
    flattened = dict(config)
    flattened["rootfs"] = {**rootfs, "diff_ids": [*base_diff_ids, diff_id]}
    flattened["history"] = [*history[:base_history_len], entry]
    return flattened


def _read_json(archive: tarfile.TarFile, name: str) -> Any:
    handle = archive.extractfile(name)
    if handle is None:
        raise SquashError(f"{name} is not a file in the saved archive")
    with handle:
        return json.load(handle)


def _open_layers(archive: tarfile.TarFile, names: Sequence[str]) -> Iterator[IO[bytes]]:
    for name in names:
        handle = archive.extractfile(name)  # follows the archive's symlinks to shared layers
        if handle is None:
            raise SquashError(f"layer {name} is not a file in the saved archive")
        yield handle


def flatten_archive(
    saved: Path,
    out: Path,
    base_diff_ids: Sequence[str],
    base_history_len: int,
    repo_tag: str,
    created_by: str,
) -> FlattenedArchive:
    """Turn ``docker save`` of one image into a ``docker load`` archive of its flattened form.

    The base layers are listed by empty placeholder files: the daemon loads a
    layer only when its chain ID is unknown, and the base's are known (the
    saved image holds them). The new image is tagged ``repo_tag`` on load.
    """
    work = out.parent
    layer_path = work / f"{out.name}.layer"
    try:
        with tarfile.open(saved, mode="r:") as archive:
            manifest = _read_json(archive, "manifest.json")
            if not isinstance(manifest, list) or len(manifest) != 1:
                raise SquashError("the saved archive must hold exactly one image")
            entry = manifest[0]
            config = _read_json(archive, entry["Config"])
            layers: list[str] = list(entry["Layers"])
            diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or ())
            if len(layers) != len(diff_ids):
                raise SquashError("the saved manifest and config disagree on the layers")
            if diff_ids[: len(base_diff_ids)] != list(base_diff_ids):
                raise SquashError(
                    "the image is not built on the given base: its first layers differ"
                )
            above = layers[len(base_diff_ids) :]
            if not above:
                raise SquashError("the image has no layer above its base: nothing to flatten")
            with layer_path.open("wb") as merged_out:
                diff_id = merge_layers(list(_open_layers(archive, above)), merged_out)
        new_config = flattened_config(config, base_diff_ids, base_history_len, diff_id, created_by)
        config_bytes = json.dumps(new_config, separators=(",", ":")).encode()
        image_hex = hashlib.sha256(config_bytes).hexdigest()
        placeholders = [f"base/{index}.tar" for index in range(len(base_diff_ids))]
        layer_name = f"{diff_id.removeprefix('sha256:')}/layer.tar"
        load_manifest = [
            {
                "Config": f"{image_hex}.json",
                "RepoTags": [repo_tag],
                "Layers": [*placeholders, layer_name],
            }
        ]
        with tarfile.open(out, mode="w") as loading:
            _add_bytes(loading, "manifest.json", json.dumps(load_manifest).encode())
            _add_bytes(loading, f"{image_hex}.json", config_bytes)
            for name in placeholders:
                _add_bytes(loading, name, b"")
            loading.add(layer_path, arcname=layer_name)
    except (KeyError, TypeError, json.JSONDecodeError, tarfile.TarError) as exc:
        raise SquashError(f"the saved archive is not shaped like `docker save`: {exc}") from exc
    finally:
        layer_path.unlink(missing_ok=True)
    return FlattenedArchive("sha256:" + image_hex, diff_id, len(above))


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))
