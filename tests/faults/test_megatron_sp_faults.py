"""Sequence parallelism settings that cannot run: refused before anything runs, one line, exit 2.

Sequence parallelism splits every sequence over the tensor-parallel ranks, so ``data.seq_len``
must be a multiple of ``megatron.tensor_model_parallel_size``; otherwise megatron-core's
sequence scatter fails inside the first forward (a traceback after the run started).
``sequence_parallel`` without tensor parallelism is refused by the config itself.
"""

from __future__ import annotations

import pytest

from tests.faults._train import assert_refused, run_module, tiny_config, write_config

pytestmark = pytest.mark.slow


def _megatron_config(tmp_path, seq_len: int, **megatron) -> dict:
    cfg = tiny_config(tmp_path / "run", tmp_path / "cache")
    cfg.pop("deepspeed")
    cfg["engine"] = "megatron"
    cfg["data"]["seq_len"] = seq_len
    cfg["megatron"] = {"tensor_model_parallel_size": 2, "sequence_parallel": True, **megatron}
    return cfg


SEQ_LEN_LINE = (
    "megatron.sequence_parallel: splits each sequence over the 2 tensor-parallel ranks, but 2 "
    "does not divide data.seq_len=33."
)


def test_validate_refuses_a_seq_len_tp_does_not_divide(tmp_path):
    config = write_config(tmp_path / "run.yaml", _megatron_config(tmp_path, 33))
    proc = run_module("layerfreeze", "validate", "--config", str(config))
    assert_refused(proc, tmp_path / "run", SEQ_LEN_LINE, "multiple of 2")


def test_train_refuses_a_seq_len_tp_does_not_divide_before_anything_runs(tmp_path):
    # through the CPU shim entry, so the line is not only the "needs CUDA" refusal
    config = write_config(tmp_path / "run.yaml", _megatron_config(tmp_path, 33))
    proc = run_module("tests.helpers.megatron_train_entry", "train", "--config", str(config))
    assert_refused(proc, tmp_path / "run", SEQ_LEN_LINE)


def test_validate_accepts_sequence_parallel(tmp_path):
    config = write_config(tmp_path / "run.yaml", _megatron_config(tmp_path, 32))
    proc = run_module("layerfreeze", "validate", "--config", str(config))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "sequence_parallel" not in proc.stderr


def test_sequence_parallel_without_tensor_parallel_is_refused(tmp_path):
    cfg = _megatron_config(tmp_path, 32, tensor_model_parallel_size=1)
    config = write_config(tmp_path / "run.yaml", cfg)
    proc = run_module("layerfreeze", "validate", "--config", str(config))
    assert_refused(
        proc, tmp_path / "run", "megatron.sequence_parallel: needs tensor_model_parallel_size >= 2"
    )
