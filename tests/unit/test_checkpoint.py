"""Checkpoint directory management: atomic commit, ``latest``, keep-last-N, validation, and a
process killed mid-save leaving the previous checkpoint and ``latest`` intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from layerfreeze import checkpoint as ckpt


def _save(
    root: Path, step: int, payload: bytes = b"weights", keep_last: int | None = None, meta=None
):
    staging = ckpt.prepare_staging(root, step)
    (staging / "ds").mkdir()
    (staging / "ds" / "model.bin").write_bytes(payload * 10)
    (staging / "client.json").write_text(json.dumps({"step": step}))
    return ckpt.commit_checkpoint(root, staging, step, meta or {"step": step}, keep_last=keep_last)


def test_commit_layout_latest_and_manifest(tmp_path):
    info = _save(tmp_path, 10, meta={"phase": 1})
    assert info.path == tmp_path / "step_00000010" and info.tag == "step_00000010"
    assert (tmp_path / "latest").read_text().strip() == "step_00000010"
    manifest = json.loads((info.path / "manifest.json").read_text())
    assert manifest["files"] == {"client.json": len(json.dumps({"step": 10})), "ds/model.bin": 70}
    assert manifest["meta"] == {"phase": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    again = ckpt.resolve_checkpoint(tmp_path)
    assert (again.step, again.meta, again.path) == (10, {"phase": 1}, info.path)
    assert ckpt.resolve_checkpoint(info.path).step == 10  # a checkpoint directory itself


def test_keep_last_prunes_oldest_and_latest_follows(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep_last=2)
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest",
        "step_00000003",
        "step_00000004",
    ]
    assert ckpt.resolve_checkpoint(tmp_path).step == 4
    assert ckpt.resolve_checkpoint(tmp_path, tag="step_00000003").step == 3


def test_resave_same_step_replaces(tmp_path):
    _save(tmp_path, 5, payload=b"a")
    info = _save(tmp_path, 5, payload=b"bb")
    assert (info.path / "ds" / "model.bin").read_bytes() == b"bb" * 10
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [5]


def test_unreadable_checkpoints_give_clear_errors(tmp_path):
    info = _save(tmp_path, 7)
    (info.path / "ds" / "model.bin").write_bytes(b"x")  # truncated
    with pytest.raises(
        ckpt.CheckpointError, match=r"damaged: ds/model.bin has 1 bytes, manifest says 70"
    ):
        ckpt.resolve_checkpoint(tmp_path)
    (info.path / "ds" / "model.bin").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"ds/model.bin is missing"):
        ckpt.validate_checkpoint(info.path)
    (info.path / "manifest.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match=r"unreadable checkpoint manifest"):
        ckpt.validate_checkpoint(info.path)
    (info.path / "manifest.json").unlink()
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"manifest.json is missing; the save that wrote it was probably interrupted",
    ):
        ckpt.resolve_checkpoint(tmp_path)
    assert ckpt.list_checkpoints(tmp_path) == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match=r"no checkpoint found"):
        ckpt.resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(ckpt.CheckpointError, match=r"does not exist"):
        ckpt.resolve_checkpoint(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"keep_last: must be a positive int"):
        _save(tmp_path, 8, keep_last=0)


def test_no_latest_falls_back_to_newest_complete(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    (tmp_path / "latest").unlink()
    (tmp_path / "step_00000003").mkdir()  # incomplete: never listed
    assert ckpt.resolve_checkpoint(tmp_path).step == 2


_KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from layerfreeze import checkpoint as ckpt

    root = Path(sys.argv[1])
    when = sys.argv[2]
    staging = ckpt.prepare_staging(root, 2)
    (staging / "model.bin").write_bytes(b"new" * 1000)
    if when == "staging":
        os.kill(os.getpid(), signal.SIGKILL)
    if when == "before_latest":
        # die between the directory rename and the pointer update
        import layerfreeze.checkpoint as mod
        def die(*a, **k):
            os.kill(os.getpid(), signal.SIGKILL)
        mod.atomic_write_text = die
    ckpt.commit_checkpoint(root, staging, 2, {"step": 2})
    """
)


