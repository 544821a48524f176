"""Hostile / unsupported Megatron pipeline settings: refused with a clear error.

(Sequence parallelism is supported now; its refusals are in test_megatron_sp_faults.py.)
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


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
