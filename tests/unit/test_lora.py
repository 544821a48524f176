"""The ``lora`` policy on tiny Llama / Qwen2 / Mistral / GPT-2 / GPT-NeoX models (CPU)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from layerfreeze.errors import ConfigError
from layerfreeze.models import discover_layout
from layerfreeze.policies.base import PolicySpec
from layerfreeze.policies.lora import (
    LORA_DISPATCHERS,
    LoRAAdapter,
    LoRAConfig,
    LoRAPolicy,
    TokenGate,
    iter_lora_adapters,
    merge_lora,
    resolve_lora_targets,
    unmerge_lora,
)
from layerfreeze.registry import get_policy
from layerfreeze.utils.schema import from_dict
from tests.helpers.policies import install
from tests.helpers.tiny_models import TINY_FAMILIES, build_tiny_model, tiny_batch

torch.set_num_threads(1)

# Expected linears per family (paths inside a block), written out from the modeling files.
ATTN_LINEARS = {
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    "qwen2": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    "mistral": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj"],
    "gpt_neox": ["attention.query_key_value", "attention.dense"],
}
MLP_LINEARS = {
    "llama": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "qwen2": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "mistral": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "gpt2": ["mlp.c_fc", "mlp.c_proj"],
    "gpt_neox": ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
}


def lora_spec(**options) -> PolicySpec:
    return PolicySpec("lora", LoRAConfig(**options))


def randomize_adapters(model, seed: int = 3) -> None:
    """Give every adapter parameter (B and gate included) a non-zero random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ------------------------------------------------------------------------------------------------
# Options


def test_registered_with_prefix():
    policy = get_policy("lora")
    assert isinstance(policy, LoRAPolicy)
    assert policy.param_prefix == "lora_" and policy.config_cls is LoRAConfig


def test_config_defaults_and_list_target():
    cfg = from_dict(LoRAConfig, {"r": 4, "alpha": 8, "target": ["q_proj", "mlp.up_proj"]})
    assert cfg.target == ("q_proj", "mlp.up_proj") and cfg.scaling == 2.0
    assert hash(PolicySpec("lora", cfg))  # a list target is stored as a tuple
    assert LoRAConfig().target == "all" and LoRAConfig().gated is False


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"r": 0}, "r: must be an integer >= 1, got 0"),
        ({"alpha": 0}, "alpha: must be > 0"),
        ({"dropout": 1.0}, "dropout: must be in [0, 1)"),
        ({"target": "mlps"}, "target: must be one of mlp, attn, all"),
        ({"target": []}, "target: the list of module names is empty"),
        ({"target": ["q_proj", "q_proj"]}, "target: duplicate module names"),
        ({"lr_scale": 0}, "lr_scale: must be > 0"),
        ({"weight_decay": -1}, "weight_decay: must be >= 0"),
        ({"gate_lr_scale": -2}, "gate_lr_scale: must be > 0"),
        ({"rank": 4}, "rank: unknown key."),
    ],
)
def test_config_errors(data, needle):
    with pytest.raises(ConfigError) as e:
        from_dict(LoRAConfig, data, "policy.rules[0]")
    assert needle in str(e.value)


def test_config_collects_every_problem():
    with pytest.raises(ConfigError) as e:
        LoRAConfig(r=0, alpha=-1, dropout=2.0)
    assert len(e.value.problems) == 3


# ------------------------------------------------------------------------------------------------
# Targets


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_keyword_targets(family):
    layer = discover_layout(build_tiny_model(family, num_layers=2)).layers[1]
    for target, expected in (
        ("attn", ATTN_LINEARS[family]),
        ("mlp", MLP_LINEARS[family]),
        ("all", ATTN_LINEARS[family] + MLP_LINEARS[family]),
    ):
        targets, problems = resolve_lora_targets(layer, target)
        assert problems == []
        assert sorted(p for p, _ in targets) == sorted(expected)


