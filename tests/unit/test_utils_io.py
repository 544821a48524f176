"""Atomic writes: a failure mid-write leaves the previous content intact and no temp files."""

from __future__ import annotations

import json

import pytest

from layerfreeze.utils.io import atomic_directory, atomic_write_json, atomic_write_text


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "x.json"
    atomic_write_json(target, {"k": "中文"})
    atomic_write_json(target, {"k": 2})
    assert json.loads(target.read_text(encoding="utf-8")) == {"k": 2}
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.json"]
    atomic_write_text(target, "plain")
    assert target.read_text() == "plain"


def test_atomic_directory_failure_keeps_old_content(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as d:
        (d / "w.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target) as d:
            (d / "w.bin").write_bytes(b"half")
            raise RuntimeError("boom")
    assert (target / "w.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with atomic_directory(target) as d:
        (d / "w.bin").write_bytes(b"new")
    assert (target / "w.bin").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_directory(target, overwrite=False):
            pass
