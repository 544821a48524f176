"""The ``prefix`` policy on tiny Llama / Qwen2 / Mistral / GPT-2 / GPT-NeoX models (CPU)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from layerfreeze.errors import ConfigError
from layerfreeze.models import LayerInfo, ModelLayout, discover_layout
from layerfreeze.policies.base import PolicySpec
from layerfreeze.policies.prefix import (
    WRAPPER_PREFIX,
    PrefixConfig,
    PrefixPolicy,
    base_attn_implementation,
    remove_prefix_adapters,
)
from layerfreeze.registry import get_policy
from layerfreeze.utils.schema import from_dict
from tests.helpers.policies import install
from tests.helpers.tiny_models import GQA_FAMILIES, TINY_FAMILIES, build_tiny_model, tiny_batch

torch.set_num_threads(1)


def prefix_spec(**options) -> PolicySpec:
    return PolicySpec("prefix", PrefixConfig(**options))


def randomize_prefix(model, seed: int = 5, factor: float = 1.0) -> None:
    """Trained-looking prefix: random keys/values/gate, a non-zero per-head factor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".prefix_" not in n:
                continue
            noise = torch.randn(p.shape, generator=g).to(p.dtype)
            if n.endswith("prefix_gating_factor"):
                p.copy_(factor * (0.5 + noise.abs()))
            elif ".prefix_gate." in n:
                p.copy_(0.3 * noise)
            else:
                p.copy_(noise)


# ------------------------------------------------------------------------------------------------
# Options and checks


def test_registered_with_prefix():
    policy = get_policy("prefix")
    assert isinstance(policy, PrefixPolicy)
    assert policy.param_prefix == "prefix_" and policy.config_cls is PrefixConfig


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"tokens": 0}, "tokens: must be an integer >= 1, got 0"),
        ({"reparam": 0}, "reparam: must be a hidden width >= 1 or null, got 0"),
        ({"lr_scale": 0}, "lr_scale: must be > 0"),
        ({"weight_decay": -0.1}, "weight_decay: must be >= 0"),
        ({"gate_lr_scale": 0}, "gate_lr_scale: must be > 0"),
        ({"token": 4}, "token: unknown key. Did you mean 'tokens'?"),
    ],
)
def test_config_errors(data, needle):
    with pytest.raises(ConfigError) as e:
        from_dict(PrefixConfig, data, "policy.rules[1]")
    assert needle in str(e.value)


def test_config_defaults():
    cfg = from_dict(PrefixConfig, {"tokens": 16, "gated": True, "reparam": None})
    assert (cfg.tokens, cfg.gated, cfg.reparam, cfg.lr_scale) == (16, True, None, 1.0)


class _ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mlp = nn.Linear(16, 16)


def test_unsupported_attention_is_named():
    block = _ToyBlock()
    layer = LayerInfo(0, "blocks.0", block, "attn", "mlp")
    layout = ModelLayout([layer], "toy", hidden_size=16, num_heads=2, num_kv_heads=2, head_dim=8)
    policy = get_policy("prefix")
    problems = policy.check(layer, prefix_spec(), layout)
    assert len(problems) == 2
    assert all(p.startswith("layer 0 (blocks.0.attn, MultiheadAttention): ") for p in problems)
    assert "_attn_implementation" in problems[0] and "ALL_ATTENTION_FUNCTIONS" in problems[1]
    with pytest.raises(ValueError, match="ALL_ATTENTION_FUNCTIONS"):
        policy.apply(layer, prefix_spec(), layout)
    assert "prefix_adapter" not in block.attn._modules


def test_gpt2_upcast_attention_is_rejected():
    model = build_tiny_model("gpt2", num_layers=2)
    layout = discover_layout(model)
    model.transformer.h[1].attn.reorder_and_upcast_attn = True
    problems = get_policy("prefix").check(layout.layers[1], prefix_spec(), layout)
    assert len(problems) == 1 and "reorder_and_upcast_attn=True" in problems[0]
    assert problems[0].startswith("layer 1 (transformer.h.1.attn, GPT2Attention)")