def test_explicit_targets_and_errors():
    layer = discover_layout(build_tiny_model("llama", num_layers=2)).layers[0]
    targets, problems = resolve_lora_targets(layer, ("q_proj", "mlp.down_proj"))
    assert problems == [] and targets == [("self_attn.q_proj", "self_attn"), ("mlp.down_proj", "mlp")]

    _, problems = resolve_lora_targets(layer, ("qproj",))
    assert len(problems) == 1
    assert "layer 0 (model.layers.0): lora target 'qproj' matches no module" in problems[0]
    assert "self_attn.q_proj" in problems[0]  # the available names are listed

    _, problems = resolve_lora_targets(layer, ("self_attn",))
    assert "is not a linear LoRA can wrap" in problems[0]

    _, problems = resolve_lora_targets(layer, ("input_layernorm",))
    assert "outside the attention (self_attn) and MLP (mlp) submodules" in problems[0]


def test_apply_reports_unknown_target():
    model = build_tiny_model("gpt2", num_layers=2)
    layout = discover_layout(model)
    policy, spec = get_policy("lora"), lora_spec(target=["q_proj"])
    assert "matches no module" in policy.check(layout.layers[0], spec, layout)[0]
    with pytest.raises(ValueError, match="attn.c_attn"):
        policy.apply(layout.layers[0], spec, layout)


# ------------------------------------------------------------------------------------------------
# Identity at init


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("target", ["mlp", "attn", "all"])
@pytest.mark.parametrize("gated", [False, True])
def test_identity_at_init(family, attn_implementation, target, gated):
    model = build_tiny_model(family, num_layers=2, attn_implementation=attn_implementation)
    ids = tiny_batch(model)
    with torch.no_grad():
        before = model(ids).logits
    names = install(model, lora_spec(r=4, target=target, gated=gated))
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)
    expected = ATTN_LINEARS[family] * (target != "mlp") + MLP_LINEARS[family] * (target != "attn")
    n_adapted = sum(1 for n in names if n.endswith("lora_a"))
    assert n_adapted == 2 * len(expected)
    assert all(".lora_" in n for n in names)


def test_apply_is_idempotent_and_rejects_other_options():
    model = build_tiny_model("llama", num_layers=2)
    layout = discover_layout(model)
    policy, spec = get_policy("lora"), lora_spec(r=4, target="all", gated=True)
    layer = layout.layers[0]
    first = policy.apply(layer, spec, layout)
    n_params = sum(p.numel() for p in model.parameters())
    second = policy.apply(layer, spec, layout)
    assert first == second and sum(p.numel() for p in model.parameters()) == n_params
    q = layer.module.self_attn.q_proj
    assert len(q._forward_hooks) == 1 and len(layer.module.mlp._forward_pre_hooks) == 1
    other = lora_spec(r=8, target="all", gated=True)
    problems = policy.check(layer, other, layout)
    assert problems and "already carries a LoRA adapter" in problems[0]
    with pytest.raises(ValueError, match="use the same lora options"):
        policy.apply(layer, other, layout)


# ------------------------------------------------------------------------------------------------
# Maths: an independent formula


def _reference_linear(x, weight, bias, adapter, g, transposed):
    """x W^T + b + g * (alpha / r) x A^T B^T, written out without the adapter's code."""
    w = weight.t() if transposed else weight  # Conv1D stores (in, out)
    base = x @ w.t() + (bias if bias is not None else 0.0)
    update = (x @ adapter.lora_a.t()) @ adapter.lora_b.t() * (adapter.alpha / adapter.r)
    return base + g * update


