"""megatron_layout on a real one-process megatron-core GPTModel (TP=1, PP=1, CPU shim)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerfreeze import apply_plan
from layerfreeze.errors import ConfigError
from layerfreeze.policies.lora import resolve_lora_targets
from tests.helpers.megatron import (
    build_tiny_gpt,
    forward_logits,
    tiny_tokens,
)


def test_layout_of_untied_model(megatron_tp1):
    from layerfreeze.engines.megatron import megatron_layout

    model = build_tiny_gpt(num_layers=4, hidden=64, heads=4, query_groups=2)
    layout = megatron_layout(model)
    assert [x.index for x in layout.layers] == [0, 1, 2, 3]
    assert [x.name for x in layout.layers] == [f"decoder.layers.{i}" for i in range(4)]
    assert all(x.module is model.decoder.layers[i] for i, x in enumerate(layout.layers))
    assert {(x.attn_name, x.mlp_name) for x in layout.layers} == {("self_attention", "mlp")}
    assert layout.embeddings == ["embedding.word_embeddings"]
    assert layout.final_norm == "decoder.final_layernorm"
    assert layout.lm_head == "output_layer"
    assert not layout.tied_embeddings
    assert (layout.hidden_size, layout.num_heads, layout.num_kv_heads, layout.head_dim) == (
        64,
        4,
        2,
        16,
    )
    assert layout.num_layers == layout.num_local_layers == 4


def test_layout_of_tied_model_with_learned_positions(megatron_tp1):
    from layerfreeze.engines.megatron import megatron_layout

    model = build_tiny_gpt(num_layers=2, tied=True, query_groups=None)
    layout = megatron_layout(model)
    assert layout.tied_embeddings
    assert layout.num_kv_heads == layout.num_heads == 4
    assert model.output_layer.weight is None  # single stage: the head reads the embedding
    assert layout.embeddings == ["embedding.word_embeddings"]

    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from tests.helpers.megatron import tiny_config

    learned = GPTModel(
        tiny_config(num_layers=2),
        get_gpt_layer_local_spec(),
        vocab_size=128,
        max_sequence_length=32,
        position_embedding_type="learned_absolute",
    )
    assert megatron_layout(learned).embeddings == [
        "embedding.word_embeddings",
        "embedding.position_embeddings",
    ]


def test_apply_plan_freeze_deep_and_full(megatron_tp1):
    from layerfreeze.engines.megatron import megatron_layout

    model = build_tiny_gpt(num_layers=4)
    applied = apply_plan(model, "freeze_deep", layout=megatron_layout(model))
    names = [n for n, _ in model.named_parameters()]
    expected = [
        n for n in names if n.startswith(("decoder.layers.0.", "decoder.layers.1.", "embedding."))
    ]
    assert applied.trainable_names() == expected
    assert [n for n, p in model.named_parameters() if p.requires_grad] == expected
    applied.switch_plan("full")
    assert all(p.requires_grad for p in model.parameters())


def test_chunks_list_and_wrappers(megatron_tp1):
    from layerfreeze.engines.megatron import chunks_module, megatron_layout

    model = build_tiny_gpt(num_layers=2)
    layout = megatron_layout([model])
    assert [x.name for x in layout.layers] == ["0.decoder.layers.0", "0.decoder.layers.1"]
    assert layout.final_norm == "0.decoder.final_layernorm"
    applied = apply_plan(chunks_module([model]), "0:full,1:freeze", layout=layout)
    assert applied.trainable_names() == [
        n
        for n, _ in chunks_module([model]).named_parameters()
        if n.startswith("0.decoder.layers.0.")
    ]

    class Wrapper(nn.Module):  # the shape of megatron's DDP / Float16Module wrappers
        def __init__(self, module):
            super().__init__()
            self.module = module

    wrapped = megatron_layout(Wrapper(model))
    assert [x.name for x in wrapped.layers] == [
        "module.decoder.layers.0",
        "module.decoder.layers.1",
    ]
    assert wrapped.lm_head == "module.output_layer"


def test_lora_targets_and_identity_at_init(megatron_tp1):
    from layerfreeze.engines.megatron import megatron_layout

    model = build_tiny_gpt(num_layers=2)
    layout = megatron_layout(model)
    layer = layout.layers[0]
    mlp, problems = resolve_lora_targets(layer, "mlp", layout.hidden_size)
    assert not problems and sorted(mlp) == [("mlp.linear_fc1", "mlp"), ("mlp.linear_fc2", "mlp")]
    attn, problems = resolve_lora_targets(layer, "attn", layout.hidden_size)
    assert not problems and sorted(attn) == [
        ("self_attention.linear_proj", "self_attention"),
        ("self_attention.linear_qkv", "self_attention"),
    ]
    tokens = tiny_tokens()
    before = forward_logits(model, tokens)
    applied = apply_plan(
        model, "0:lora(r=4,target=all,gated),1:prefix(tokens=3,gated)", layout=layout
    )
    torch.testing.assert_close(forward_logits(model, tokens), before, rtol=0, atol=0)
    assert all(
        n.split(".")[-1].startswith(("lora_", "prefix_", "weight", "bias"))
        for n in applied.trainable_names()
    )


def test_not_a_megatron_model_and_bad_plan(megatron_tp1):
    from layerfreeze.engines.megatron import megatron_layout

    with pytest.raises(ValueError, match="not a megatron-core GPTModel"):
        megatron_layout(nn.Linear(2, 2))
    model = build_tiny_gpt(num_layers=2)
    with pytest.raises(ConfigError, match="layer 5"):
        apply_plan(model, "5:full", layout=megatron_layout(model))


def _adapter_grads(model, tokens):
    from tests.helpers.megatron import position_ids

    model.train()
    loss = model(tokens, position_ids(tokens), None, labels=tokens.roll(-1, 1)).mean()
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("plan", ["0:lora(r=2,target=mlp,gated),1:freeze", "0:prefix(tokens=2)"])
def test_full_recompute_gets_adapter_gradients(megatron_tp1, plan):
    from layerfreeze.engines.megatron import megatron_layout
    from layerfreeze.engines.megatron.recompute import prepare_recompute

    def build(**kw):
        model = build_tiny_gpt(num_layers=2, **kw)
        apply_plan(model, plan, layout=megatron_layout(model))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        return model

    tokens = tiny_tokens()
    reference = _adapter_grads(build(), tokens)
    assert all(g is not None and g.abs().max() > 0 for g in reference.values())
    recompute = dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
    )
    broken = build(**recompute)
    with pytest.raises(RuntimeError, match="does not require grad"):
        _adapter_grads(broken, tokens)  # megatron's reentrant checkpoint, frozen inputs
    fixed = build(**recompute)
    assert prepare_recompute(fixed) == 1 and prepare_recompute(fixed) == 1
    assert prepare_recompute(build()) == 0  # nothing to do without recomputation
    grads = _adapter_grads(fixed, tokens)
    assert set(grads) == set(reference)
    for n, g in reference.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-6, msg=n)

    # plan_model_provider's apply_megatron_plan prepares recomputation itself
    from layerfreeze.engines.megatron.provider import apply_megatron_plan

    model = build_tiny_gpt(num_layers=2, **recompute)
    apply_megatron_plan(model, plan)
    assert all(g is not None for g in _adapter_grads(model, tokens).values())


def test_prefix_refused_under_selective_core_attention_recompute(megatron_tp1):
    from layerfreeze.engines.megatron import megatron_layout

    model = build_tiny_gpt(num_layers=2, recompute_granularity="selective")
    with pytest.raises(ConfigError, match="selective recomputation of core attention"):
        apply_plan(model, "1:prefix(tokens=2)", layout=megatron_layout(model))


def test_tp1_adapters_match_the_written_formulas(megatron_tp1):
    """TP=1: megatron LoRA = base + g * s * x A^T B^T, megatron prefix branch = the HF
    PrefixAdapter's (an independent implementation) on the same parameters."""
    from layerfreeze.engines.megatron import megatron_layout
    from layerfreeze.policies.prefix import PrefixAdapter

    model = build_tiny_gpt(num_layers=2)
    apply_plan(
        model,
        "0:lora(r=4,target=mlp,gated,alpha=8),1:prefix(tokens=3,gated)",
        layout=megatron_layout(model),
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    mlp = model.decoder.layers[0].mlp
    x = torch.randn(5, 2, 64, generator=g)  # [s, b, h]
    fc1 = mlp.linear_fc1
    gate = torch.sigmoid(x @ mlp.lora_gate.weight + mlp.lora_gate.bias)[..., None]
    a, b = fc1.lora_adapter.lora_a, fc1.lora_adapter.lora_b
    expected = x @ fc1.weight.t() + gate * (8 / 4) * (x @ a.t() @ b.t())
    mlp.lora_gate(x)  # what the MLP's pre-hook does
    got, bias = fc1(x)
    mlp.lora_gate.clear()
    assert bias is None
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    attn = model.decoder.layers[1].self_attention
    mp_prefix = attn.prefix_adapter
    hf = PrefixAdapter(4, 2, 16, 64, tokens=3, gated=True)
    hf.load_state_dict(mp_prefix.state_dict())
    h = torch.randn(5, 2, 64, generator=g)  # attention input [s, b, h]
    q = torch.randn(5, 2, 4, 16, generator=g)  # megatron query [s, b, heads, head_dim]
    mp_prefix.prefix_gate(h)
    hf.prefix_gate(h.transpose(0, 1))  # HF layout [b, s, h]
    got = mp_prefix.branch(q, 16**-0.5)
    ref = hf(q.permute(1, 2, 0, 3), 16**-0.5)  # (b, s, heads, head_dim)
    torch.testing.assert_close(got, ref.permute(1, 0, 2, 3).reshape(5, 2, 64))


def test_prefix_options_on_megatron(megatron_tp1):
    from layerfreeze.engines.megatron import megatron_layout

    model = build_tiny_gpt(num_layers=2)
    # form=paper installs on megatron (HF equivalence: test_megatron_prefix_paper.py)
    apply_plan(model, "1:prefix(tokens=2,form=paper)", layout=megatron_layout(model))
    assert model.decoder.layers[1].self_attention.prefix_adapter.form == "paper"
    apply_plan(model, "0:prefix(tokens=2,gated,gate_bias=-3)", layout=megatron_layout(model))
    gate = model.decoder.layers[0].self_attention.prefix_adapter.prefix_gate
    assert gate.bias.item() == -3.0 and not gate.weight.any()
