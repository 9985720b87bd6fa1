"""The flatten's tar work on synthetic layers: merged once, applied once, the same files.

A small reference applier plays Docker's unpack rules on a dict filesystem.
Every test applies the layers one by one and the merged layer once, on the
same base, and compares: the merged layer must be indistinguishable.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.engine.squash import (
    OPAQUE_MARKER,
    WHITEOUT_PREFIX,
    SquashError,
    flatten_archive,
    flattened_config,
    merge_layers,
)


@dataclass(frozen=True)
class E:
    """One tar entry: kind is file, dir, symlink, link (hardlink), whiteout or opaque."""

    path: str
    kind: str = "file"
    data: str = ""
    mode: int = 0o644
    target: str = ""


def layer(*entries: E) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            parent, _, name = entry.path.rpartition("/")
            if entry.kind == "whiteout":
                info = tarfile.TarInfo(f"{parent}/{WHITEOUT_PREFIX}{name}".lstrip("/"))
                tar.addfile(info)
                continue
            if entry.kind == "opaque":
                tar.addfile(tarfile.TarInfo(f"{entry.path}/{OPAQUE_MARKER}"))
                continue
            info = tarfile.TarInfo(entry.path)
            info.mode = entry.mode
            info.mtime = 1_700_000_000
            if entry.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif entry.kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = entry.target
                tar.addfile(info)
            elif entry.kind == "link":
                info.type = tarfile.LNKTYPE
                info.linkname = entry.target
                tar.addfile(info)
            else:
                data = entry.data.encode()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# The reference applier: path -> (kind, data or link target, mode).
Fs = dict[str, tuple[str, str, int]]


def _under(path: str, top: str) -> bool:
    return top == "" or path.startswith(top + "/")


def apply(fs: Fs, tar_bytes: bytes) -> Fs:
    """Docker's unpack of one layer onto ``fs``: opaque dirs, whiteouts, then entries."""
    result = dict(fs)
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        members = tar.getmembers()
        for m in members:
            parent, _, name = m.name.rstrip("/").rpartition("/")
            if name == OPAQUE_MARKER:
                for path in [p for p in result if _under(p, parent)]:
                    del result[path]
        for m in members:
            parent, _, name = m.name.rstrip("/").rpartition("/")
            if name.startswith(WHITEOUT_PREFIX) and name != OPAQUE_MARKER:
                gone = f"{parent}/{name[len(WHITEOUT_PREFIX) :]}".lstrip("/")
                for path in [p for p in result if p == gone or _under(p, gone)]:
                    del result[path]
        for m in members:
            path = m.name.rstrip("/")
            name = path.rpartition("/")[2]
            if name.startswith(WHITEOUT_PREFIX):
                continue
            parts = path.split("/")
            for depth in range(1, len(parts)):
                # Docker's unpack creates a missing parent (MkdirAll, 0755).
                result.setdefault("/".join(parts[:depth]), ("dir", "", 0o755))
            old = result.get(path)
            new_is_dir = m.isdir()
            if old is not None and not (old[0] == "dir" and new_is_dir):
                for other in [p for p in result if _under(p, path)]:
                    del result[other]
            if m.isdir():
                result[path] = ("dir", "", m.mode)
            elif m.issym():
                result[path] = ("symlink", m.linkname, m.mode)
            elif m.islnk():
                target = result[m.linkname]
                result[path] = ("file", target[1], target[2])
            else:
                handle = tar.extractfile(m)
                assert handle is not None
                result[path] = ("file", handle.read().decode(), m.mode)
    return result


def merged(*layers: bytes) -> tuple[bytes, str]:
    out = io.BytesIO()
    diff_id = merge_layers([io.BytesIO(data) for data in layers], out)
    return out.getvalue(), diff_id


def assert_same(base: Fs, *layers: bytes) -> bytes:
    one_by_one = base
    for data in layers:
        one_by_one = apply(one_by_one, data)
    squashed, _ = merged(*layers)
    assert apply(base, squashed) == one_by_one
    return squashed