@pytest.mark.parametrize("when", ["staging", "before_latest"])
def test_process_killed_during_save_keeps_previous(tmp_path, when):
    _save(tmp_path, 1, payload=b"old")
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_SAVE, str(tmp_path), when],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (tmp_path / "latest").read_text().strip() == "step_00000001"
    info = ckpt.resolve_checkpoint(tmp_path)
    assert info.step == 1 and (info.path / "ds" / "model.bin").read_bytes() == b"old" * 10
    if when == "before_latest":  # the renamed directory is complete and valid, just not pointed at
        assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [1, 2]
    # the next save cleans the leftovers and commits normally
    _save(tmp_path, 3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert ckpt.resolve_checkpoint(tmp_path).step == 3


def test_manifest_records_sha256_and_content_check_finds_same_size_changes(tmp_path):
    import hashlib

    info = _save(tmp_path, 3, payload=b"abc")
    manifest = json.loads((info.path / "manifest.json").read_text())
    assert manifest["sha256"] == {
        rel: hashlib.sha256((info.path / rel).read_bytes()).hexdigest() for rel in manifest["files"]
    }
    assert ckpt.content_problems(ckpt.validate_checkpoint(info.path)) == []
    (info.path / "ds" / "model.bin").write_bytes(b"abd" * 10)  # same size, other bytes
    again = ckpt.validate_checkpoint(info.path)  # the size check cannot see it
    assert ckpt.content_problems(again) == [
        "ds/model.bin content differs from the checksum recorded at save time (same size, "
        "changed bytes)"
    ]
    assert ckpt.content_problems(again, ["client.json"]) == []
    manifest.pop("sha256")  # a manifest written before checksums: size check only
    (info.path / "manifest.json").write_text(json.dumps(manifest))
    old = ckpt.validate_checkpoint(info.path)
    assert old.sha256 == {} and ckpt.content_problems(old) == []


def test_scan_checkpoints_splits_intact_and_damaged(tmp_path):
    _save(tmp_path, 1)
    bad = _save(tmp_path, 2)
    (bad.path / "ds" / "model.bin").write_bytes(b"x")
    (tmp_path / "step_00000003").mkdir()
    intact, damaged = ckpt.scan_checkpoints(tmp_path)
    assert [c.step for c in intact] == [1]
    assert [(p.name, why) for p, why in damaged] == [
        ("step_00000002", "ds/model.bin has 1 bytes, manifest says 70"),
        ("step_00000003", "manifest.json is missing (the save that wrote it was probably "
                          "interrupted)"),
    ]


def test_engine_problems_name_the_engine_and_the_differing_plan_fields():
    from layerfreeze.resume import engine_problems, field_diff

    schedule = [{"plan": {"name": "freeze_deep", "default": "freeze"}, "until_step": None}]
    assert engine_problems({"engine": "deepspeed", "schedule": schedule}, engine="deepspeed",
                           schedule=schedule) == []
    (wrong,) = engine_problems({"engine": "megatron", "schedule": schedule}, engine="deepspeed",
                               schedule=schedule)
    assert wrong.startswith("it was saved by engine 'megatron', this run uses engine: deepspeed")
    other = [{"plan": {"name": "full", "default": "full"}, "until_step": None}]
    (plan,) = engine_problems({"engine": "megatron", "schedule": schedule}, engine="megatron",
                              schedule=other)
    assert plan.startswith(
        "the plan differs (plan.schedule[0].plan.name: 'freeze_deep' in the checkpoint, 'full' in "
        "this run; plan.schedule[0].plan.default: 'freeze' in the checkpoint, 'full' in this run)"
    )
    assert field_diff({"a": [1, 2]}, {"a": [1, 3], "b": 0}, "x") == [
        "x.a[1]: 2 in the checkpoint, 3 in this run", "x.b: '<unset>' in the checkpoint, 0 in this run"
    ]


def test_allow_model_change_lets_only_the_named_non_shape_fields_differ():
    from layerfreeze.resume import allowed_model_changes, run_problems

    saved = {"model": {"hidden_size": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-6}}
    current = {"model": {"hidden_size": 64, "rope_theta": 500000.0, "rms_norm_eps": 1e-5}}
    problems = run_problems(saved, current)
    assert len(problems) == 1 and "rope_theta: 10000.0 in the checkpoint" in problems[0]
    assert "rms_norm_eps" in problems[0] and "checkpoint.allow_model_change" in problems[0]
    only_eps = run_problems(saved, current, ["rope_theta"])
    assert "rope_theta: " not in only_eps[0] and "rms_norm_eps: " in only_eps[0]
    assert run_problems(saved, current, ["rope_theta", "rms_norm_eps"]) == []
    assert allowed_model_changes(saved, current, ["rope_theta"]) == [
        "model.rope_theta: 10000.0 in the checkpoint, 500000.0 in this run"
    ]


def test_allow_model_change_refuses_shape_fields_by_name():
    import pytest

    from layerfreeze.config import CheckpointConfig
    from layerfreeze.errors import ConfigError

    assert CheckpointConfig(allow_model_change=["rope_theta"]).allow_model_change == ["rope_theta"]
    with pytest.raises(ConfigError, match=r"checkpoint.allow_model_change: 'hidden_size' cannot"):
        CheckpointConfig(allow_model_change=["hidden_size"])