@pytest.mark.parametrize("gated", [False, True])
def test_llama_mlp_matches_formula(gated):
    model = build_tiny_model("llama", num_layers=2)
    install(model, lora_spec(r=4, alpha=12, target="mlp", gated=gated))
    randomize_adapters(model)
    mlp = model.model.layers[1].mlp
    h = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(7))
    if gated:
        gate = mlp.lora_gate
        g = torch.sigmoid(h @ gate.weight + gate.bias).unsqueeze(-1)
    else:
        g = 1.0
    lin = {n: getattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")}
    ref = {n: (lambda x, m=m: _reference_linear(x, m.weight, m.bias, m.lora_adapter, g, False))
           for n, m in lin.items()}
    expected = ref["down_proj"](F.silu(ref["gate_proj"](h)) * ref["up_proj"](h))
    with torch.no_grad():
        actual = mlp(h)
    # Three chained fp32 linears, summed in another order than the reference: 1e-4 is fp32
    # round-off here (seen up to 3.5e-5 on some BLAS builds); the update itself is > 1e-2.
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    base = F.linear(F.silu(F.linear(h, lin["gate_proj"].weight)) * F.linear(h, lin["up_proj"].weight),
                    lin["down_proj"].weight)
    assert (actual - base).abs().max() > 1e-2  # the update is really there


@pytest.mark.parametrize("gated", [False, True])
def test_gpt2_conv1d_mlp_matches_formula(gated):
    model = build_tiny_model("gpt2", num_layers=2)
    install(model, lora_spec(r=4, alpha=4, target="mlp", gated=gated))
    randomize_adapters(model)
    mlp = model.transformer.h[0].mlp
    assert isinstance(mlp.c_fc, Conv1D) and mlp.c_fc.lora_adapter.transposed
    h = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(8))
    g = torch.sigmoid(h @ mlp.lora_gate.weight + mlp.lora_gate.bias).unsqueeze(-1) if gated else 1.0
    fc = _reference_linear(h, mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_fc.lora_adapter, g, True)
    expected = _reference_linear(
        mlp.act(fc), mlp.c_proj.weight, mlp.c_proj.bias, mlp.c_proj.lora_adapter, g, True
    )
    with torch.no_grad():
        actual = mlp(h)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_fused_qkv_projection_update():
    """GPT-NeoX query_key_value: one rank-r update over the whole fused output."""
    model = build_tiny_model("gpt_neox", num_layers=2)
    install(model, lora_spec(r=2, alpha=2, target=["query_key_value"]))
    randomize_adapters(model)
    qkv = model.gpt_neox.layers[0].attention.query_key_value
    assert qkv.lora_adapter.out_features == 3 * 64 and qkv.lora_adapter.in_features == 64
    x = torch.randn(2, 3, 64)
    expected = _reference_linear(x, qkv.weight, qkv.bias, qkv.lora_adapter, 1.0, False)
    with torch.no_grad():
        torch.testing.assert_close(qkv(x), expected, rtol=1e-5, atol=1e-5)


def test_gate_starts_half_open_and_is_fp32():
    gate = TokenGate(8)
    h = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    g = gate(h)
    assert g.dtype == torch.float32 and g.shape == (2, 3, 1)
    assert torch.equal(g, torch.full((2, 3, 1), 0.5))  # w = 0, b = 0: no dead start
    gate.clear()
    with pytest.raises(RuntimeError, match="outside its sub-block's forward"):
        gate.current(h)


def test_bf16_model_keeps_gate_fp32():
    model = build_tiny_model("qwen2", num_layers=2).to(torch.bfloat16)
    ids = tiny_batch(model)
    with torch.no_grad():
        before = model(ids).logits
    install(model, lora_spec(r=4, target="all", gated=True))
    adapter = model.model.layers[0].mlp.up_proj.lora_adapter
    assert adapter.lora_a.dtype == torch.bfloat16 and adapter.lora_b.dtype == torch.bfloat16
    gate = model.model.layers[0].mlp.lora_gate
    assert gate.weight.dtype == torch.float32 and gate.bias.dtype == torch.float32
    seen = []
    handle = gate.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    with torch.no_grad():
        after = model(ids).logits
    handle.remove()
    assert torch.equal(before, after) and seen == [torch.float32]