def names(tar_bytes: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return [m.name.rstrip("/") for m in tar.getmembers()]


BASE: Fs = {
    "etc": ("dir", "", 0o755),
    "etc/conf": ("file", "base conf", 0o644),
    "opt": ("dir", "", 0o755),
    "opt/a": ("file", "base a", 0o644),
    "opt/sub": ("dir", "", 0o755),
    "opt/sub/deep": ("file", "base deep", 0o644),
    "workspace": ("dir", "", 0o755),
}


def test_files_of_every_layer_are_kept_and_the_newest_wins() -> None:
    first = layer(E("workspace", "dir"), E("workspace/log", data="1\n"), E("workspace/x", data="x"))
    second = layer(E("workspace", "dir"), E("workspace/log", data="1\n2\n"))
    squashed = assert_same(BASE, first, second)
    assert apply(BASE, squashed)["workspace/log"] == ("file", "1\n2\n", 0o644)


def test_a_whiteout_of_a_base_file_is_kept_in_the_merged_layer() -> None:
    squashed = assert_same(BASE, layer(E("etc", "dir"), E("etc/conf", "whiteout")))
    assert f"etc/{WHITEOUT_PREFIX}conf" in names(squashed)
    assert "etc/conf" not in apply(BASE, squashed)


def test_a_file_created_then_deleted_stays_deleted() -> None:
    assert_same(
        BASE,
        layer(E("workspace", "dir"), E("workspace/tmp", data="t")),
        layer(E("workspace", "dir"), E("workspace/tmp", "whiteout")),
    )


def test_re_creating_a_deleted_file_cancels_the_whiteout() -> None:
    squashed = assert_same(
        BASE,
        layer(E("etc", "dir"), E("etc/conf", "whiteout")),
        layer(E("etc", "dir"), E("etc/conf", data="new conf")),
    )
    assert f"etc/{WHITEOUT_PREFIX}conf" not in names(squashed)
    assert apply(BASE, squashed)["etc/conf"] == ("file", "new conf", 0o644)


def test_a_directory_deleted_then_re_created_hides_the_base_contents() -> None:
    """Regression guard: without an opaque marker, base's opt/a would come back."""
    squashed = assert_same(
        BASE,
        layer(E("opt", "whiteout")),
        layer(E("opt", "dir"), E("opt/new", data="n")),
    )
    assert f"opt/{OPAQUE_MARKER}" in names(squashed)
    assert sorted(p for p in apply(BASE, squashed) if p.startswith("opt")) == ["opt", "opt/new"]


def test_an_opaque_directory_hides_lower_layers_and_the_base_but_not_its_own_layer() -> None:
    squashed = assert_same(
        BASE,
        layer(E("opt", "dir"), E("opt/from-one", data="1"), E("opt/sub", "dir")),
        layer(E("opt", "dir"), E("opt", "opaque"), E("opt/from-two", data="2")),
        layer(E("opt", "dir"), E("opt/from-three", data="3")),
    )
    assert sorted(p for p in apply(BASE, squashed) if p.startswith("opt")) == [
        "opt",
        "opt/from-three",
        "opt/from-two",
    ]


def test_a_file_replacing_a_directory_and_back() -> None:
    assert_same(
        BASE,
        layer(E("opt", "dir"), E("opt/sub", data="now a file")),
        layer(E("opt", "dir"), E("opt/sub", "dir"), E("opt/sub/fresh", data="f")),
    )


def test_a_file_replacing_a_directory_no_layer_listed_drops_what_was_under_it() -> None:
    """Found by hypothesis: opt/sub/deep written with no entry for opt or opt/sub,
    then opt made a file; opt/sub/deep came back in the merged layer."""
    assert_same(BASE, layer(E("opt/sub/deep", data="d")), layer(E("opt", data="now a file")))


def test_a_path_under_a_deleted_directory_revives_it_as_an_opaque_directory() -> None:
    """A layer that writes opt/x without an entry for opt, after opt was deleted."""
    squashed = assert_same(BASE, layer(E("opt", "whiteout")), layer(E("opt/x", data="x")))
    assert f"opt/{OPAQUE_MARKER}" in names(squashed)


def test_symlinks_and_modes_are_kept() -> None:
    squashed = assert_same(
        BASE,
        layer(
            E("workspace", "dir", mode=0o1777),
            E("workspace/run.sh", data="#!/bin/sh", mode=0o755),
            E("workspace/link", "symlink", target="../etc/conf"),
        ),
        layer(E("workspace/secret", data="s", mode=0o600)),
    )
    fs = apply(BASE, squashed)
    assert fs["workspace"] == ("dir", "", 0o1777)
    assert fs["workspace/run.sh"][2] == 0o755
    assert fs["workspace/link"] == ("symlink", "../etc/conf", 0o644)
    assert fs["workspace/secret"][2] == 0o600


def test_hardlinks_stay_links_when_their_target_survives() -> None:
    squashed = assert_same(
        BASE,
        layer(E("workspace/a", data="shared"), E("workspace/b", "link", target="workspace/a")),
        layer(E("workspace/c", data="c")),
    )
    with tarfile.open(fileobj=io.BytesIO(squashed)) as tar:
        (link,) = [m for m in tar.getmembers() if m.islnk()]
    assert (link.name, link.linkname) == ("workspace/b", "workspace/a")


def test_a_hardlink_whose_target_was_replaced_keeps_the_old_data() -> None:
    squashed = assert_same(
        BASE,
        layer(
            E("workspace/a", data="old"),
            E("workspace/b", "link", target="workspace/a"),
            E("workspace/c", "link", target="workspace/a"),
        ),
        layer(E("workspace/a", data="new")),
    )
    fs = apply(BASE, squashed)
    assert (fs["workspace/a"][1], fs["workspace/b"][1], fs["workspace/c"][1]) == (
        "new",
        "old",
        "old",
    )


def test_a_hardlink_whose_target_was_deleted_keeps_the_data() -> None:
    assert_same(
        BASE,
        layer(E("workspace/a", data="kept"), E("workspace/b", "link", target="workspace/a")),
        layer(E("workspace/a", "whiteout")),
    )


def test_a_hardlink_outside_its_own_layer_is_refused() -> None:
    with pytest.raises(SquashError, match="not a file of its own layer"):
        merged(layer(E("workspace/b", "link", target="etc/conf")))


def test_the_diff_id_is_the_digest_of_every_byte_written() -> None:
    squashed, diff_id = merged(layer(E("workspace/a", data="a")))
    assert diff_id == "sha256:" + hashlib.sha256(squashed).hexdigest()


def test_merging_is_deterministic() -> None:
    layers = [layer(E("workspace/a", data="a")), layer(E("workspace/b", data="b"))]
    assert merged(*layers) == merged(*layers)


# --- hypothesis: any sequence of small changes -----------------------------------

PATHS = ["opt", "opt/a", "opt/sub", "opt/sub/deep", "opt/new", "etc/conf", "workspace/w"]


@st.composite
def layers(draw: st.DrawFn) -> list[list[E]]:
    """Layers a real overlay diff could produce: parents present, no two entries per path."""
    fs = dict(BASE)
    made: list[list[E]] = []
    for _ in range(draw(st.integers(1, 4))):
        entries: dict[str, E] = {}
        for path in draw(st.lists(st.sampled_from(PATHS), max_size=4, unique=True)):
            action = draw(st.sampled_from(["file", "dir", "whiteout", "opaque", "symlink"]))
            parent = path.rpartition("/")[0]
            if any(p == path or _under(path, p) for p in entries if entries[p].kind == "whiteout"):
                continue
            if any(_under(p, path) for p in entries):
                continue
            if any(_under(path, p) and entries[p].kind != "dir" for p in entries):
                continue
            parts = parent.split("/") if parent else []
            for depth in range(1, len(parts) + 1):
                ancestor = "/".join(parts[:depth])
                if fs.get(ancestor, ("",))[0] != "dir" and ancestor not in entries:
                    entries[ancestor] = E(ancestor, "dir")
            if action == "whiteout" and path not in fs:
                continue
            if action == "opaque":
                if fs.get(path, ("",))[0] != "dir":
                    continue
                entries[path] = E(path, "dir")
                entries[path + "/" + OPAQUE_MARKER] = E(path, "opaque")
            else:
                entries[path] = E(path, action, data=f"{path}@{len(made)}", target="x")
        ordered = sorted(entries.values(), key=lambda e: (e.path, e.kind != "dir"))
        made.append(ordered)
        fs = apply(fs, layer(*ordered))
    return made


@settings(max_examples=300, deadline=None)
@given(stack=layers())
def test_any_stack_of_layers_merges_to_the_same_files(stack: Sequence[list[E]]) -> None:
    assert_same(BASE, *(layer(*entries) for entries in stack))


# --- the archive and its config ---------------------------------------------------


def saved_archive(path: Path, config: dict[str, object], layer_tars: Sequence[bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        names_ = []
        for index, data in enumerate(layer_tars):
            name = f"l{index}/layer.tar"
            names_.append(name)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        blob = json.dumps(config).encode()
        info = tarfile.TarInfo("cfg.json")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
        manifest = json.dumps([{"Config": "cfg.json", "RepoTags": None, "Layers": names_}])
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest.encode()))


def config_of(diff_ids: list[str], history: list[dict[str, object]]) -> dict[str, object]:
    return {
        "created": "2026-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/bin"], "Entrypoint": ["/w"], "WorkingDir": "/workspace"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }


def test_flatten_archive_lists_the_base_by_placeholders_and_adds_one_layer(
    tmp_path: Path,
) -> None:
    base_layer = layer(E("etc/conf", data="c"))
    ups = [layer(E("workspace/a", data="a")), layer(E("workspace/b", data="b"))]
    ids = ["sha256:" + hashlib.sha256(data).hexdigest() for data in [base_layer, *ups]]
    history: list[dict[str, object]] = [
        {"created_by": "COPY"},
        {"created_by": "LABEL", "empty_layer": True},
        {"created_by": "commit 1"},
        {"created_by": "commit 2"},
    ]
    saved_archive(tmp_path / "saved.tar", config_of(ids, history), [base_layer, *ups])
    out = tmp_path / "load.tar"
    result = flatten_archive(tmp_path / "saved.tar", out, ids[:1], 2, "repo:tag", "flatten")
    with tarfile.open(out) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        (entry,) = manifest
        config_bytes = tar.extractfile(entry["Config"]).read()  # type: ignore[union-attr]
        assert tar.getmember(entry["Layers"][0]).size == 0
        new_layer = tar.extractfile(entry["Layers"][1]).read()  # type: ignore[union-attr]
    assert entry["RepoTags"] == ["repo:tag"]
    assert result.image_id == "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    config = json.loads(config_bytes)
    assert config["rootfs"]["diff_ids"] == [ids[0], result.diff_id]
    assert result.diff_id == "sha256:" + hashlib.sha256(new_layer).hexdigest()
    assert [h["created_by"] for h in config["history"]] == ["COPY", "LABEL", "flatten"]
    assert config["config"]["Entrypoint"] == ["/w"]
    assert sorted(names(new_layer)) == ["workspace/a", "workspace/b"]
    assert not (tmp_path / "load.tar.layer").exists()


