"""Hostile input to the megatron distributed-checkpoint helpers (one process, TP=1, CPU shim)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.megatron import megatron_cpu  # noqa: F401  (fixture)

PLAN = "0:freeze,1:lora(r=4,target=mlp),2:lora(r=4,target=all,gated),3:prefix(tokens=2,gated)"


def test_adapter_key_refuses_offsets_it_cannot_place():
    from layerfreeze.engines.megatron.sharded import _per_layer_key

    # the transformer block's stacking offset: the global index goes into the key
    assert (
        _per_layer_key("decoder.layers.1.mlp.linear_fc1.lora_adapter.", "lora_b", [(0, 3, 4)])
        == "decoder.layers.1.3.mlp.linear_fc1.lora_adapter.lora_b"
    )
    assert _per_layer_key("decoder.layers.3.mlp.lora_gate.", "bias", ()) == (
        "decoder.layers.3.mlp.lora_gate.bias"
    )
    with pytest.raises(ValueError, match=r"lora_b: layerfreeze adapters expect only megatron's"):
        _per_layer_key(
            "decoder.layers.1.mlp.linear_fc1.lora_adapter.", "lora_b", [(0, 3, 4), (1, 0, 2)]
        )
    with pytest.raises(ValueError, match=r"no 'layers.<index>.' part"):
        _per_layer_key("mlp.linear_fc1.lora_adapter.", "lora_b", [(0, 3, 4)])


@pytest.fixture
def planned(megatron_cpu):  # noqa: F811
    from layerfreeze import apply_plan
    from layerfreeze.engines.megatron import megatron_layout
    from tests.helpers.megatron import build_tiny_gpt, destroy_model_parallel, init_model_parallel

    init_model_parallel(tp=1)
    model = build_tiny_gpt(seed=3)
    applied = apply_plan(model, PLAN, layout=megatron_layout(model))
    try:
        yield model, applied
    finally:
        destroy_model_parallel()


def test_trained_names_must_be_parameters(planned):
    from layerfreeze.engines.megatron.sharded import trained_sharded_state_dict

    model, applied = planned
    assert sorted(trained_sharded_state_dict(model, applied.trainable_names())) == sorted(
        applied.trainable_names()
    )
    with pytest.raises(ValueError, match=r"trained: \['decoder.layers.9.x'\] are not parameters"):
        trained_sharded_state_dict(model, ["decoder.layers.9.x"])


def test_load_into_a_model_with_another_plan_fails_naming_the_key(planned, tmp_path):
    from layerfreeze import apply_plan
    from layerfreeze.engines.megatron import megatron_layout
    from layerfreeze.engines.megatron.sharded import load_trained, save_trained
    from tests.helpers.megatron import build_tiny_gpt

    model, _ = planned
    save_trained(model, str(tmp_path))
    other = build_tiny_gpt(seed=5)
    apply_plan(other, "0:lora(r=4,target=mlp),1-3:freeze", layout=megatron_layout(other))
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(
        ValueError,
        match=r"has no decoder\.layers\.0\.mlp\.linear_fc1\.lora_adapter\.lora_a \(and 3 more",
    ):
        load_trained(other, str(tmp_path))
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())  # untouched