def _standalone_adapter(gated, *, dtype=torch.float32, dropout=0.0, n_in=24, n_out=40, r=3):
    """A LoRAAdapter on a frozen nn.Linear with random A, B (and gate), outside any model."""
    gen = torch.Generator().manual_seed(11)
    base = torch.nn.Linear(n_in, n_out).to(dtype).requires_grad_(False)
    gate = TokenGate(n_in) if gated else None
    adapter = LoRAAdapter(n_in, n_out, r, alpha=2.5 * r, dropout=dropout, gate=gate, dtype=dtype)
    with torch.no_grad():
        for p in list(adapter.parameters()) + (list(gate.parameters()) if gated else []):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return base, adapter, gate


@pytest.mark.parametrize("gated", [False, True])
def test_adapter_gradients_match_formula(gated):
    """Gradients of x, A, B and the gate equal autograd through the written-out formula."""
    base, adapter, gate = _standalone_adapter(gated)
    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(12), requires_grad=True)
    w_out = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(13))
    params = [x, adapter.lora_a, adapter.lora_b] + (list(gate.parameters()) if gated else [])

    g = gate(x) if gated else 1.0
    actual = torch.autograd.grad((adapter(x, base(x)) * w_out).sum(), params)
    if gated:
        g = torch.sigmoid(x @ gate.weight + gate.bias).unsqueeze(-1)
    expected_out = _reference_linear(x, base.weight, base.bias, adapter, g, False)
    expected = torch.autograd.grad((expected_out * w_out).sum(), params)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_dropout_applies_to_the_update_input_only():
    base, adapter, _ = _standalone_adapter(False, dropout=0.5)
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(14))
    torch.manual_seed(5)
    actual = adapter(x, base(x))
    torch.manual_seed(5)
    z = F.dropout(x, p=0.5, training=True)  # the same draw of the dropout mask
    expected = base(x) + (z @ adapter.lora_a.t()) @ adapter.lora_b.t() * adapter.scaling
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(z, x)  # the mask really dropped something
    adapter.eval()  # no dropout in eval mode
    plain = base(x) + (x @ adapter.lora_a.t()) @ adapter.lora_b.t() * adapter.scaling
    torch.testing.assert_close(adapter(x, base(x)), plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [False, True])