def test_flatten_archive_refuses_an_image_not_built_on_the_base(tmp_path: Path) -> None:
    data = layer(E("a", data="a"))
    ids = ["sha256:" + hashlib.sha256(data).hexdigest()]
    saved_archive(tmp_path / "saved.tar", config_of(ids, [{}]), [data])
    with pytest.raises(SquashError, match="not built on the given base"):
        flatten_archive(tmp_path / "saved.tar", tmp_path / "o.tar", ["sha256:other"], 1, "r:t", "f")


def test_flatten_archive_refuses_an_image_with_nothing_above_the_base(tmp_path: Path) -> None:
    data = layer(E("a", data="a"))
    ids = ["sha256:" + hashlib.sha256(data).hexdigest()]
    saved_archive(tmp_path / "saved.tar", config_of(ids, [{}]), [data])
    with pytest.raises(SquashError, match="nothing to flatten"):
        flatten_archive(tmp_path / "saved.tar", tmp_path / "o.tar", ids, 1, "r:t", "f")


def test_flattened_config_keeps_everything_but_layers_and_history() -> None:
    config = config_of(["sha256:b", "sha256:u1", "sha256:u2"], [{"a": 1}, {"b": 2}, {"c": 3}])
    config["container_config"] = {"Env": ["X=1"]}
    flat = flattened_config(config, ["sha256:b"], 1, "sha256:new", "why")
    assert flat["rootfs"] == {"type": "layers", "diff_ids": ["sha256:b", "sha256:new"]}
    assert flat["history"][0] == {"a": 1}
    assert flat["history"][1]["created_by"] == "why"
    assert {k: v for k, v in flat.items() if k not in ("rootfs", "history")} == {
        k: v for k, v in config.items() if k not in ("rootfs", "history")
    }
