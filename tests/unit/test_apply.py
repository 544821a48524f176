"""apply_plan / AppliedPlan on every tiny family: identity at init, training semantics, exact
accounting, optimizer groups, state round trips, schedules, merge, gradient checkpointing."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from layerfreeze.apply import apply_plan, enable_gradient_checkpointing
from layerfreeze.errors import ConfigError
from layerfreeze.plan import LayerPlan
from tests.helpers.tiny_models import (
    TINY_FAMILIES,
    build_tiny_model,
    hand_lora_params,
    hand_param_counts,
    hand_prefix_params,
    tiny_batch,
)

PRESETS = ["full", "freeze_deep", "freeze_shallow", "hlpt", "h2lpt", "hlpt_branch", "h2lpt_branch",
           "h2lpt_3to1", "lora_all"]
#: The base model exactly at init: hlpt / h2lpt / h2lpt_3to1 put the prefix in the paper form,
#: which shifts attention from step 0 (tests/unit/test_hlpt_presets.py measures by how much).
IDENTITY_PRESETS = [p for p in PRESETS if p not in ("hlpt", "h2lpt", "h2lpt_3to1")]
SMALL = {p: {"r": 4, "tokens": 4} for p in PRESETS if "lpt" in p} | {"lora_all": {"r": 4}}
MIXED = "0:full(lr_scale=0.5),1:lora(r=2,gated),2:prefix(tokens=3,gated),3:freeze,embeddings:full"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _plan(name):
    return LayerPlan.parse(name) if ":" in name else LayerPlan.from_preset(name, **SMALL.get(name, {}))


def _loss(model, ids):
    return model(ids, labels=ids).loss


# ----------------------------------------------------------------------------- identity at init

@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("plan", [*IDENTITY_PRESETS, MIXED])
def test_identity_at_init(family, plan):
    for impl in ("eager", "sdpa"):
        model = build_tiny_model(family, num_layers=8 if "h2lpt" in plan else 4, attn_implementation=impl)
        ids = tiny_batch(model)
        with torch.no_grad():
            before = model(ids).logits
        apply_plan(model, _plan(plan))
        with torch.no_grad():
            after = model(ids).logits
        assert torch.equal(before, after), (family, plan, impl)


# ----------------------------------------------------------------------------- training semantics

@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("plan", [*PRESETS, MIXED])
def test_adamw_steps_touch_exactly_the_trainable_set(family, plan):
    torch.manual_seed(0)
    model = build_tiny_model(family, num_layers=8 if "h2lpt" in plan else 4)
    model.train()
    applied = apply_plan(model, _plan(plan))
    trainable = set(applied.trainable_names())
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if n not in trainable}
    opt = torch.optim.AdamW(applied.param_groups(lr=1e-2, weight_decay=0.1))
    got_grad = dict.fromkeys(trainable, False)
    ids = tiny_batch(model, batch=2, seq=8)
    for _step in range(2):
        opt.zero_grad(set_to_none=True)
        _loss(model, ids).backward()
        for n, p in model.named_parameters():
            if n in trainable:
                if p.grad is not None and p.grad.abs().sum() > 0:
                    got_grad[n] = True
            else:
                assert p.grad is None, f"gradient reached frozen {n}"
        opt.step()
    # Zero-initialised paths (LoRA B, prefix factor) make the rest of their adapter receive
    # gradient from the second step on.
    assert all(got_grad.values()), [n for n, ok in got_grad.items() if not ok]
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), f"frozen {n} changed"


# ----------------------------------------------------------------------------- accounting

def _expected_layer(family, cfg, spec):
    if spec.name == "full":
        return hand_param_counts(family, cfg)["layer"]
    if spec.name == "lora":
        o = spec.options
        return hand_lora_params(family, cfg, o.r, o.target, o.gated)
    if spec.name == "prefix":
        return hand_prefix_params(cfg, spec.options.tokens, spec.options.gated, spec.options.form)
    return 0


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("plan", [*PRESETS, MIXED])
def test_parameter_counts_match_hand_computation(family, plan):
    n_layers = 8
    model = build_tiny_model(family, num_layers=n_layers)
    cfg = model.config
    hand = hand_param_counts(family, cfg)
    base_total = n_layers * hand["layer"] + hand["embeddings"] + hand["final_norm"] + hand["lm_head"]
    assert sum(p.numel() for p in model.parameters()) == base_total
    applied = apply_plan(model, _plan(plan))
    resolved = applied.resolved
    summary = applied.summary()
    rows = summary.to_dict()
    expected_trainable = 0
    adapters = 0
    for i, spec in enumerate(resolved.layers):
        t = _expected_layer(family, cfg, spec)
        extra = t if spec.name in ("lora", "prefix") else 0
        row = rows["layers"][i]
        assert row["index"] == i and row["policy"] == spec.describe()
        assert row["trainable_params"] == t
        assert row["total_params"] == hand["layer"] + extra
        assert row["optimizer_state_bytes"] == 8 * t
        expected_trainable += t
        adapters += extra
    tied = cfg.tie_word_embeddings
    for part in ("embeddings", "final_norm", "lm_head"):
        spec = resolved.non_layer(part)
        owner = resolved.embeddings if (part == "lm_head" and tied) else spec
        t = hand[part] if owner.name == "full" else 0
        if part == "lm_head" and tied:
            t = 0
        assert rows[part]["total_params"] == hand[part]
        assert rows[part]["trainable_params"] == t
        expected_trainable += t
    assert summary.trainable_params == applied.num_trainable_params() == expected_trainable
    assert summary.total_params == applied.num_total_params() == base_total + adapters
    assert rows["num_layers"] == n_layers
    table = summary.table()
    assert table.splitlines()[0].split()[:2] == ["layer", "policy"] and "total" in table.splitlines()[-1]
    assert summary.to_dict()["trainable_params"] == expected_trainable
    assert applied.summary(master_weights=True).rows[0]["optimizer_state_bytes"] == 12 * rows["layers"][0]["trainable_params"]


def test_tied_head_follows_embeddings_and_warns():
    model = build_tiny_model("gpt2")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("layerfreeze.apply")
    log.addHandler(handler)
    try:
        applied = apply_plan(model, "freeze_deep")
    finally:
        log.removeHandler(handler)
    assert model.transformer.wte.weight.requires_grad and model.lm_head.weight is model.transformer.wte.weight
    row = applied.summary().to_dict()["lm_head"]
    assert row["policy"] == "tied to embeddings (full)" and row["total_params"] == 0
    assert any("tied" in r.getMessage() for r in records)


# ----------------------------------------------------------------------------- optimizer groups

def test_param_groups_scales_and_no_decay():
    model = build_tiny_model("llama")
    applied = apply_plan(model, "0:full(lr_scale=0.5,weight_decay=0.01),1:lora(r=2,gated,gate_lr_scale=10.0),"
                                "2:prefix(tokens=2,gated),embeddings:full")
    groups = applied.param_groups(lr=1e-3, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(applied.trainable_names()) and len(seen) == len(set(seen))
    by_name = {names[id(p)]: g for g in groups for p in g["params"]}
    g = by_name["model.layers.0.mlp.gate_proj.weight"]  # a base weight named "gate": decayed
    assert (g["lr"], g["weight_decay"], g["lr_scale"]) == (pytest.approx(5e-4), 0.01, 0.5)
    assert by_name["model.layers.0.input_layernorm.weight"]["weight_decay"] == 0.0
    assert by_name["model.embed_tokens.weight"]["weight_decay"] == 0.1
    lora_a = by_name["model.layers.1.mlp.up_proj.lora_adapter.lora_a"]
    assert (lora_a["lr"], lora_a["weight_decay"]) == (pytest.approx(1e-3), 0.1)
    gate = by_name["model.layers.1.mlp.lora_gate.weight"]
    assert (gate["lr"], gate["weight_decay"]) == (pytest.approx(1e-2), 0.0)
    assert by_name["model.layers.2.self_attn.prefix_adapter.prefix_gating_factor"]["weight_decay"] == 0.0
    assert by_name["model.layers.2.self_attn.prefix_adapter.prefix_key"]["weight_decay"] == 0.1
    again = applied.param_groups(lr=1e-3, weight_decay=0.1)
    assert [g["name"] for g in again] == [g["name"] for g in groups]
    assert [[names[id(p)] for p in g["params"]] for g in again] == [[names[id(p)] for p in g["params"]] for g in groups]
    for g in groups:
        assert set(g) >= {"params", "lr", "weight_decay", "name", "lr_scale"}


def test_gpt2_biases_not_decayed():
    model = build_tiny_model("gpt2")
    applied = apply_plan(model, "full")
    names = {id(p): n for n, p in model.named_parameters()}
    for g in applied.param_groups(lr=1.0, weight_decay=0.1):
        for p in g["params"]:
            n = names[id(p)]
            if n.endswith(".bias") or ".ln_" in n:
                assert g["weight_decay"] == 0.0, n
            if n.endswith("c_fc.weight"):
                assert g["weight_decay"] == 0.1


def test_layer_groups():
    model = build_tiny_model("qwen2")
    applied = apply_plan(model, "0-1:full,3:lora(r=2,target=attn),final_norm:full")
    groups = applied.layer_groups()
    assert set(groups) == {"layers.0", "layers.1", "layers.2", "layers.3", "embeddings", "final_norm", "lm_head"}
    assert groups["layers.2"] == [] and groups["embeddings"] == [] and groups["final_norm"] == ["model.norm.weight"]
    assert all(n.startswith("model.layers.0.") for n in groups["layers.0"]) and len(groups["layers.0"]) == 12
    assert sorted(n for g in groups.values() for n in g) == sorted(applied.trainable_names())


# ----------------------------------------------------------------------------- state, schedule

@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_trainable_state_dict_round_trip(family):
    model = build_tiny_model(family)
    applied = apply_plan(model, MIXED)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    ids = tiny_batch(model)
    sd = applied.trainable_state_dict()
    assert set(applied.trainable_names()) <= set(sd)
    fresh = build_tiny_model(family)
    applied2 = apply_plan(fresh, MIXED)
    applied2.load_trainable_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="unknown parameter names"):
        applied2.load_trainable_state_dict({"nope": torch.zeros(1)})
    bad = dict(sd)
    key = next(k for k in sd if "lora_a" in k)
    bad[key] = torch.zeros(1)
    with pytest.raises(ValueError, match="does not match"):
        applied2.load_trainable_state_dict(bad)
    bad.pop(key)
    with pytest.raises(ValueError, match="missing adapter parameters"):
        applied2.load_trainable_state_dict(bad)


def test_schedule_installs_every_phase_and_switches():
    model = build_tiny_model("llama")
    ids = tiny_batch(model)
    with torch.no_grad():
        ref = model(ids).logits
    phases = ["0-1:lora(r=2,gated),2-3:prefix(tokens=2)", "full", "0-1:full,2-3:lora(r=2)"]
    applied = apply_plan(model, phases[0], install=phases[1:])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)  # installing later phases keeps identity
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert any(n.startswith("model.layers.3.") for n in lora_names)  # phase 3's LoRA exists now
    assert not any(model.get_parameter(n).requires_grad for n in lora_names if n.startswith("model.layers.3."))
    applied.switch_plan(phases[1])
    trainable = set(applied.trainable_names())
    assert all("lora_" not in n and "prefix_" not in n for n in trainable)
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.layers.2.self_attn.q_proj.weight" in trainable and "model.embed_tokens.weight" in trainable
    applied.switch_plan(phases[2])
    assert applied.model.get_parameter("model.layers.3.mlp.up_proj.lora_adapter.lora_b").requires_grad
    assert not model.get_parameter("model.layers.3.mlp.up_proj.weight").requires_grad
    with pytest.raises(ConfigError, match=r"layer 0 \(model.layers.0\) uses prefix\(tokens=5\)"):
        applied.switch_plan("0:prefix(tokens=5)")


# ----------------------------------------------------------------------------- validation

def test_policy_check_failures_are_collected_before_installing():
    model = build_tiny_model("gpt2", reorder_and_upcast_attn=True)
    with pytest.raises(ConfigError) as e:
        apply_plan(model, "0:lora(target=[no_such]),1:prefix(tokens=2),9:full")
    probs = e.value.problems
    assert any("out of range" in p for p in probs)
    model = build_tiny_model("gpt2", reorder_and_upcast_attn=True)
    with pytest.raises(ConfigError) as e:
        apply_plan(model, "0:lora(target=[no_such]),1:prefix(tokens=2)", install=["2:lora(r=3,target=[q])"])
    joined = "\n".join(e.value.problems)
    assert "plan: lora(target=[no_such]): layer 0 (transformer.h.0): lora target 'no_such'" in joined
    assert "plan: prefix(tokens=2): layer 1 (transformer.h.1" in joined and "reorder_and_upcast_attn" in joined
    assert "install[0]: lora(r=3,target=[q]): layer 2" in joined
    assert not [n for n, _ in model.named_parameters() if "lora_" in n or "prefix_" in n]


# ----------------------------------------------------------------------------- merge

@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_merge_unmerge(family):
    model = build_tiny_model(family)
    applied = apply_plan(model, "0-1:lora(r=2),2:lora(r=2,gated),3:prefix(tokens=2)")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ids = tiny_batch(model)
    with torch.no_grad():
        ref = model(ids).logits
        merged = applied.merge()
        assert merged and all(".layers.0." in m or ".h.0." in m or ".layers.1." in m or ".h.1." in m for m in merged)
        assert torch.allclose(model(ids).logits, ref, atol=1e-5)
        assert applied.merge() == []  # idempotent
        assert applied.unmerge()
        assert torch.allclose(model(ids).logits, ref, atol=1e-5)


# ----------------------------------------------------------------------------- checkpointing

class _Counter:
    """Counts forward runs of submodules (instance-level ``forward`` wrappers: torch's
    checkpoint recompute does not fire module hooks, but it does call ``forward``)."""

    def __init__(self, model, names):
        self.counts = dict.fromkeys(names, 0)
        for n in names:
            mod = model.get_submodule(n)
            mod.forward = self._wrap(n, mod.forward)

    def _wrap(self, name, fn):
        def forward(*args, **kwargs):
            self.counts[name] += 1
            return fn(*args, **kwargs)
        return forward


def _grads(model, ids):
    torch.manual_seed(3)
    model.zero_grad(set_to_none=True)
    _loss(model, ids).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("plan", ["freeze_deep", MIXED])
def test_gradient_checkpointing_matches_and_recomputes_frozen_layers(family, plan):
    model = build_tiny_model(family, num_layers=4)
    model.train()
    applied = apply_plan(model, _plan(plan))
    ckpt = copy.deepcopy(model)
    enable_gradient_checkpointing(ckpt)
    ids = tiny_batch(model)
    g_ref, g_ckpt = _grads(model, ids), _grads(ckpt, ids)
    assert set(g_ref) == set(g_ckpt) == set(applied.trainable_names())
    for n in g_ref:
        assert torch.allclose(g_ref[n], g_ckpt[n], atol=1e-6, rtol=1e-5), n
    # Every block is recomputed in backward, the frozen deep blocks (gradients pass through
    # them to the trained bottom) included: forward runs twice.
    mlps = [f"{x.name}.{x.mlp_name}" for x in applied.layout.layers]
    counter = _Counter(ckpt, mlps)
    _grads(ckpt, ids)
    assert list(counter.counts.values()) == [2, 2, 2, 2], counter.counts


def test_checkpointing_with_frozen_embeddings_and_no_needless_backward():
    # freeze_shallow: embeddings and bottom layers frozen. No "element 0 of tensors does not
    # require grad", and the frozen bottom is not recomputed: nothing below it needs gradient.
    model = build_tiny_model("llama")
    model.train()
    applied = apply_plan(model, "freeze_shallow")
    enable_gradient_checkpointing(model)
    mlps = [f"{x.name}.{x.mlp_name}" for x in applied.layout.layers]
    counter = _Counter(model, mlps)
    grads = _grads(model, tiny_batch(model))
    assert set(grads) == set(applied.trainable_names())
    assert list(counter.counts.values()) == [1, 1, 2, 2]
    model.eval()
    with torch.no_grad():
        model(tiny_batch(model))  # eval forward untouched


def test_checkpointing_goes_through_transformers_public_api():
    # transformers' public activation_checkpointing_enable (no deprecation warning, no private
    # hook), non-reentrant; the input-grad hook it installs is removed (not needed without
    # reentrant checkpointing), but one the user installed before is kept.
    import warnings

    model = build_tiny_model("llama")
    model.train()
    applied = apply_plan(model, "freeze_shallow")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        enable_gradient_checkpointing(model)
    assert model.is_gradient_checkpointing
    for x in applied.layout.layers:
        assert x.module.gradient_checkpointing is True
        assert not getattr(x.module, "_layerfreeze_checkpointed", False)
        assert x.module._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    seen = []
    h = model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    _grads(model, tiny_batch(model))
    assert seen == [False]  # embeddings frozen: no gradient forced through the frozen bottom

    user = build_tiny_model("llama")
    user.train()
    apply_plan(user, "freeze_shallow")
    user.enable_input_require_grads()
    enable_gradient_checkpointing(user)
    seen.clear()
    h.remove()
    user.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    user(tiny_batch(user))
    assert seen == [True]


def test_checkpointing_fallback_wraps_blocks():
    model = build_tiny_model("gpt_neox")
    model.train()
    applied = apply_plan(model, "0:lora(r=2),1-3:prefix(tokens=2,gated)")
    ref = copy.deepcopy(model)
    model.supports_gradient_checkpointing = False  # as for a model without transformers' mechanism
    enable_gradient_checkpointing(model)
    assert all(getattr(x.module, "_layerfreeze_checkpointed", False) for x in applied.layout.layers)
    ids = tiny_batch(model)
    g_ref, g = _grads(ref, ids), _grads(model, ids)
    for n in g_ref:
        assert torch.allclose(g_ref[n], g[n], atol=1e-6, rtol=1e-5), n
    counter = _Counter(model, [f"{x.name}.{x.mlp_name}" for x in applied.layout.layers])
    _grads(model, ids)
    assert list(counter.counts.values()) == [2, 2, 2, 2]


def test_adapters_follow_base_dtype():
    model = build_tiny_model("llama").to(torch.bfloat16)
    apply_plan(model, "0:lora(r=2,gated),1:prefix(tokens=2,gated)")
    a = model.model.layers[0].mlp.up_proj.lora_adapter.lora_a
    assert a.dtype == torch.bfloat16 and model.model.layers[0].mlp.lora_gate.weight.dtype == torch.float32
    assert isinstance(model.model.layers[1].self_attn.prefix_adapter, nn.Module)


def test_trainable_names_for_does_not_switch():
    model = build_tiny_model("llama")
    applied = apply_plan(model, "0:lora(r=2)", install=["0-1:full"])
    before = applied.trainable_names()
    names = applied.trainable_names_for("0-1:full")
    assert applied.trainable_names() == before and all("lora_" in n for n in before)
    assert names and all(n.startswith(("model.layers.0.", "model.layers.1.")) and "lora_" not in n for n in names)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == before
    with pytest.raises(ConfigError, match="were not installed"):
        applied.trainable_names_for("2:lora(r=2)")


# Families beyond the five core ones, configured as a new user would (defaults + tiny sizes).
OTHER_FAMILIES = [
    ("gemma", dict(num_key_value_heads=1, head_dim=16)),
    ("phi", {}),
    ("falcon", {}),
    ("bloom", dict(n_layer=4, n_head=4)),
    ("mixtral", dict(num_key_value_heads=2, num_local_experts=2)),
    ("qwen3", dict(num_key_value_heads=2, head_dim=16)),
    ("gpt_bigcode", dict(n_embd=64, n_layer=4, n_head=4)),
]


@pytest.mark.parametrize("model_type,kw", OTHER_FAMILIES, ids=[f[0] for f in OTHER_FAMILIES])
def test_other_families_train_or_fail_clearly(model_type, kw):
    from transformers import AutoConfig, AutoModelForCausalLM

    base = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                vocab_size=128, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    cfg = AutoConfig.for_model(model_type, **{**base, **kw})
    ids = tiny_batch(128, seq=6)
    for plan in ("freeze_deep", "lora_all(r=2)", "hlpt_branch(r=2,tokens=2)"):  # identity at init
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
        with torch.no_grad():
            ref = model(ids).logits
        try:
            applied = apply_plan(model, plan)
        except ConfigError as e:
            # Only adapter policies may be refused, each problem naming the layer and a fix.
            assert plan.startswith("hlpt"), (model_type, plan, e)
            assert all(" layer " in p or ": layer " in p for p in e.problems)
            assert not [n for n, _ in model.named_parameters() if "lora_" in n or "prefix_" in n]
            continue
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref), (model_type, plan)
        model.train()
        model(ids, labels=ids).loss.backward()
        grads = [n for n, p in model.named_parameters() if p.grad is not None]
        assert set(grads) == set(applied.trainable_names()) and grads


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_h2lpt_trains_half_of_hlpt(family):
    # h2lpt_3to1 (HLPT's 3:1 split on half the layers), 8 | N: half the LoRA and prefix layers.
    # h2lpt (the paper's quarters), N = 8: 2 LoRA + 2 prefix layers, each as one layer alone.
    def count(plan):
        return apply_plan(build_tiny_model(family, num_layers=8), plan).num_trainable_params()

    counts = {p: count(LayerPlan.from_preset(p, r=4, tokens=4)) for p in ("hlpt", "h2lpt_3to1", "h2lpt")}
    assert counts["h2lpt_3to1"] * 2 == counts["hlpt"] > 0
    lora, prefix = count("0:lora(r=4,target=mlp,gated)"), count("0:prefix(tokens=4,gated,form=paper)")
    assert counts["h2lpt"] == 2 * lora + 2 * prefix
    assert counts["hlpt"] == 6 * lora + 2 * prefix
