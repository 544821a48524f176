"""Transformer Engine LoRA dispatch decisions that need no TE object (CPU, real megatron-core).

Transformer Engine is not installed on CPU machines: the TE paths themselves run in
tests/gpu/test_cuda_megatron_te_lora.py. Here: the config refusals, that local-spec linears and
gates are untouched by the TE dispatch (dispatcher, gate source, no norm hook), and that the
sub-block gate pre-hook leaves a gate that reads a fused norm's output alone.
"""

from __future__ import annotations

import pytest
import torch

from layerfreeze import apply_plan
from tests.helpers.megatron import (
    build_tiny_gpt,
    forward_logits,
    tiny_config,
    tiny_tokens,
)


def test_plain_configs_have_no_te_problem():
    from layerfreeze.engines.megatron.te import fp8_problem, te_config_problem, userbuffers_problem

    config = tiny_config(num_layers=2)
    assert fp8_problem(config) is None
    assert userbuffers_problem(config) is None
    assert te_config_problem(config) is None
    bf16 = tiny_config(num_layers=2, bf16=True, params_dtype=torch.bfloat16)
    assert te_config_problem(bf16) is None


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(fp8="hybrid"), "fp8='hybrid'"),
        (dict(fp8="e4m3"), "fp8='e4m3'"),
        (dict(fp4="e2m1"), "fp4='e2m1'"),
        (dict(tp_comm_overlap=True), "tp_comm_overlap=True"),
    ],
)
def test_te_config_problem_names_the_field(overrides, field):
    from layerfreeze.engines.megatron.te import te_config_problem

    problem = te_config_problem(tiny_config(num_layers=2, **overrides))
    assert problem is not None and f"TransformerConfig.{field}" in problem
    assert "\n" not in problem


def test_local_linears_are_not_te(megatron_tp1):
    from layerfreeze.engines.megatron.te import is_te_module, te_linear_kind

    model = build_tiny_gpt(num_layers=2)
    layer = model.decoder.layers[0]
    for m in (
        layer.self_attention.linear_qkv,
        layer.self_attention.linear_proj,
        layer.mlp.linear_fc1,
        layer.mlp.linear_fc2,
        layer.input_layernorm,
        torch.nn.Linear(2, 2),
    ):
        assert te_linear_kind(m) is None
        assert not is_te_module(m)


def test_local_spec_dispatch_and_gates_unchanged(megatron_tp1):
    """Gated LoRA on the local spec: the column / row dispatchers wrap the linears, the gates are
    computed by the sub-block pre-hook from the normed input (sigmoid(w . norm(x) + b)), no
    linear is switched to return a layer-norm output and no gate is marked as reading one."""
    from layerfreeze.engines.megatron import megatron_layout
    from layerfreeze.engines.megatron.lora import COLUMN, ROW
    from layerfreeze.engines.megatron.te import reads_norm_output, use_norm_output_for_gate
    from layerfreeze.policies.lora import _GATE_SOURCES, _find_dispatcher

    model = build_tiny_gpt(num_layers=2)
    apply_plan(model, "0:lora(r=4,target=all,gated),1:lora(r=4,target=mlp)",
               layout=megatron_layout(model))
    assert use_norm_output_for_gate in _GATE_SOURCES
    layer = model.decoder.layers[0]
    attn, mlp = layer.self_attention, layer.mlp
    assert _find_dispatcher(attn.linear_qkv) is COLUMN
    assert _find_dispatcher(attn.linear_proj) is ROW
    assert _find_dispatcher(mlp.linear_fc1) is COLUMN
    assert _find_dispatcher(mlp.linear_fc2) is ROW
    for linear in (attn.linear_qkv, mlp.linear_fc1):
        assert not hasattr(linear, "return_layernorm_output")
        assert len(linear._forward_hooks) == 1  # the generic LoRA hook only
    for gate in (attn.lora_gate, mlp.lora_gate):
        assert not reads_norm_output(gate)
        use_norm_output_for_gate(attn, gate)  # local spec: a no-op
        assert not reads_norm_output(gate)
    assert not hasattr(attn.linear_qkv, "return_layernorm_output")

    with torch.no_grad():
        for gate in (attn.lora_gate, mlp.lora_gate):
            gate.weight.copy_(torch.linspace(-1, 1, gate.weight.numel()))
            gate.bias.fill_(0.25)
    seen = {}
    attn.register_forward_pre_hook(lambda m, a: seen.__setitem__("attn_in", a[0].detach()))
    attn.linear_qkv.register_forward_hook(
        lambda m, a, o: seen.__setitem__("attn_gate", attn.lora_gate.value.detach())
    )
    mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("mlp_in", a[0].detach()))
    mlp.linear_fc1.register_forward_hook(
        lambda m, a, o: seen.__setitem__("mlp_gate", mlp.lora_gate.value.detach())
    )
    forward_logits(model, tiny_tokens())
    for sub, gate in (("attn", attn.lora_gate), ("mlp", mlp.lora_gate)):
        h = seen[f"{sub}_in"]
        expected = torch.sigmoid(h @ gate.weight.detach() + 0.25).unsqueeze(-1)
        torch.testing.assert_close(seen[f"{sub}_gate"], expected)


def test_gate_pre_hook_leaves_a_norm_output_gate_alone(megatron_tp1):
    """A gate marked as reading a fused norm's output is not computed by the sub-block pre-hook:
    without the norm-linear that computes it, the adapter finds no gate value."""
    from layerfreeze.engines.megatron import megatron_layout

    model = build_tiny_gpt(num_layers=2)
    apply_plan(model, "0:lora(r=4,target=mlp,gated)", layout=megatron_layout(model))
    forward_logits(model, tiny_tokens())  # unmarked: the pre-hook computes it
    model.decoder.layers[0].mlp.lora_gate.reads_block_input = False  # as te.py marks it
    with pytest.raises(RuntimeError, match="ran outside its sub-block's forward"):
        forward_logits(model, tiny_tokens())
