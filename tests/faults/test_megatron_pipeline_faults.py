"""Hostile / unsupported Megatron pipeline settings: refused before anything runs, one line, exit 2.

``megatron.sequence_parallel: true`` used to reach megatron-core's ``WrappedTorchNorm`` assertion
(a traceback) after the run had started; layerfreeze's adapters do not handle sequence-sharded
activations yet, so ``layerfreeze validate`` and ``layerfreeze train`` refuse it up front.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.faults._train import REPO, last_line, launcher_env, tiny_config, write_config

pytestmark = pytest.mark.slow


def _megatron_config(tmp_path, **megatron) -> dict:
    cfg = tiny_config(tmp_path / "run", tmp_path / "cache")
    cfg.pop("deepspeed")
    cfg["engine"] = "megatron"
    cfg["megatron"] = {"tensor_model_parallel_size": 2, **megatron}
    return cfg


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    from tests.helpers.dist import find_free_port

    env = launcher_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(find_free_port()))
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=300,
    )


def _assert_refused(proc: subprocess.CompletedProcess, out_dir) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    line = last_line(proc.stderr)
    assert "megatron.sequence_parallel: not supported yet, got true." in line, proc.stderr[-4000:]
    assert "sequence-parallel" in line and "no TE on CPU" in line
    assert "Set megatron.sequence_parallel: false" in line
    assert not out_dir.exists()


def test_validate_refuses_sequence_parallel(tmp_path):
    config = write_config(tmp_path / "run.yaml", _megatron_config(tmp_path, sequence_parallel=True))
    proc = _cli("layerfreeze", "validate", "--config", str(config))
    _assert_refused(proc, tmp_path / "run")


def test_train_refuses_sequence_parallel_before_anything_runs(tmp_path):
    # through the CPU shim entry, so the line is not only the "needs CUDA" refusal (one plain
    # process: the world-size problem of TP=2 is reported on the same line)
    config = write_config(tmp_path / "run.yaml", _megatron_config(tmp_path, sequence_parallel=True))
    proc = _cli("tests.helpers.megatron_train_entry", "train", "--config", str(config))
    _assert_refused(proc, tmp_path / "run")
