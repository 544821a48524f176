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


def test_check_output_path_rule(tmp_path):
    from layerfreeze.utils.io import check_output_path

    check_output_path(tmp_path / "new", overwrite=False)  # missing: written
    (tmp_path / "empty").mkdir()
    check_output_path(tmp_path / "empty", overwrite=False)  # empty: written
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match=r"already exists and is not empty.*--overwrite"):
        check_output_path(tmp_path / "full", overwrite=False)
    check_output_path(tmp_path / "full", overwrite=True)
    with pytest.raises(ValueError, match=r"exists and is a file; the output is a directory"):
        check_output_path(tmp_path / "full" / "x", overwrite=True)
    with pytest.raises(ValueError, match=r"--pred: .* is a directory; give a file path"):
        check_output_path(tmp_path / "full", overwrite=True, flag="--pred", kind="file")


def test_atomic_directory_never_replaces_a_run_directory(tmp_path):
    from layerfreeze import checkpoint as ckpt

    run = tmp_path / "run"
    staging = ckpt.prepare_staging(run / "checkpoints", 4)
    (staging / "w.bin").write_bytes(b"w")
    ckpt.commit_checkpoint(run / "checkpoints", staging, 4)
    with pytest.raises(FileExistsError, match=r"holds a training run \(checkpoint .*step_00000004"):
        with atomic_directory(run, overwrite=True) as d:
            (d / "export.bin").write_bytes(b"e")
    assert (run / "checkpoints" / "step_00000004" / "w.bin").read_bytes() == b"w"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
