"""``megatron.transformer_impl`` settings that cannot run: refused before anything runs, one line,
exit 2.

The Transformer Engine spec needs a CUDA device and an importable ``transformer_engine``
(megatron-core's ``HAVE_TE``). Without them the model build would fail deep inside megatron-core
(``TENorm`` / ``TELayerNormColumnParallelLinear`` raise ``ImportError`` in ``__init__``), after the
process group is up; ``layerfreeze validate`` and ``layerfreeze train`` say it first, naming the
key and the choice that works (``local``). An unknown implementation name is refused by the
config schema. The CPU machines of this project have neither CUDA nor Transformer Engine, so the
refusal is what runs here; on a machine with both, the refusal tests skip.
"""

from __future__ import annotations

import pytest
import torch

from tests.faults._train import assert_refused, run_module, tiny_config, write_config

pytestmark = pytest.mark.slow


def _te_runs_here() -> bool:
    if not torch.cuda.is_available():
        return False
    from megatron.core.extensions import transformer_engine as mte

    return bool(mte.HAVE_TE)


needs_no_te = pytest.mark.skipif(
    _te_runs_here(), reason="CUDA and Transformer Engine are present: nothing to refuse"
)


def _megatron_config(tmp_path, **megatron) -> dict:
    cfg = tiny_config(tmp_path / "run", tmp_path / "cache")
    cfg.pop("deepspeed")
    cfg["engine"] = "megatron"
    cfg["megatron"] = dict(megatron)
    return cfg


#: what the refusal must say: the key, what is missing, and what works instead
TE_NEEDLES = (
    "megatron.transformer_impl: transformer_engine needs CUDA and an importable "
    "transformer_engine, got ",
    "transformer_engine not importable (",
    "Set megatron.transformer_impl: local",
)


@needs_no_te
def test_validate_refuses_transformer_engine_without_cuda_or_te(tmp_path):
    config = write_config(
        tmp_path / "run.yaml", _megatron_config(tmp_path, transformer_impl="transformer_engine")
    )
    proc = run_module("layerfreeze", "validate", "--config", str(config))
    line = assert_refused(proc, tmp_path / "run", *TE_NEEDLES)
    if not torch.cuda.is_available():
        assert "no CUDA device (torch " in line, line
        # one line about the one choice: not also the generic "engine: megatron needs CUDA"
        assert "engine: megatron needs CUDA" not in line, line


@needs_no_te
def test_validate_refuses_transformer_engine_given_as_override(tmp_path):
    config = write_config(tmp_path / "run.yaml", _megatron_config(tmp_path))
    proc = run_module(
        "layerfreeze",
        "validate",
        "--config",
        str(config),
        "megatron.transformer_impl=transformer_engine",
    )
    assert_refused(proc, tmp_path / "run", *TE_NEEDLES)


@needs_no_te
def test_train_refuses_transformer_engine_before_anything_runs(tmp_path):
    # through the CPU shim entry (it answers torch.cuda.current_device, so the generic megatron
    # CUDA check passes): the Transformer Engine check must not be fooled by it
    config = write_config(
        tmp_path / "run.yaml", _megatron_config(tmp_path, transformer_impl="transformer_engine")
    )
    proc = run_module("tests.helpers.megatron_train_entry", "train", "--config", str(config))
    assert_refused(proc, tmp_path / "run", *TE_NEEDLES)


def test_unknown_transformer_impl_is_refused(tmp_path):
    config = write_config(tmp_path / "run.yaml", _megatron_config(tmp_path))
    proc = run_module(
        "layerfreeze", "validate", "--config", str(config), "megatron.transformer_impl=te"
    )
    assert_refused(
        proc,
        tmp_path / "run",
        "megatron.transformer_impl: must be one of 'local', 'transformer_engine', got 'te'.",
    )


def test_validate_accepts_transformer_impl_local(tmp_path):
    config = write_config(
        tmp_path / "run.yaml", _megatron_config(tmp_path, transformer_impl="local")
    )
    proc = run_module("layerfreeze", "validate", "--config", str(config))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "transformer_impl: local" in proc.stdout
    assert "transformer_engine" not in proc.stderr