def test_adapter_keeps_only_rank_r_activations(gated, dtype):
    """Backward needs x and the rank-r h only: no (tokens, out_features) tensor is saved.

    The scale and the fp32 gate act on h (tokens x r); an update scaled or gated after B would
    keep a full-size (fp32, when gated) copy of the output for the gate's gradient.
    """
    n_tokens, n_out = 30, 40
    base, adapter, gate = _standalone_adapter(gated, dtype=dtype, n_out=n_out)
    x = torch.randn(n_tokens, 24, dtype=dtype, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    base_out = base(x)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if gated:
            gate(x)
        out = adapter(x, base_out)
    assert out.dtype == dtype and out.shape == base_out.shape
    assert saved  # the hook saw the adapter's graph
    full_size = [s for s in saved if math.prod(s[0]) >= n_tokens * n_out]
    assert full_size == [], f"full-size tensors kept for backward: {full_size}"


# ------------------------------------------------------------------------------------------------
# Training: gradients reach every adapter parameter, base weights stay bit-identical


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
@pytest.mark.parametrize("gated", [False, True])
def test_every_adapter_param_trains_within_two_steps(family, gated):
    model = build_tiny_model(family, num_layers=2)
    names = install(model, lora_spec(r=4, target="all", gated=gated, dropout=0.0))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in names}
    ids = tiny_batch(model)
    step1, step2 = _adamw_steps(model, names, ids)
    for n in names:
        assert step1[n].abs().sum() > 0 or step2[n].abs().sum() > 0, f"{n} never got a gradient"
        if n.endswith("lora_b"):
            assert step1[n].abs().sum() > 0  # B learns first (A and the gate are non-zero)
        else:  # A and the gate only see gradient once B != 0
            assert step1[n].abs().sum() == 0 and step2[n].abs().sum() > 0
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_same_grads(reentrant):
    def grads(checkpointing):
        model = build_tiny_model("llama", num_layers=2)
        names = install(model, lora_spec(r=4, target="all", gated=True))
        randomize_adapters(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
            if reentrant:  # frozen embeddings: the reentrant checkpoint needs an input with grad
                model.enable_input_require_grads()
        ids = tiny_batch(model)
        model(ids, labels=ids).loss.backward()
        params = dict(model.named_parameters())
        return {n: params[n].grad for n in names}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        assert plain[n].abs().sum() > 0
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Merge / unmerge, optimizer options, copies


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_merge_unmerge_round_trip(family):
    model = build_tiny_model(family, num_layers=2)
    install(model, lora_spec(r=4, target="all"))
    randomize_adapters(model)
    ids = tiny_batch(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}
    with torch.no_grad():
        adapted = model(ids).logits
        merged_names = merge_lora(model)
        assert len(merged_names) == 2 * (len(ATTN_LINEARS[family]) + len(MLP_LINEARS[family]))
        assert merge_lora(model) == merged_names  # idempotent: merged once
        merged = model(ids).logits
        changed = [n for n, p in model.named_parameters() if n in weights and not torch.equal(p, weights[n])]
        assert len(changed) == len(merged_names)
        for name, base, adapter in iter_lora_adapters(model):
            w = base.weight
            expected = weights[f"{name}.weight"] + adapter.delta_weight()
            torch.testing.assert_close(w, expected, rtol=0, atol=1e-6)
        unmerge_lora(model)
        restored = model(ids).logits
    # merge/unmerge round W + dW - dW in fp32; on some BLAS builds logits move by ~2e-5
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(restored, adapted, rtol=1e-4, atol=1e-4)
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)


def test_gated_lora_is_not_mergeable():
    model = build_tiny_model("llama", num_layers=2)
    install(model, lora_spec(r=4, target="mlp", gated=True))
    randomize_adapters(model)
    ids = tiny_batch(model)
    with torch.no_grad():
        before = model(ids).logits
        assert merge_lora(model) == []  # gated updates stay active in the hooks
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    _, base, adapter = next(iter_lora_adapters(model))
    assert adapter.mergeable is False
    with pytest.raises(ValueError, match="cannot be merged"):
        adapter.merge(base)


def test_optim_options():
    policy = get_policy("lora")
    spec = lora_spec(lr_scale=0.5, weight_decay=0.1, gate_lr_scale=4.0, gated=True)
    assert policy.optim_options("mlp.lora_gate.weight", spec) == {"lr_scale": 4.0, "weight_decay": 0.0}
    assert policy.optim_options("mlp.gate_proj.lora_adapter.lora_a", spec) == {
        "lr_scale": 0.5, "weight_decay": 0.1,
    }


def test_deepcopy_keeps_gate_links():
    model = build_tiny_model("mistral", num_layers=2)
    install(model, lora_spec(r=4, target="all", gated=True))
    randomize_adapters(model)
    clone = copy.deepcopy(model)
    ids = tiny_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(clone(ids).logits, model(ids).logits, rtol=0, atol=0)
    mlp = clone.model.layers[0].mlp
    assert mlp.up_proj.lora_adapter.gate is mlp.lora_gate


def test_dispatch_order_conv1d_before_linear():
    assert [d.name for d in LORA_DISPATCHERS][-1] == "nn.Linear"
    adapter = next(d for d in LORA_DISPATCHERS if d.matches(Conv1D(6, 4))).build(
        Conv1D(6, 4), r=2, alpha=2.0, dropout=0.0, gate=None
    )
    assert isinstance(adapter, LoRAAdapter) and adapter.transposed
    assert (adapter.in_features, adapter.out_features) == (4, 6)