def test_apply_is_idempotent_and_rejects_other_options():
    model = build_tiny_model("llama", num_layers=2)
    layout = discover_layout(model)
    policy, spec = get_policy("prefix"), prefix_spec(tokens=4, gated=True)
    layer = layout.layers[0]
    first = policy.apply(layer, spec, layout)
    second = policy.apply(layer, spec, layout)
    assert first == second
    assert len(layer.attn._forward_pre_hooks) == 1 and len(layer.attn._forward_hooks) == 1
    assert model.config._attn_implementation == WRAPPER_PREFIX + "eager"
    problems = policy.check(layer, prefix_spec(tokens=8, gated=True), layout)
    assert problems and "already carries a prefix adapter" in problems[0]


def test_parameter_names_and_shapes():
    model = build_tiny_model("llama", num_layers=2)  # 4 query heads, 2 kv heads, head_dim 16
    names = install(model, prefix_spec(tokens=3, gated=True), layers={1})
    assert names == [
        "model.layers.1.self_attn.prefix_adapter.prefix_gate.bias",
        "model.layers.1.self_attn.prefix_adapter.prefix_gate.weight",
        "model.layers.1.self_attn.prefix_adapter.prefix_gating_factor",
        "model.layers.1.self_attn.prefix_adapter.prefix_key",
        "model.layers.1.self_attn.prefix_adapter.prefix_value",
    ]
    adapter = model.model.layers[1].self_attn.prefix_adapter
    assert adapter.prefix_key.shape == (2, 3, 16) and adapter.prefix_value.shape == (2, 3, 16)
    assert adapter.prefix_gating_factor.shape == (4,) and not adapter.prefix_gating_factor.any()
    reparam = install(build_tiny_model("llama", num_layers=2), prefix_spec(tokens=3, reparam=8))
    assert any(n.endswith("prefix_adapter.prefix_embedding") for n in reparam)
    assert any(n.endswith("prefix_adapter.prefix_mlp.2.weight") for n in reparam)


def test_optim_options():
    policy = get_policy("prefix")
    spec = prefix_spec(lr_scale=0.5, weight_decay=0.1, gate_lr_scale=10.0, gated=True, reparam=4)
    gate = {"lr_scale": 10.0, "weight_decay": 0.0}
    assert policy.optim_options("self_attn.prefix_adapter.prefix_gating_factor", spec) == gate
    assert policy.optim_options("self_attn.prefix_adapter.prefix_gate.weight", spec) == gate
    assert policy.optim_options("self_attn.prefix_adapter.prefix_key", spec) == {
        "lr_scale": 0.5, "weight_decay": 0.1,
    }
    assert policy.optim_options("self_attn.prefix_adapter.prefix_mlp.0.bias", spec) == {
        "lr_scale": 0.5, "weight_decay": 0.0,
    }


# ------------------------------------------------------------------------------------------------
# Identity at init


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("gated", [False, True])
def test_identity_at_init(family, attn_implementation, gated):
    model = build_tiny_model(family, num_layers=3, attn_implementation=attn_implementation)
    ids = tiny_batch(model)
    with torch.no_grad():
        before = model(ids).logits
    install(model, prefix_spec(tokens=4, gated=gated, reparam=8 if gated else None), layers={1, 2})
    assert model.config._attn_implementation == WRAPPER_PREFIX + attn_implementation
    with torch.no_grad():
        after = model(ids).logits
        assert torch.equal(before, after)
        randomize_prefix(model)  # the branch is really wired in: a non-zero factor changes logits
        assert (model(ids).logits - before).abs().max() > 1e-3


