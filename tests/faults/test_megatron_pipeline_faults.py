"""Hostile / unsupported Megatron pipeline settings: refused before anything runs, one line, exit 2.

``megatron.sequence_parallel: true`` used to reach megatron-core's ``WrappedTorchNorm`` assertion
(a traceback) after the run had started; layerfreeze's adapters do not handle sequence-sharded
activations yet, so ``layerfreeze validate`` and ``layerfreeze train`` refuse it up front.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

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
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
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


# ---------------------------------------------------------------------------------------------
# A base (plan-free) dist checkpoint into a planned model: only adapter keys may be missing.

PLAN = "0:freeze,1:lora(r=4,target=mlp),2:lora(r=4,target=all,gated),3:prefix(tokens=2,gated)"


def _base_checkpoint(directory, drop: str | None = None) -> None:
    """Save the plan-free tiny GPT (seed 3) with megatron-core, optionally without one key."""
    from megatron.core import dist_checkpointing

    from tests.helpers.megatron import build_tiny_gpt

    sd = build_tiny_gpt(seed=3).sharded_state_dict()
    if drop is not None:
        assert drop in sd
        sd.pop(drop)
    directory.mkdir()
    dist_checkpointing.save(sd, str(directory))


@pytest.fixture
def planned_tp1():
    from layerfreeze import apply_plan
    from layerfreeze.engines.megatron import megatron_layout
    from tests.helpers.megatron import (
        build_tiny_gpt,
        destroy_model_parallel,
        init_model_parallel,
        megatron_cpu_shim,
    )

    with megatron_cpu_shim():
        init_model_parallel(tp=1)
        try:
            model = build_tiny_gpt(seed=5)
            apply_plan(model, PLAN, layout=megatron_layout(model))
            yield model
        finally:
            destroy_model_parallel()


def test_base_checkpoint_missing_a_base_key_is_an_error_naming_it(planned_tp1, tmp_path):
    from layerfreeze.megatron import load_base_checkpoint

    model = planned_tp1
    _base_checkpoint(tmp_path / "base", drop="decoder.final_layernorm.weight")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError) as err:
        load_base_checkpoint(model, str(tmp_path / "base"))
    msg = str(err.value)
    assert "has no decoder.final_layernorm.weight, which is not an adapter tensor" in msg
    assert "\n" not in msg
    # nothing was copied
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_base_checkpoint_loads_with_exactly_the_adapter_keys_absent(planned_tp1, tmp_path):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from layerfreeze.megatron import load_base_checkpoint
    from tests.helpers.megatron import build_tiny_gpt

    model = planned_tp1
    _base_checkpoint(tmp_path / "base")
    saved = set(dist_checkpointing.load_tensors_metadata(str(tmp_path / "base")))
    declared = {
        v.key
        for v in model.sharded_state_dict().values()
        if isinstance(v, (ShardedTensor, ShardedTensorFactory))
    }
    absent = declared - saved
    assert absent and all(("adapter" in k or "gate" in k or "prefix" in k) for k in absent)
    load_base_checkpoint(model, str(tmp_path / "base"))
    base = dict(build_tiny_gpt(seed=3).named_parameters())
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
