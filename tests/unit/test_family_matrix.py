"""Every preset on every decoder-only family transformers ships with a small config.

For each family of :data:`tests.helpers.tiny_models.MATRIX_FAMILIES` and each preset: the logits
equal the base model's at initialisation, a few AdamW steps change exactly what the plan trains
(every trainable tensor gets a gradient, every frozen one stays bit-identical and gets none),
and the parameter counts equal a formula written from the config fields of each architecture
(never from counting the model). Every preset applies on every family (MoE experts included);
the refusals that remain (options a module cannot honour) are tested to name the layer and the
reason, with nothing installed.
The projection route of the prefix policy (Falcon, BLOOM: attention computed inline) is checked
against a written-out formula too.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from layerfreeze.apply import apply_plan
from layerfreeze.cli import main
from layerfreeze.errors import ConfigError
from layerfreeze.models import discover_layout
from layerfreeze.plan import LayerPlan
from layerfreeze.policies.prefix.attention import dispatches_through_registry
from layerfreeze.registry import get_policy
from tests.helpers.tiny_models import (
    MATRIX_FAMILIES,
    build_matrix_model,
    matrix_config,
    tiny_batch,
)

torch.set_num_threads(1)

R, TOKENS = 2, 2
#: Preset -> arguments. 4 layers: hlpt = LoRA 0-2 + prefix 3; h2lpt (quarters) = LoRA 0,
#: freeze 1-2, prefix 3. hlpt / h2lpt put the prefix in the paper form (not the base model at
#: init); the _branch variants keep the zero-initialised branch (the base model exactly).
PRESETS = {
    "full": {},
    "freeze_deep": {},
    "freeze_shallow": {},
    "hlpt": dict(r=R, tokens=TOKENS),
    "h2lpt": dict(r=R, tokens=TOKENS),
    "hlpt_branch": dict(r=R, tokens=TOKENS),
    "h2lpt_branch": dict(r=R, tokens=TOKENS),
    "lora_all": dict(r=R),
}


# ------------------------------------------------------------------------------------------------
# Parameter counts from the config, per architecture (modeling_<family>.py, read by hand)


@dataclass
class Layer:
    """One decoder layer: LoRA-able linears ``(in, out, bias)`` and everything else."""

    attn: list[tuple[int, int, bool]]
    mlp: list[tuple[int, int, bool]]
    other: int  # norms, q/k norms, MoE router and fused expert tensors
    experts: list[tuple[int, int, int]]  # fused expert weights (experts, in, out) LoRA adapts
    heads: int
    kv_heads: int
    qk_dim: int
    v_dim: int

    def total(self) -> int:
        lin = sum(i * o + (o if b else 0) for i, o, b in self.attn + self.mlp)
        return lin + self.other


def _geometry(cfg):
    h = getattr(cfg, "hidden_size", None) or cfg.n_embd
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or h // heads
    return h, heads, kv, hd


def layer_formula(family: str, cfg, index: int) -> Layer:
    h, H, KV, hd = _geometry(cfg)
    inter = getattr(cfg, "intermediate_size", None)
    q, kvw = H * hd, KV * hd
    separate = lambda bias, obias=False: [  # noqa: E731 - q, k, v, o projections
        (h, q, bias),
        (h, kvw, bias),
        (h, kvw, bias),
        (q, h, obias),
    ]
    swiglu = [(h, inter, False), (h, inter, False), (inter, h, False)]
    dims = dict(heads=H, kv_heads=KV, qk_dim=hd, v_dim=hd)
    if family in ("llama", "mistral", "gemma", "cohere"):
        norms = {"cohere": h}.get(family, 2 * h)  # Cohere: one weight-only LayerNorm
        return Layer(separate(False), swiglu, norms, [], **dims)
    if family in ("gemma2", "gemma3_text"):
        qk_norms = 2 * hd if family == "gemma3_text" else 0
        return Layer(separate(False), swiglu, 4 * h + qk_norms, [], **dims)
    if family == "qwen3":
        return Layer(separate(False), swiglu, 2 * h + 2 * hd, [], **dims)
    if family == "olmo2":  # q/k norms over the whole projections
        return Layer(separate(False), swiglu, 2 * h + q + kvw, [], **dims)
    if family == "qwen2":
        return Layer(separate(True), swiglu, 2 * h, [], **dims)
    if family == "stablelm":
        return Layer(separate(False), swiglu, 4 * h, [], **dims)
    if family == "starcoder2":
        mlp = [(h, inter, True), (inter, h, True)]
        return Layer(separate(True, True), mlp, 4 * h, [], **dims)
    if family == "mixtral":
        E = cfg.num_local_experts
        experts = E * h + E * 2 * inter * h + E * h * inter  # router, gate_up, down
        fused = [(E, h, 2 * inter), (E, inter, h)]
        return Layer(separate(False), [], 2 * h + experts, fused, **dims)
    if family == "qwen2_moe":
        E, mi, si = cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
        shared = [(h, si, False), (h, si, False), (si, h, False), (h, 1, False)]
        experts = E * h + E * 2 * mi * h + E * h * mi
        fused = [(E, h, 2 * mi), (E, mi, h)]
        return Layer(separate(True), shared, 2 * h + experts, fused, **dims)
    if family == "phi":
        mlp = [(h, inter, True), (inter, h, True)]
        return Layer(separate(True, True), mlp, 2 * h, [], **dims)
    if family == "phi3":
        attn = [(h, q + 2 * kvw, False), (q, h, False)]
        return Layer(attn, [(h, 2 * inter, False), (inter, h, False)], 2 * h, [], **dims)
    if family == "glm":
        attn = separate(True, False)
        return Layer(attn, [(h, 2 * inter, False), (inter, h, False)], 2 * h, [], **dims)
    if family in ("gpt2", "gpt_bigcode"):
        mq = family == "gpt_bigcode" and cfg.multi_query
        inner = cfg.n_inner or 4 * h
        attn = [(h, h + 2 * hd if mq else 3 * h, True), (h, h, True)]
        d = dict(dims, kv_heads=1 if mq else H)
        return Layer(attn, [(h, inner, True), (inner, h, True)], 4 * h, [], **d)
    if family in ("gptj", "codegen"):
        inner = cfg.n_inner or 4 * h
        attn = [(h, h, False)] * 4 if family == "gptj" else [(h, 3 * h, False), (h, h, False)]
        return Layer(attn, [(h, inner, True), (inner, h, True)], 2 * h, [], **dims)
    if family == "gpt_neox":
        attn = [(h, 3 * h, True), (h, h, True)]
        return Layer(attn, [(h, inter, True), (inter, h, True)], 4 * h, [], **dims)
    if family == "falcon":
        assert cfg.multi_query and not cfg.new_decoder_architecture and cfg.parallel_attn
        inner = cfg.ffn_hidden_size or 4 * h
        b = cfg.bias
        attn = [(h, h + 2 * hd, b), (h, h, b)]
        d = dict(dims, kv_heads=1)
        return Layer(attn, [(h, inner, b), (inner, h, b)], 2 * h, [], **d)
    if family == "bloom":
        attn = [(h, 3 * h, True), (h, h, True)]
        return Layer(attn, [(h, 4 * h, True), (4 * h, h, True)], 4 * h, [], **dims)
    if family == "opt":
        f = cfg.ffn_dim
        return Layer(separate(True, True), [(h, f, True), (f, h, True)], 4 * h, [], **dims)
    if family == "deepseek_v3":
        qr, kvr = cfg.q_lora_rank, cfg.kv_lora_rank
        nope, rope, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        attn = [
            (h, qr, False),
            (qr, H * (nope + rope), False),
            (h, kvr + rope, False),
            (kvr, H * (nope + v), False),
            (H * v, h, False),
        ]
        norms = 2 * h + qr + kvr  # block norms, q_a / kv_a layernorms
        d = dict(dims, qk_dim=nope + rope, v_dim=v)
        if index < cfg.first_k_dense_replace:
            return Layer(attn, swiglu, norms, [], **d)
        E, mi = cfg.n_routed_experts, cfg.moe_intermediate_size
        si = mi * cfg.n_shared_experts
        shared = [(h, si, False), (h, si, False), (si, h, False)]
        experts = E * h + E * 2 * mi * h + E * h * mi
        fused = [(E, h, 2 * mi), (E, mi, h)]
        return Layer(attn, shared, norms + experts, fused, **d)
    raise AssertionError(f"no formula for {family}")


def non_layer_formula(family: str, cfg) -> dict[str, int]:
    h, _, _, _ = _geometry(cfg)
    v = cfg.vocab_size
    emb = v * h
    if family in ("gpt2", "gpt_bigcode"):
        emb += cfg.n_positions * h  # learned positions
    if family == "opt":
        emb += (cfg.max_position_embeddings + 2) * h  # OPT offsets positions by 2
    if family == "bloom":
        emb += 2 * h  # word_embeddings_layernorm
    layer_norm_final = {
        "phi",
        "gpt2",
        "gptj",
        "gpt_neox",
        "codegen",
        "falcon",
        "bloom",
        "opt",
        "stablelm",
        "starcoder2",
        "gpt_bigcode",
    }
    final = 2 * h if family in layer_norm_final else h
    head = (
        0 if cfg.tie_word_embeddings else v * h + (v if family in ("phi", "gptj", "codegen") else 0)
    )
    return {"embeddings": emb, "final_norm": final, "lm_head": head}


def expected_trainable(family: str, cfg, plan: LayerPlan) -> int:
    """Trainable parameters of ``plan`` from the formulas above."""
    h = _geometry(cfg)[0]
    resolved = plan.resolve(
        cfg.num_hidden_layers if hasattr(cfg, "num_hidden_layers") else cfg.n_layer
    )
    total = 0
    for i, spec in enumerate(resolved.layers):
        layer = layer_formula(family, cfg, i)
        o = spec.options
        if spec.name == "full":
            total += layer.total()
        elif spec.name == "lora":
            down = [(i_, o_, b) for i_, o_, b in layer.mlp if o_ == h != i_]
            subs = {
                "attn": [layer.attn],
                "mlp": [layer.mlp],
                "all": [layer.attn, layer.mlp],
                "down": [down],
            }[o.target]
            total += sum(o.r * (i_ + o_) for sub in subs for i_, o_, _ in sub)
            if o.target in ("mlp", "all"):  # per expert: r * (in + out)
                total += sum(o.r * e * (i_ + o_) for e, i_, o_ in layer.experts)
            total += (h + 1) * len(subs) * int(o.gated)
        elif spec.name == "prefix":
            kv = layer.kv_heads * o.tokens * (layer.qk_dim + layer.v_dim)
            factor = layer.heads if o.form == "branch" else 0  # the paper form has none
            total += kv + factor + (h + 1) * int(o.gated)
        else:
            assert spec.name == "freeze"
    parts = non_layer_formula(family, cfg)
    for part in ("embeddings", "final_norm", "lm_head"):
        if resolved.non_layer(part).name == "full":
            total += parts[part]
    return total


# ------------------------------------------------------------------------------------------------
# The matrix


@pytest.fixture(scope="module", params=list(MATRIX_FAMILIES))
def family_model(request):
    family = request.param
    model = build_matrix_model(family)
    ids = tiny_batch(128, batch=2, seq=6)
    with torch.no_grad():
        logits = model(ids).logits
    return family, model, ids, logits


def test_base_parameter_count_matches_the_config(family_model):
    family, model, _, _ = family_model
    cfg = model.config
    layers = sum(layer_formula(family, cfg, i).total() for i in range(4))
    parts = non_layer_formula(family, cfg)
    assert sum(p.numel() for p in model.parameters()) == layers + sum(parts.values())
    layout = discover_layout(model)
    assert layout.num_layers == 4 and layout.tied_embeddings is bool(cfg.tie_word_embeddings)
    for layer in layout.layers:
        got = sum(p.numel() for p in layer.module.parameters())
        assert got == layer_formula(family, cfg, layer.index).total(), (family, layer.index)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_identity_training_and_counts(family_model, preset):
    family, base, ids, base_logits = family_model
    model = copy.deepcopy(base)
    plan = LayerPlan.from_preset(preset, **PRESETS[preset])
    paper = any(r.spec.name == "prefix" and r.spec.options.form == "paper" for r in plan.rules)
    try:
        applied = apply_plan(model, plan)
    except ConfigError as e:
        # The paper form needs the registry call with eager/sdpa: refused with the way out.
        assert paper, (family, preset, e)
        assert all("form=branch" in p and "hlpt_branch" in p for p in e.problems), e.problems
        assert not [n for n, _ in model.named_parameters() if "lora_" in n or "prefix_" in n]
        return

    # 1. Identity at initialisation (the branch form); the paper form shifts attention at init.
    with torch.no_grad():
        if paper:
            assert not torch.equal(model(ids).logits, base_logits), (family, preset)
        else:
            assert torch.equal(model(ids).logits, base_logits), (family, preset)

    # 2. Counts: the applied plan, the live requires_grad flags and the config formula agree.
    expected = expected_trainable(family, base.config, plan)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert applied.trainable_names() == trainable
    assert applied.num_trainable_params() == expected, (family, preset)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected

    # 3. A few AdamW steps: every trainable tensor gets a gradient and moves; the rest stays.
    params = dict(model.named_parameters())
    frozen = {n: p.detach().clone() for n, p in params.items() if not p.requires_grad}
    start = {n: params[n].detach().clone() for n in trainable}
    opt = torch.optim.AdamW(applied.param_groups(lr=1e-2, weight_decay=0.0))
    seen = {n: 0.0 for n in trainable}
    model.train()
    for _ in range(3):  # zero-init B / factor: A, prefix K/V and gates get gradient from step 2
        opt.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        for n in trainable:
            assert params[n].grad is not None, (family, preset, n)
            seen[n] += params[n].grad.abs().sum().item()
        opt.step()
    assert [n for n, s in seen.items() if s == 0] == [], (family, preset)
    assert [n for n in trainable if torch.equal(params[n], start[n])] == [], (family, preset)
    for n, before in frozen.items():
        assert params[n].grad is None and torch.equal(params[n], before), (family, preset, n)


# ------------------------------------------------------------------------------------------------
# The prefix projection route against a written-out formula


def _keep(seen: dict, key: str, value) -> None:
    """Record the first value seen under ``key`` (a hook body that returns None)."""
    seen.setdefault(key, value)


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


ROUTE_CASES = [
    ("falcon", {}),  # multi-query, rotary
    ("falcon", dict(alibi=True)),  # ALiBi: no query position
    ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2)),  # grouped query layout
    ("bloom", {}),
]


@pytest.mark.parametrize(
    "family,extra", ROUTE_CASES, ids=["falcon", "falcon_alibi", "falcon_gqa", "bloom"]
)
@pytest.mark.parametrize("gated", [False, True])
def test_projection_route_branch_matches_formula(family, extra, gated):
    from transformers import AutoModelForCausalLM

    # Rebuilt from a dict so derived fields (5.25's FalconConfig.num_key_value_heads) follow.
    fields = {**matrix_config(family).to_dict(), **extra}
    fields.pop("num_key_value_heads", None)
    cfg = type(matrix_config(family)).from_dict(fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    applied = apply_plan(model, f"1:prefix(tokens=3{',gated' if gated else ''})")
    attn = discover_layout(model).layers[1].attn
    adapter = attn.prefix_adapter
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n in applied.trainable_names():
            p = model.get_parameter(n)
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "prefix_gate" in n else 1.0))
    calls = []
    handle = attn.register_forward_pre_hook(
        lambda m, a, k: calls.append((a, dict(k))), with_kwargs=True, prepend=True
    )
    ids = tiny_batch(128, batch=2, seq=5)
    with torch.no_grad():
        model(ids, use_cache=False)  # no cache: the recorded call can be replayed as is
    handle.remove()
    args, kwargs = calls[0]
    with torch.no_grad():
        with_prefix = attn(*args, **kwargs)[0]
        factor = adapter.prefix_gating_factor.clone()
        adapter.prefix_gating_factor.zero_()
        without = attn(*args, **kwargs)[0]
        adapter.prefix_gating_factor.copy_(factor)

        # Reference: the query from the fused projection, written out per layout.
        h = args[0] if args else kwargs["hidden_states"]
        B, T, _ = h.shape
        H, D = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        qkv = attn.query_key_value
        fused = h @ qkv.weight.t() + (qkv.bias if qkv.bias is not None else 0)
        if family == "bloom":
            q = fused.view(B, T, H, 3, D)[..., 0, :]
        elif getattr(cfg, "new_decoder_architecture", False):
            KV = cfg.num_kv_heads
            q = fused.view(B, T, KV, H // KV + 2, D)[:, :, :, :-2].reshape(B, T, H, D)
        else:  # multi-query: H query heads, then one key and one value head
            q = fused.view(B, T, H + 2, D)[:, :, :H]
        q = q.transpose(1, 2)
        if family == "falcon" and not cfg.alibi:
            cos, sin = kwargs["position_embeddings"]
            q = q * cos.unsqueeze(1) + _rotate_half(q) * sin.unsqueeze(1)
        kv_heads = adapter.prefix_key.shape[0]
        gate = (
            torch.sigmoid(h @ adapter.prefix_gate.weight + adapter.prefix_gate.bias)
            if gated
            else torch.ones(B, T)
        )
        heads = []
        for i in range(H):
            j = i // (H // kv_heads)
            scores = q[:, i] @ adapter.prefix_key[j].t() / D**0.5
            probs = torch.exp(scores - scores.amax(-1, keepdim=True))
            probs = probs / probs.sum(-1, keepdim=True)
            heads.append(factor[i] * gate.unsqueeze(-1) * (probs @ adapter.prefix_value[j]))
        expected = torch.stack(heads, dim=2).reshape(B, T, H * D) @ attn.dense.weight.t()
    new_arch = getattr(cfg, "new_decoder_architecture", False)
    assert kv_heads == (2 if new_arch else (1 if family == "falcon" else H))
    torch.testing.assert_close(with_prefix - without, expected, rtol=1e-4, atol=1e-5)
    assert expected.abs().max() > 1e-2


def _inline_families() -> list[str]:
    """Families whose attention computes inline (the projection route) in the installed
    transformers: BLOOM always; Falcon up to 5.24 (5.25 dispatches it through the registry)."""
    return [
        f for f in ("falcon", "bloom")
        if not dispatches_through_registry(discover_layout(build_matrix_model(f)).layers[0].attn)
    ]


def test_falcon_route_follows_the_installed_transformers():
    # 5.25 moved FalconAttention onto ALL_ATTENTION_FUNCTIONS; earlier releases compute inline.
    # The route is chosen from the compiled forward, so both releases get the branch.
    import transformers
    from packaging.version import Version

    from layerfreeze.policies.prefix.attention import find_route

    attn = discover_layout(build_matrix_model("falcon")).layers[0].attn
    inline = Version(transformers.__version__).release < (5, 25)
    assert dispatches_through_registry(attn) is not inline
    assert (find_route(attn) is not None) is inline
    bloom = discover_layout(build_matrix_model("bloom")).layers[0].attn
    assert find_route(bloom) is not None and not dispatches_through_registry(bloom)


def test_projection_route_survives_a_later_lora_on_the_same_projection():
    # A schedule may install LoRA on query_key_value after the prefix: the query must include it.
    families = _inline_families()
    assert "bloom" in families
    for family in families:
        _check_route_sees_later_lora(family)


def _check_route_sees_later_lora(family: str) -> None:
    from layerfreeze.policies.prefix.attention import find_route

    model = build_matrix_model(family)
    layout = discover_layout(model)
    layer = layout.layers[3]
    for spec in ("3:prefix(tokens=2)", "3:lora(r=2,target=[query_key_value])"):
        spec = LayerPlan.parse(spec).rules[0].spec
        get_policy(spec.name).apply(layer, spec, layout)
    attn = layer.attn
    qkv = attn.query_key_value
    names = lambda: [h.__name__ for h in qkv._forward_hooks.values()]  # noqa: E731
    assert names() == ["_projection_query_hook", "_lora_forward_hook"]  # installation order
    with torch.no_grad():
        qkv.lora_adapter.lora_b.normal_()
        attn.prefix_adapter.prefix_gating_factor.fill_(1.0)
    seen = {}
    attn.dense.register_forward_pre_hook(
        lambda m, a: _keep(seen, "q", attn.prefix_adapter.query), prepend=True
    )
    qkv.register_forward_pre_hook(lambda m, a: _keep(seen, "h", a[0]))
    attn.register_forward_pre_hook(
        lambda m, a, k: _keep(
            seen, "call", {"position_embeddings": k.get("position_embeddings"), "alibi": k.get("alibi")}
        ),
        with_kwargs=True,
    )
    query = find_route(attn).query
    with torch.no_grad():
        model(tiny_batch(128, batch=1, seq=4), use_cache=False)
        assert names()[-1] == "_projection_query_hook"  # moved last before the projection ran
        h, call = seen["h"], seen["call"]
        base_out = h @ qkv.weight.t() + (qkv.bias if qkv.bias is not None else 0)
        with_lora = qkv(h)  # the hooks run (the branch is not pending: the query hook is a no-op)
        assert not torch.equal(with_lora, base_out)
        torch.testing.assert_close(seen["q"], query(attn, with_lora, call))
        assert not torch.allclose(seen["q"], query(attn, base_out, call))


def test_registry_detection_reads_compiled_code_not_text():
    llama, bloom = build_matrix_model("llama"), build_matrix_model("bloom")
    assert dispatches_through_registry(discover_layout(llama).layers[0].attn)
    assert not dispatches_through_registry(discover_layout(bloom).layers[0].attn)

    class Mentions(nn.Module):
        def forward(self, x):
            """Calls ALL_ATTENTION_FUNCTIONS? No: only this text mentions it."""
            return x  # ALL_ATTENTION_FUNCTIONS

    assert not dispatches_through_registry(Mentions())


class _ToyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.config = type("C", (), {"_attn_implementation": "sdpa"})()

    def forward(self, x):
        return self.qkv(x)[..., :8]


class _ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = _ToyAttention()
        self.mlp = nn.Linear(8, 8)


def test_attention_without_registry_or_route_is_refused_with_the_reason():
    from layerfreeze.models import LayerInfo, ModelLayout

    block = _ToyBlock()
    layer = LayerInfo(0, "blocks.0", block, "self_attn", "mlp")
    layout = ModelLayout([layer], "toy", hidden_size=8, num_heads=2, num_kv_heads=2, head_dim=4)
    problems = get_policy("prefix").check(layer, LayerPlan.parse("0:prefix").rules[0].spec, layout)
    assert len(problems) == 1
    assert problems[0].startswith("layer 0 (blocks.0.self_attn, _ToyAttention): ")
    assert "ALL_ATTENTION_FUNCTIONS" in problems[0] and "falcon, bloom" in problems[0]


def test_bloom_slow_but_exact_tensor_parallel_is_refused():
    model = build_matrix_model("bloom")
    for block in model.transformer.h:
        block.self_attention.pretraining_tp, block.self_attention.slow_but_exact = 2, True
    with pytest.raises(ConfigError, match="slow_but_exact"):
        apply_plan(model, "hlpt(r=2,tokens=2)")


def test_remove_prefix_adapters_on_the_projection_route():
    from layerfreeze.policies.prefix import remove_prefix_adapters

    model = build_matrix_model("bloom")
    ids = tiny_batch(128, batch=1, seq=4)
    with torch.no_grad():
        before = model(ids).logits
    apply_plan(model, "all:prefix(tokens=2,gated)")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    assert remove_prefix_adapters(model) == 4
    attn = model.transformer.h[0].self_attention
    for m in (attn, attn.query_key_value, attn.dense):
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert "_layerfreeze_prefix_attn" not in m.__dict__
    with torch.no_grad():
        assert torch.equal(before, model(ids).logits)


def test_opt_gated_mlp_lora_gate_reads_the_ffn_input():
    # OPT's fc1 / fc2 sit on the block: the gate is the block's, computed from fc1's input.
    model = build_matrix_model("opt")
    apply_plan(model, "all:lora(r=2,target=mlp,gated)")
    block = model.model.decoder.layers[2]
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in (block.fc2.lora_adapter.lora_b, block.lora_gate.weight):
            p.copy_(torch.randn(p.shape, generator=g))
    seen = {}
    block.fc1.register_forward_pre_hook(lambda m, a: _keep(seen, "h", a[0]), prepend=True)
    block.fc2.register_forward_pre_hook(lambda m, a: _keep(seen, "x", a[0]))
    block.fc2.register_forward_hook(lambda m, a, out: _keep(seen, "out", out))
    with torch.no_grad():
        model(tiny_batch(128, batch=1, seq=4))
        h, x = seen["h"], seen["x"]
        g = torch.sigmoid(h @ block.lora_gate.weight + block.lora_gate.bias).unsqueeze(-1)
        ad = block.fc2.lora_adapter
        want = (
            x @ block.fc2.weight.t()
            + block.fc2.bias
            + g * ad.scaling * (x @ ad.lora_a.t() @ ad.lora_b.t())
        )
    torch.testing.assert_close(seen["out"], want, rtol=1e-4, atol=1e-5)
    assert block.lora_gate.value is None  # cleared when the block's forward ended


# ------------------------------------------------------------------------------------------------
# The CLI on families the first release refused


def _save_config(tmp_path, family):
    path = tmp_path / family
    path.mkdir()
    matrix_config(family).save_pretrained(path)
    return path / "config.json"


def test_cli_plan_freeze_deep_on_opt(tmp_path, capsys):
    cfg = _save_config(tmp_path, "opt")
    assert main(["plan", "--model", str(cfg), "--preset", "freeze_deep", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    c = matrix_config("opt")
    layer = layer_formula("opt", c, 0).total()
    assert [r["policy"] for r in data["layers"]] == ["full", "full", "freeze", "freeze"]
    assert [r["trainable_params"] for r in data["layers"]] == [layer, layer, 0, 0]
    assert data["trainable_params"] == expected_trainable(
        "opt", c, LayerPlan.from_preset("freeze_deep")
    )


def test_cli_plan_hlpt_on_falcon(tmp_path, capsys):
    cfg = _save_config(tmp_path, "falcon")
    preset = _hlpt(build_matrix_model("falcon")).split("(")[0]  # paper form where it runs
    assert (
        main(
            [
                "plan",
                "--model",
                str(cfg),
                "--preset",
                preset,
                "--preset-arg",
                "r=2",
                "--preset-arg",
                "tokens=2",
                "--json",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert [r["policy"].split("(")[0] for r in data["layers"]] == ["lora"] * 3 + ["prefix"]
    plan = LayerPlan.from_preset(preset, r=2, tokens=2)
    assert data["trainable_params"] == expected_trainable("falcon", matrix_config("falcon"), plan)


# ------------------------------------------------------------------------------------------------
# The HLPT paper's ablations (docs/plans.md, "HLPT ablations") on a tiny Llama

ABLATIONS = {
    # preset string -> per-layer policy names and options of interest, N = 8
    "hlpt(r=2,tokens=2)": ["lora"] * 6 + ["prefix"] * 2,
    "hlpt(r=2,tokens=2,gated=false)": ["lora"] * 6 + ["prefix"] * 2,
    "hlpt(r=2,tokens=2,lora_target=attn)": ["lora"] * 6 + ["prefix"] * 2,
    "hlpt(r=2,tokens=2,reverse=true)": ["prefix"] * 2 + ["lora"] * 6,
    "hlpt(r=2,tokens=2,lora_target=down)": ["lora"] * 6 + ["prefix"] * 2,
    "hlpt(r=2,tokens=2,lora_fraction=0.5)": ["lora"] * 4 + ["prefix"] * 4,
    "hlpt(r=2,tokens=2,lora_fraction=0.875)": ["lora"] * 7 + ["prefix"] * 1,
}


@pytest.mark.parametrize("preset", list(ABLATIONS))
def test_hlpt_ablations_resolve_and_apply(preset):
    from tests.helpers.tiny_models import build_tiny_model

    model = build_tiny_model("llama", num_layers=8, hidden=32)
    ids = tiny_batch(model, seq=6)
    with torch.no_grad():
        base = model(ids).logits
    plan = LayerPlan.parse(preset)
    resolved = plan.resolve(8)
    assert [s.name for s in resolved.layers] == ABLATIONS[preset]
    gated = "gated=false" not in preset
    target = "attn" if "attn" in preset else "down" if "down" in preset else "mlp"
    for spec in resolved.layers:
        assert spec.options.gated is gated
        if spec.name == "lora":
            assert spec.options.target == target
    applied = apply_plan(model, plan)
    with torch.no_grad():  # the paper form's prefix shifts attention at init (docs/plans.md)
        assert not torch.equal(model(ids).logits, base)
    assert applied.num_trainable_params() == expected_trainable("llama", model.config, plan)
    if not gated:  # the gate-free ablation: no gate and no factor anywhere
        assert not [n for n in applied.trainable_names() if "_gate." in n or "factor" in n]
    names = applied.trainable_names()
    if target == "down":
        assert {n.split(".")[-3] for n in names if ".lora_adapter." in n} == {"down_proj"}
    if target == "attn":
        assert all(".self_attn." in n for n in names)
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(model.get_parameter(n).grad is not None for n in names)


@pytest.mark.parametrize(
    "family,down",
    [
        ("llama", ["mlp.down_proj"]),
        ("opt", ["fc2"]),
        ("gpt2", ["mlp.c_proj"]),
        ("falcon", ["mlp.dense_4h_to_h"]),
        ("phi3", ["mlp.down_proj"]),
        ("qwen2_moe", None),
        ("deepseek_v3", ["mlp.down_proj"]),
    ],
)
def test_lora_target_down_is_the_ffn_output_projection(family, down):
    from layerfreeze.policies.lora import resolve_lora_targets

    model = build_matrix_model(family)
    layout = discover_layout(model)
    targets, problems = resolve_lora_targets(layout.layers[0], "down", layout.hidden_size)
    if down is None:  # fused experts: refused, not a silent shared-expert-only adapter
        assert targets == [] and "down projection alone of the fused MoE experts" in problems[0]
        return
    assert problems == [] and [p for p, _ in targets] == down


# ------------------------------------------------------------------------------------------------
# The new paths under generation, gradient checkpointing and save / load


def _randomize_adapters(model, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "prefix_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "gate" in n else 1.0))


def _hlpt(model, args: str = "r=2,tokens=2") -> str:
    """``hlpt`` (the paper form) where the attention dispatches through transformers' registry,
    else ``hlpt_branch`` (the projection route: BLOOM, Falcon before transformers 5.25)."""
    attn = discover_layout(model).layers[0].attn
    return f"hlpt{'' if dispatches_through_registry(attn) else '_branch'}({args})"


@pytest.mark.parametrize("family", ["falcon", "bloom", "opt"])
def test_kv_cache_generation_matches_full_recomputation(family):
    model = build_matrix_model(family)
    apply_plan(model, _hlpt(model))
    _randomize_adapters(model)
    prompt = tiny_batch(128, batch=2, seq=4)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kwargs)
        full = model.generate(prompt, use_cache=False, **kwargs)
        stepwise = torch.stack(
            model.generate(
                prompt, use_cache=True, output_scores=True, return_dict_in_generate=True, **kwargs
            ).scores,
            dim=1,
        )
        one_pass = model(cached).logits[:, prompt.shape[1] - 1 : -1]
    assert torch.equal(cached, full)
    torch.testing.assert_close(stepwise, one_pass, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["falcon", "opt"])
def test_gradient_checkpointing_gives_the_same_gradients(family):
    def grads(checkpointing):
        model = build_matrix_model(family)
        applied = apply_plan(model, _hlpt(model))
        _randomize_adapters(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        ids = tiny_batch(128, batch=2, seq=6)
        torch.manual_seed(0)  # same dropout masks
        model(ids, labels=ids).loss.backward()
        return {n: model.get_parameter(n).grad for n in applied.trainable_names()}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        assert plain[n].abs().sum() > 0, n
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["falcon", "bloom", "opt", "deepseek_v3"])
def test_save_and_load_trainable_reproduce_the_logits(family, tmp_path):
    from layerfreeze.export import load_trainable, save_trainable

    model = build_matrix_model(family)
    applied = apply_plan(model, _hlpt(model))
    _randomize_adapters(model)
    ids = tiny_batch(128, batch=2, seq=5)
    with torch.no_grad():
        want = model(ids).logits
    save_trainable(applied, tmp_path)
    fresh = build_matrix_model(family)
    load_trainable(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "family,names",
    [
        ("qwen2_moe", "shared_expert.gate_proj,shared_expert.up_proj,shared_expert.down_proj"),
        ("deepseek_v3", "gate_proj,up_proj,down_proj"),
    ],
)
def test_gated_lora_on_a_flattened_shared_expert(family, names):
    # Qwen2-MoE calls its shared expert on a (batch * seq, hidden) view of the FFN input: the
    # per-token gate computed from (batch, seq, hidden) must follow the flattening.
    model = build_matrix_model(family)
    applied = apply_plan(model, f"3:lora(r=2,target=[{names}],gated)")
    mlp = discover_layout(model).layers[3].mlp
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n in applied.trainable_names():
            if n.endswith("lora_b") or ".lora_gate." in n:
                p = model.get_parameter(n)
                p.copy_(torch.randn(p.shape, generator=g))
    shared = mlp.shared_expert if family == "qwen2_moe" else mlp.shared_experts
    seen = {}
    mlp.register_forward_pre_hook(lambda m, a: _keep(seen, "h", a[0]))
    shared.down_proj.register_forward_pre_hook(lambda m, a: _keep(seen, "x", a[0]))
    shared.down_proj.register_forward_hook(lambda m, a, out: _keep(seen, "out", out))
    with torch.no_grad():
        model(tiny_batch(128, batch=2, seq=4))
        h, x = seen["h"], seen["x"]
        # Qwen2-MoE runs its shared expert on flattened tokens, DeepSeek-V3 on (batch, seq).
        assert h.dim() == 3 and x.dim() == (2 if family == "qwen2_moe" else 3)
        gate = torch.sigmoid(h @ mlp.lora_gate.weight + mlp.lora_gate.bias)
        gate = gate.reshape(*x.shape[:-1], 1)
        ad, w = shared.down_proj.lora_adapter, shared.down_proj.weight
        want = x @ w.t() + gate * ad.scaling * (x @ ad.lora_a.t() @ ad.lora_b.t())
    torch.testing.assert_close(seen["out"], want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# LoRA on the fused experts of MoE blocks (weight-space, per expert)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
@pytest.mark.parametrize("gated", [False, True])
def test_experts_lora_matches_the_per_expert_formula(family, implementation, gated):
    model = build_matrix_model(family)
    model.config._experts_implementation = implementation
    ids = tiny_batch(128, batch=2, seq=5)
    with torch.no_grad():
        base = model(ids).logits
    applied = apply_plan(model, f"3:lora(r=2,target=mlp,alpha=4.0{',gated' if gated else ''})")
    assert model.config._experts_implementation == f"layerfreeze_lora:{implementation}"
    with torch.no_grad():
        if gated and implementation == "batched_mm":
            # Gated: transformers' eager expert loop, which sums in another order than
            # batched_mm (grouped_mm runs that loop on CPU).
            torch.testing.assert_close(model(ids).logits, base, rtol=1e-5, atol=1e-6)
        else:  # ungated: W + 0 is W in every implementation
            assert torch.equal(model(ids).logits, base)
    experts = discover_layout(model).layers[3].mlp.experts
    ad = experts.lora_adapter
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n in applied.trainable_names():
            p = model.get_parameter(n)
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    seen = {}
    mlp = discover_layout(model).layers[3].mlp
    mlp.register_forward_pre_hook(lambda m, a: _keep(seen, "h", a[0]))
    experts.register_forward_pre_hook(lambda m, a: _keep(seen, "args", a))
    experts.register_forward_hook(lambda m, a, out: _keep(seen, "out", out))
    with torch.no_grad():
        model(ids)
        x, index, weights = seen["args"]
        h = seen["h"].reshape(-1, seen["h"].shape[-1])  # the MLP input, one row per token
        g = torch.sigmoid(h @ mlp.lora_gate.weight + mlp.lora_gate.bias) if gated else None
        # Written out: expert e adds g_t (alpha / r) B_e A_e (g = 1 ungated) to W_e on token t;
        # SwiGLU on [gate; up]; the routing weights scale each chosen expert's output.
        s = 4.0 / 2
        gu, dn = ad.gate_up_proj, ad.down_proj
        want = torch.zeros_like(x)
        for t in range(x.shape[0]):
            gs = s * (g[t] if gated else 1.0)
            for k in range(index.shape[1]):
                e = int(index[t, k])
                w1 = experts.gate_up_proj[e] + gs * gu.lora_b[e] @ gu.lora_a[e]
                w2 = experts.down_proj[e] + gs * dn.lora_b[e] @ dn.lora_a[e]
                gate, up = (w1 @ x[t]).chunk(2)
                want[t] += weights[t, k] * (w2 @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(seen["out"], want, rtol=1e-4, atol=1e-5)
    assert (seen["out"] - want).abs().max() < 1e-4 and ad.gate_up_proj.lora_b.abs().sum() > 0


def test_experts_lora_exports_merged_and_refuses_peft(tmp_path):
    from transformers import AutoModelForCausalLM

    from layerfreeze.export import export_merged
    from layerfreeze.interop.peft import peft_export_problems

    model = build_matrix_model("mixtral")
    applied = apply_plan(model, "lora_all(r=2)")
    _randomize_adapters(model)
    ids = tiny_batch(128, batch=2, seq=5)
    with torch.no_grad():
        want = model(ids).logits
    problems = peft_export_problems(applied)
    assert any("fused MoE expert weights" in p for p in problems)
    export_merged(applied, tmp_path)
    assert "layerfreeze" not in (tmp_path / "config.json").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, want, rtol=1e-4, atol=1e-4)


def test_experts_lora_refuses_dropout_with_the_reason():
    model = build_matrix_model("qwen2_moe")
    with pytest.raises(ConfigError) as e:
        apply_plan(model, "0:lora(r=2,target=mlp,dropout=0.1)")
    (p,) = e.value.problems
    assert "layer 0 (model.layers.0)" in p and "mlp.experts" in p and "input dropout" in p
    assert not [n for n, _ in model.named_parameters() if "lora_" in n]


def test_gated_experts_lora_is_not_merged_and_round_trips(tmp_path):
    from layerfreeze.export import export_merged, load_export

    model = build_matrix_model("mixtral")
    applied = apply_plan(model, "hlpt(r=2,tokens=2)")
    _randomize_adapters(model)
    ids = tiny_batch(128, batch=2, seq=5)
    with torch.no_grad():
        want = model(ids).logits
    export_merged(applied, tmp_path)
    reloaded = load_export(tmp_path).eval()  # the gated experts' LoRA comes back from the sidecar
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_h2lpt_takes_the_same_gate_and_target_options():
    plan = LayerPlan.parse("h2lpt(r=2,tokens=2,gated=false,lora_target=attn)")
    layers = plan.resolve(8).layers
    assert [s.name for s in layers] == ["lora"] * 2 + ["freeze"] * 4 + ["prefix"] * 2
    assert layers[0].options.target == "attn" and not layers[0].options.gated
    assert not layers[7].options.gated and layers[7].options.form == "paper"
    with pytest.raises(ConfigError, match="lora_target: must be one of mlp, attn, down, all"):
        LayerPlan.parse("h2lpt(lora_target=ffn)")