def test_identity_at_init_bf16():
    model = build_tiny_model("mistral", num_layers=2, attn_implementation="sdpa").to(torch.bfloat16)
    ids = tiny_batch(model)
    with torch.no_grad():
        before = model(ids).logits
    install(model, prefix_spec(tokens=4, gated=True))
    adapter = model.model.layers[0].self_attn.prefix_adapter
    assert adapter.prefix_key.dtype == torch.bfloat16
    assert adapter.prefix_gating_factor.dtype == torch.float32
    assert adapter.prefix_gate.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(before, model(ids).logits)


# ------------------------------------------------------------------------------------------------
# Maths: an independent reference of the branch (GQA, rotary query)


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


@pytest.mark.parametrize("family", GQA_FAMILIES)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("gated", [False, True])
def test_branch_matches_reference(family, attn_implementation, gated):
    model = build_tiny_model(family, num_layers=2, attn_implementation=attn_implementation)
    install(model, prefix_spec(tokens=3, gated=gated), layers={1})
    randomize_prefix(model)
    attn = model.model.layers[1].self_attn
    adapter = attn.prefix_adapter
    B, T, H, KV, D = 2, 5, 4, 2, 16
    h = torch.randn(B, T, 64, generator=torch.Generator().manual_seed(11))
    positions = torch.arange(T).unsqueeze(0).expand(B, T)
    cos, sin = model.model.rotary_emb(h, positions)
    with torch.no_grad():
        with_prefix = attn(hidden_states=h, position_embeddings=(cos, sin), attention_mask=None)[0]
        factor = adapter.prefix_gating_factor.clone()
        adapter.prefix_gating_factor.zero_()
        without = attn(hidden_states=h, position_embeddings=(cos, sin), attention_mask=None)[0]
        adapter.prefix_gating_factor.copy_(factor)

        # Reference: the layer's own query with rotary, an explicit softmax over the prefix keys.
        q = (h @ attn.q_proj.weight.t() + (attn.q_proj.bias if attn.q_proj.bias is not None else 0))
        q = q.view(B, T, H, D).transpose(1, 2)
        q = q * cos.unsqueeze(1) + _rotate_half(q) * sin.unsqueeze(1)
        if gated:
            g = torch.sigmoid(h @ adapter.prefix_gate.weight + adapter.prefix_gate.bias)  # (B, T)
        else:
            g = torch.ones(B, T)
        heads = []
        for i in range(H):
            kv = i // (H // KV)
            scores = q[:, i] @ adapter.prefix_key[kv].t() / D**0.5  # (B, T, tokens)
            probs = torch.exp(scores - scores.amax(-1, keepdim=True))
            probs = probs / probs.sum(-1, keepdim=True)
            heads.append(factor[i] * g.unsqueeze(-1) * (probs @ adapter.prefix_value[kv]))
        branch = torch.stack(heads, dim=2).reshape(B, T, H * D)
        expected = branch @ attn.o_proj.weight.t()  # o_proj is linear (no bias here)
    assert attn.o_proj.bias is None
    torch.testing.assert_close(with_prefix - without, expected, rtol=1e-4, atol=1e-5)
    assert expected.abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------
# Training, checkpointing, generation


