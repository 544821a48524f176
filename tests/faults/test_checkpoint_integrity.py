"""Damaged checkpoints never go unnoticed: a run that has checkpoints never silently restarts
from step 0, and a corrupted file (even one of the same size) is caught before it is loaded.

Every test trains the same tiny model for real (DeepSpeed, one process) and damages its
checkpoints on disk the way a full disk, a bad node or a stray copy does."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.faults._train import last_line, tiny_config, train, tree_snapshot, write_config

pytestmark = pytest.mark.slow

DS_FILE = "ds/mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4; tests work on copies."""
    tmp = tmp_path_factory.mktemp("integrity")
    out = tmp / "run"
    config = write_config(tmp / "cfg.yaml", tiny_config(out, tmp / "cache"))
    proc = train(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return config, out


def _copy(trained, tmp_path: Path) -> tuple[Path, Path]:
    config, out = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    return config, run


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("case", ["only_checkpoint", "every_checkpoint"])
def test_all_checkpoints_damaged_exits_2_and_touches_nothing(trained, tmp_path, case):
    config, run = _copy(trained, tmp_path)
    ck = run / "checkpoints"
    if case == "only_checkpoint":
        shutil.rmtree(ck / "step_00000002")
        damaged = ["step_00000004"]
    else:
        damaged = ["step_00000002", "step_00000004"]
    for tag in damaged:
        _truncate(ck / tag / DS_FILE)
    before = tree_snapshot(run)
    metrics = (run / "metrics.jsonl").read_bytes()

    proc = train(config, f"logging.out_dir={run}", "train.steps=6")

    assert proc.returncode == 2, proc.stderr[-3000:]
    line = last_line(proc.stderr)
    assert "Traceback" not in proc.stderr
    for tag in damaged:  # each damaged checkpoint and why
        assert str(ck / tag) in line, line
    assert line.count(DS_FILE) == len(damaged) and "bytes" in line, line
    assert "checkpoint.resume=none" in line and "logging.out_dir" in line, line  # how to go on
    assert tree_snapshot(run) == before
    assert (run / "metrics.jsonl").read_bytes() == metrics
