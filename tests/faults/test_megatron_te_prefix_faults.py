"""The megatron prefix's refusals and dispatch decisions for Transformer Engine's attention that
need no TE object (CPU, one process, local spec): config-level refusals, forward-time refusal of
packed sequences in form=paper, TE's mask-type semantics, the branch on THD's 3-D query, and the
local spec never importing the TE module."""

from __future__ import annotations

import sys

import pytest
import torch

from layerfreeze import apply_plan
from layerfreeze.errors import ConfigError
from tests.helpers.megatron import (
    build_tiny_gpt,
    forward_logits,
    position_ids,
    tiny_tokens,
)


def _apply(model, plan):
    from layerfreeze.engines.megatron import megatron_layout

    return apply_plan(model, plan, layout=megatron_layout(model))


@pytest.mark.parametrize(
    "flag",
    [
        {"fp8_dot_product_attention": True},
        {"qk_clip": True, "qk_clip_threshold": 100.0, "qk_clip_alpha": 0.5},
        {"log_max_attention_logit": True},
    ],
)
def test_paper_form_refuses_fp8_attention_and_max_logit_configs(megatron_tp1, flag):
    model = build_tiny_gpt(num_layers=2, hidden=64, heads=4, query_groups=2, **flag)
    name = next(iter(flag))
    with pytest.raises(ConfigError, match=f"prefix\\(form=paper\\).*{name}=True"):
        _apply(model, "1:prefix(tokens=2,gated,form=paper)")


@pytest.mark.parametrize("form", ["branch", "paper"])
def test_both_forms_refuse_fp8_multi_head_attention(megatron_tp1, form):
    model = build_tiny_gpt(
        num_layers=2, hidden=64, heads=4, query_groups=2, fp8_multi_head_attention=True
    )
    with pytest.raises(ConfigError, match="fp8_multi_head_attention=True"):
        _apply(model, f"1:prefix(tokens=2,gated,form={form})")


def test_paper_form_refuses_packed_sequences_at_forward_time(megatron_tp1):
    from megatron.core.packed_seq_params import PackedSeqParams

    model = build_tiny_gpt(num_layers=2, hidden=64, heads=4, query_groups=2)
    _apply(model, "0:prefix(tokens=2,gated,form=paper)")
    tokens = tiny_tokens(batch=1, seq=8)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    packed = PackedSeqParams(
        qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=8, max_seqlen_kv=8
    )
    with pytest.raises(RuntimeError, match=r"layer 0 .*does not support packed sequences.*'sbhd'"):
        model(tokens, position_ids(tokens), None, packed_seq_params=packed)


def test_te_mask_types():
    from megatron.core.transformer.enums import AttnMaskType

    from layerfreeze.engines.megatron.prefix_paper import te_mask

    assert te_mask(AttnMaskType.causal) == (True, True)  # TE's causal: top-left
    assert te_mask("causal_bottom_right") == (True, False)
    assert te_mask(AttnMaskType.no_mask) == (False, False)
    for bad in (AttnMaskType.padding, AttnMaskType.padding_causal, AttnMaskType.arbitrary):
        with pytest.raises(RuntimeError, match=f"got '{bad.name}'"):
            te_mask(bad, "layer 3")


def test_paper_attention_top_left_causal_mask():
    """sq < sk: TE's ``causal`` lets query i see keys 0..i (top left), megatron's local causal
    keys 0..i+sk-sq (bottom right); checked against a written-out softmax (no prefix weight:
    a gate-free adapter with prefix values 0 and keys far below the real scores)."""
    from layerfreeze.engines.megatron.prefix import MegatronPrefix
    from layerfreeze.engines.megatron.prefix_paper import paper_attention
    from layerfreeze.policies.prefix.paper import configure_adapter

    torch.manual_seed(0)
    adapter = MegatronPrefix(2, 2, 4, 8, tokens=1)
    configure_adapter(adapter, "paper", -3.0, "logit")
    with torch.no_grad():
        adapter.prefix_key.zero_()
        adapter.prefix_value.zero_()
    for sq, sk in ((2, 4), (1, 3)):
        q, k, v = torch.randn(sq, 1, 2, 4), torch.randn(sk, 1, 2, 4), torch.randn(sk, 1, 2, 4)
        for top_left, offset in ((True, 0), (False, sk - sq)):
            got = paper_attention(adapter, q, k, v, None, True, 0.5, top_left).view(sq, 2, 4)
            for i in range(sq):
                for h in range(2):
                    seen = slice(0, i + offset + 1)
                    s = torch.cat([torch.zeros(1), (k[seen, 0, h] @ q[i, 0, h]) * 0.5])
                    p = torch.softmax(s, 0)
                    want = p[1:] @ v[seen, 0, h]  # prefix value is 0
                    torch.testing.assert_close(got[i, h], want)


def test_branch_on_thd_query_equals_the_sbhd_branch(megatron_tp1):
    """THD (packed) reaches core_attention as [t, heads, d] and TE returns [t, heads * d]; the
    branch is per token, so it must equal the [t, 1, heads, d] branch (old code refused the 3-D
    query)."""
    from layerfreeze.engines.megatron.prefix import _core_attention_hook

    model = build_tiny_gpt(num_layers=2, hidden=64, heads=4, query_groups=2)
    _apply(model, "1:prefix(tokens=3,gated)")
    attn = model.decoder.layers[1].self_attention
    adapter = attn.prefix_adapter
    with torch.no_grad():
        adapter.prefix_gating_factor.fill_(0.7)
        adapter.prefix_gate.weight.normal_()
    t = 5
    h = torch.randn(t, 1, 64)
    q = torch.randn(t, 4, 16)
    base = torch.randn(t, 64)
    adapter.prefix_gate(h)
    adapter.pending = True
    got = _core_attention_hook(attn.core_attention, (q,), {}, base)
    adapter.pending = True
    want = _core_attention_hook(attn.core_attention, (q.unsqueeze(1),), {}, base.unsqueeze(1))
    adapter.prefix_gate.clear()
    assert got.shape == (t, 64)
    torch.testing.assert_close(got, want.squeeze(1))
    assert not torch.allclose(got, base)


def test_local_spec_never_imports_transformer_engine(megatron_tp1):
    model = build_tiny_gpt(num_layers=2, hidden=64, heads=4, query_groups=2)
    _apply(model, "0:prefix(tokens=2,gated),1:prefix(tokens=2,gated,form=paper)")
    forward_logits(model, tiny_tokens(batch=1, seq=6))
    # layerfreeze.engines.megatron.te itself is plain torch (the LoRA dispatchers import it);
    # what must stay out is Transformer Engine, and no gate may wait for a fused norm output.
    assert "transformer_engine" not in sys.modules
    from layerfreeze.engines.megatron.te import reads_norm_output

    for layer in model.decoder.layers:
        assert not reads_norm_output(layer.self_attention.prefix_adapter.prefix_gate)