def _adamw_steps(model, names, ids, steps=2):
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([params[n] for n in names], lr=1e-2, weight_decay=0.0)
    grads = []
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=False)
        model(ids, labels=ids).loss.backward()
        grads.append({n: params[n].grad.detach().clone() for n in names})
        opt.step()
    return grads


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("gated, reparam", [(False, None), (True, None), (True, 8)])
def test_factor_first_then_prefix_within_two_steps(family, gated, reparam):
    model = build_tiny_model(family, num_layers=2)
    names = install(model, prefix_spec(tokens=4, gated=gated, reparam=reparam))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in names}
    ids = tiny_batch(model)
    step1, step2 = _adamw_steps(model, names, ids)
    for n in names:
        if n.endswith("prefix_gating_factor"):
            assert step1[n].abs().sum() > 0, n  # the zero-init factor learns at step 1
        else:  # keys/values, reparam MLP and gate sit behind the zero factor at step 1
            assert step1[n].abs().sum() == 0, n
        assert step2[n].abs().sum() > 0, f"{n} got no gradient by step 2"
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_same_grads(family, reentrant):
    def grads(checkpointing):
        model = build_tiny_model(family, num_layers=3)
        names = install(model, prefix_spec(tokens=4, gated=True), layers={0, 2})
        randomize_prefix(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
            if reentrant:  # frozen embeddings: the reentrant checkpoint needs an input with grad
                model.enable_input_require_grads()
        ids = tiny_batch(model)
        torch.manual_seed(0)  # same dropout masks in both runs (GPT-2 has dropout)
        model(ids, labels=ids).loss.backward()
        params = dict(model.named_parameters())
        return {n: params[n].grad for n in names}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        assert plain[n].abs().sum() > 0, n
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_kv_cache_generation_matches_full_recomputation(family, attn_implementation):
    model = build_tiny_model(family, num_layers=3, attn_implementation=attn_implementation)
    install(model, prefix_spec(tokens=4, gated=True), layers={1, 2})
    randomize_prefix(model, factor=2.0)
    prompt = tiny_batch(model, batch=2, seq=5)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kwargs)
        full = model.generate(prompt, use_cache=False, **kwargs)
        # Per-step logits agree too (not only the argmax): score the generated text in one pass.
        one_pass = model(cached).logits[:, prompt.shape[1] - 1 : -1]
        stepwise = torch.stack(
            model.generate(prompt, use_cache=True, output_scores=True,
                           return_dict_in_generate=True, **kwargs).scores, dim=1,
        )
    assert cached.shape == (2, 13)
    assert torch.equal(cached, full)
    torch.testing.assert_close(stepwise, one_pass, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Attention implementation bookkeeping: guard, save_pretrained, removal, copies


def test_changed_attention_implementation_fails_loudly():
    model = build_tiny_model("llama", num_layers=2)
    install(model, prefix_spec(tokens=2), layers={1})
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match=r"layer 1 \(model.layers.1.self_attn\): the prefix branch did not run"):
        model(tiny_batch(model))


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_save_pretrained_keeps_original_implementation(tmp_path, attn_implementation):
    model = build_tiny_model("qwen2", num_layers=2, attn_implementation=attn_implementation)
    install(model, prefix_spec(tokens=2))
    assert base_attn_implementation(model.config._attn_implementation) == attn_implementation
    model.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    assert "layerfreeze" not in text and "prefix" not in json.loads(text).get("attn_implementation", "")
    assert "layerfreeze" not in json.dumps(model.config.to_dict())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=attn_implementation)
    assert reloaded.config._attn_implementation == attn_implementation


def test_remove_prefix_adapters_restores_the_model():
    model = build_tiny_model("gpt_neox", num_layers=2, attn_implementation="sdpa")
    ids = tiny_batch(model)
    with torch.no_grad():
        before = model(ids).logits
    install(model, prefix_spec(tokens=2, gated=True))
    randomize_prefix(model)
    assert remove_prefix_adapters(model) == 2
    assert model.config._attn_implementation == "sdpa"
    attn = model.gpt_neox.layers[0].attention
    assert not attn._forward_pre_hooks and not attn._forward_hooks
    assert not any("prefix_" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(before, model(ids).logits)


def test_deepcopy_keeps_the_branch():
    model = build_tiny_model("gpt2", num_layers=2)
    install(model, prefix_spec(tokens=3, gated=True))
    randomize_prefix(model)
    clone = copy.deepcopy(model)
    ids = tiny_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(clone(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_docs_example_runs(repo_root):
    import re

    section = (repo_root / "docs" / "policies.md").read_text().split("## `prefix`", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/policies.md (prefix)", "exec"), {})