def test_docs_example_runs(repo_root):
    import re

    text = (repo_root / "docs" / "policies.md").read_text()
    section = text.split("## `lora`", 1)[1].split("## `prefix`", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/policies.md (lora)", "exec"), {})


class _TaggedLinear(torch.nn.Linear):
    """A Linear subclass standing in for a special linear (e.g. a tensor-parallel one)."""


def test_registered_dispatcher_wins_over_plain_linear():
    from layerfreeze.policies.lora import LoRADispatcher, register_lora_dispatcher

    built = []

    def build(base, **kwargs):
        adapter = LoRAAdapter(base.in_features, base.out_features, device=base.weight.device,
                              dtype=base.weight.dtype, **kwargs)
        built.append(adapter)
        return adapter

    dispatcher = LoRADispatcher("tagged", lambda m: isinstance(m, _TaggedLinear), build)
    model = build_tiny_model("llama", num_layers=2)
    old = model.model.layers[0].mlp.up_proj
    tagged = _TaggedLinear(old.in_features, old.out_features, bias=False)
    tagged.load_state_dict(old.state_dict())
    model.model.layers[0].mlp.up_proj = tagged
    register_lora_dispatcher(dispatcher)
    try:
        assert LORA_DISPATCHERS[0] is dispatcher
        install(model, lora_spec(r=2, target="mlp"), layers={0})
    finally:
        LORA_DISPATCHERS.remove(dispatcher)
    assert built == [tagged.lora_adapter]  # only the subclass went through the new dispatcher
    assert isinstance(model.model.layers[0].mlp.down_proj.lora_adapter, LoRAAdapter)


# ---------------------------------------------------------------------------------------------
# One LoRA arithmetic (issue #15): layerfreeze.policies.lora_math, shared by every adapter


def test_lora_math_matches_formula():
    from layerfreeze.policies.lora_math import (
        add_low_rank,
        delta_weight,
        merge_delta,
        scale_low_rank,
        unmerge_delta,
    )

    g = torch.Generator().manual_seed(0)
    r, n_in, n_out, s = 3, 5, 4, 16.0 / 3
    a, b = torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g)
    expect = s * torch.einsum("or,ri->oi", b.double(), a.double())  # s * B A, independently
    tol = dict(rtol=1e-6, atol=1e-6)  # fp32 arithmetic against the float64 formula
    torch.testing.assert_close(delta_weight(a, b, s).double(), expect, **tol)
    torch.testing.assert_close(delta_weight(a, b, s, transposed=True).double(), expect.t(), **tol)
    batched = delta_weight(torch.stack([a, 2 * a]), torch.stack([b, b]), s, fp32=False)
    torch.testing.assert_close(batched.double(), torch.stack([expect, 2 * expect]), **tol)
    w = torch.randn(n_out, n_in, generator=g)
    w0 = w.clone()
    merge_delta(w, delta_weight(a, b, s))
    torch.testing.assert_close(w.double(), w0.double() + expect, **tol)
    unmerge_delta(w, delta_weight(a, b, s))
    torch.testing.assert_close(w, w0)

    x = torch.randn(2, 6, n_in, generator=g)
    base = torch.randn(2, 6, n_out, generator=g)
    gate = torch.rand(2, 6, 1, generator=g)
    for gv in (None, gate):
        h, scale = scale_low_rank(x @ a.t(), s, gv)
        out = add_low_rank(base, h, b, scale)
        gg = 1.0 if gv is None else gv.double()
        want = base.double() + gg * s * (x.double() @ a.double().t() @ b.double().t())
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    # B = 0 keeps the base output bit-exact; a bf16 adapter on an fp32 output is cast back.
    assert torch.equal(add_low_rank(base, x @ a.t(), torch.zeros_like(b), s), base)
    h16, scale = scale_low_rank((x @ a.t()).bfloat16(), s, gate)
    assert h16.dtype == torch.bfloat16 and scale == 1.0
    assert add_low_rank(base, h16, b.bfloat16(), scale).dtype == base.dtype


