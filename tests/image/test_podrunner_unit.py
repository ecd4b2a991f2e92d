"""The pod runner's kubelet rules, checked on their own (no podman, no API server): the
``..data`` volume layout and its atomic swap, key projection, ``$(VAR)`` expansion and
fieldRef values. The runner is a stand-in; these say what it stands in for."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from podrunner import AtomicDir, PodStartError, expand, field_value, project_keys


def test_atomic_dir_has_the_kubelet_layout(tmp_path: Path) -> None:
    d = AtomicDir(tmp_path / "vol")
    assert d.write({"bundle.json": (b"one", 0o644), "nested/x": (b"n", 0o600)})
    root = d.path
    data = root / "..data"
    assert data.is_symlink() and os.readlink(data).startswith("..20")
    assert os.readlink(root / "bundle.json") == "..data/bundle.json"
    assert os.readlink(root / "nested") == "..data/nested"
    assert (root / "bundle.json").read_bytes() == b"one"
    assert oct((root / "nested" / "x").stat().st_mode & 0o777) == oct(0o600)
    assert not d.write({"bundle.json": (b"one", 0o644), "nested/x": (b"n", 0o600)})


def test_atomic_dir_swaps_in_one_rename(tmp_path: Path) -> None:
    d = AtomicDir(tmp_path / "vol")
    d.write({"bundle.json": (b"old", 0o644), "gone.json": (b"x", 0o644)})
    first = os.readlink(d.path / "..data")
    inode = (d.path / "bundle.json").stat().st_ino
    with (d.path / "bundle.json").open("rb") as held:
        assert d.write({"bundle.json": (b"new", 0o644)})
        assert held.read() == b"old"  # an open reader keeps the old file whole
    second = os.readlink(d.path / "..data")
    assert second != first and not (d.path / first).exists()
    assert (d.path / "bundle.json").read_bytes() == b"new"
    assert (d.path / "bundle.json").stat().st_ino != inode
    assert not (d.path / "gone.json").is_symlink()
    assert not (d.path / "..data_tmp").exists()
    assert d.swaps == 2


def test_project_keys_follows_items_optional_and_modes() -> None:
    cm = {"data": {"bundle.json": "{}"}, "binaryData": {"b": base64.b64encode(b"\0").decode()}}
    source = {
        "name": "x",
        "optional": True,
        "defaultMode": 0o640,
        "items": [
            {"key": "bundle.json", "path": "bundle.json"},
            {"key": "bundle.json.gz", "path": "bundle.json.gz"},
        ],
    }
    assert project_keys(cm, source, secret=False, what="cm") == {"bundle.json": (b"{}", 0o640)}
    assert project_keys(None, source, secret=False, what="cm") == {}
    everything = project_keys(cm, {"name": "x"}, secret=False, what="cm")
    assert everything == {"bundle.json": (b"{}", 0o644), "b": (b"\0", 0o644)}
    with pytest.raises(PodStartError, match="no key"):
        project_keys(cm, {**source, "optional": False}, secret=False, what="cm")
    with pytest.raises(PodStartError, match="not found"):
        project_keys(None, {"name": "x"}, secret=False, what="cm")
    secret = {"data": {"k": base64.b64encode(b"v").decode()}}
    assert project_keys(secret, {"secretName": "s"}, secret=True, what="s") == {"k": (b"v", 0o644)}


def test_expand_and_field_values() -> None:
    env = {"A": "1", "POD_NAME": "p"}
    assert expand("$(A)-$(POD_NAME)", env) == "1-p"
    assert expand("$$(A) $(UNKNOWN)", env) == "$(A) $(UNKNOWN)"
    pod = {
        "metadata": {"name": "p", "namespace": "n", "uid": "u", "labels": {"app": "g"}},
        "spec": {"serviceAccountName": "sa"},
    }
    assert field_value(pod, "metadata.name") == "p"
    assert field_value(pod, "metadata.labels['app']") == "g"
    assert field_value(pod, "spec.serviceAccountName") == "sa"
    assert field_value(pod, "status.podIP") == "127.0.0.1"
    with pytest.raises(PodStartError):
        field_value(pod, "spec.unknown")