def test_lora_arithmetic_has_one_copy(repo_root):
    """No module but lora_math multiplies or folds LoRA factors itself (there were three copies:
    the HF adapters, the fused-experts adapter and the megatron tensor-parallel adapter)."""
    hits = []
    for path in sorted((repo_root / "layerfreeze").rglob("*.py")):
        if path.name == "lora_math.py":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if (
                "addmm(" in code  # the output update
                or ("lora_b" in code and any(op in code for op in ("@", "matmul(")))  # s B A
                or ("delta" in code and any(op in code for op in (".add_(", ".sub_(", "copy_(")))
                or ("lora" in path.name and ".float() * (" in code)  # the fp32 gate on h
            ):
                hits.append(f"{path.relative_to(repo_root)}:{n}: {line.strip()}")
    assert not hits, "LoRA arithmetic outside layerfreeze/policies/lora_math.py:\n" + "\n".join(hits)


def test_merged_export_rule_is_shared():
    """The rule "a (layer, policy) pair is fully merged" and the sidecar plan.json of a merged
    export live once in layerfreeze.export (export_merged, its streamed form and the megatron
    export each had their own copy; megatron imported export's private helpers)."""
    from layerfreeze.apply import adapter_param_names, apply_plan
    from layerfreeze.export import fully_merged_policies, sidecar_plan_json

    model = build_tiny_model("llama", num_layers=3)
    applied = apply_plan(model, "0:lora(r=2),1:lora(r=2,gated),2:freeze")
    names = adapter_param_names(model)
    assert fully_merged_policies(applied, applied.layout.layers, names, []) == {}
    applied.merge()
    merged = set(applied.merged_adapter_param_names())
    assert merged and all(".layers.0." in n for n in merged)  # gated layer 1 stays unmerged
    by_layer = fully_merged_policies(applied, applied.layout.layers, names, merged)
    assert by_layer == {0: {"lora"}}
    one = fully_merged_policies(applied, [applied.layout.layers[0]], names, merged)
    assert one == by_layer  # the streamed export asks one layer at a time
    meta = sidecar_plan_json(applied, by_layer)
    assert meta["kind"] == "merged_sidecar" and meta["num_layers"] == 3
    rules = meta["plan"]["rules"]
    assert [r["policy"] for r in rules] == ["freeze", "lora", "freeze"]  # merged layer 0 frozen
    assert rules[1]["gated"] is True and meta["install"] == []
    applied.unmerge()


def test_no_private_name_imported_across_packages(repo_root):
    """Names other packages import are public (issue #15: "make the helpers other packages
    import public"): no ``from layerfreeze.a.x import _y`` outside the package ``layerfreeze.a``.
    Modules of one package (the engine packages split one job per module, ``data``,
    ``diagnostics``) share underscore names as the package's internals."""
    import ast

    hits = []
    for path in sorted((repo_root / "layerfreeze").rglob("*.py")):
        rel = path.relative_to(repo_root).as_posix()
        own = ".".join(path.relative_to(repo_root).with_suffix("").parts[:-1])
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("layerfreeze"):
                source_pkg = node.module.rsplit(".", 1)[0] if "." in node.module else node.module
                if source_pkg == own and own != "layerfreeze":
                    continue  # a sibling module of the same package
                for a in node.names:
                    if a.name.startswith("_") and (rel, a.name) not in _PRIVATE_IMPORTS_ELSEWHERE:
                        hits.append(f"{rel}:{node.lineno}: from {node.module} import {a.name}")
    assert not hits, "\n".join(hits)


# Outside the policies / export area of issue #15 (owned elsewhere): left as they are.
_PRIVATE_IMPORTS_ELSEWHERE = {("layerfreeze/checkpoint.py", "_fsync_dir")}
