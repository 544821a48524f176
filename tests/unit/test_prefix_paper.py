"""``prefix(form=paper)`` (HLPT's gated virtual tokens in the layer's own softmax) and the default
``form=branch``, both against the attention maths written out here (tiny Llama, eager and sdpa),
with the KV cache, and the paper form's options and checks (CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from layerfreeze import apply_plan
from layerfreeze.errors import ConfigError
from layerfreeze.models import discover_layout
from layerfreeze.policies.base import PolicySpec
from layerfreeze.policies.prefix import PrefixConfig
from layerfreeze.registry import get_policy
from layerfreeze.utils.schema import from_dict
from tests.helpers.tiny_models import build_tiny_model, tiny_batch

torch.set_num_threads(1)

H, KV, D, HIDDEN = 4, 2, 16, 64  # tiny Llama geometry (build_tiny_model defaults)


def randomize(model, seed=5, gate_scale=0.3, factor=1.0):
    """Trained-looking prefix: random keys/values, a random gate, a non-zero branch factor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".prefix_" not in n:
                continue
            noise = torch.randn(p.shape, generator=g)
            if n.endswith("prefix_gating_factor"):
                p.copy_(factor * (0.5 + noise.abs()))
            elif ".prefix_gate." in n:
                p.copy_(gate_scale * noise)
            else:
                p.copy_(noise)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def softmax(x):
    e = torch.exp(x - x.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def reference_attention(attn, adapter, h, cos, sin, form, gated, past=None):
    """The layer's attention output written out from its weights.

    ``past``: (keys, values) of earlier tokens, rotary applied, ``(B, KV, S_past, D)``; the new
    tokens sit after them (causal over the whole sequence). The prefix has no position.
    """
    B, T, _ = h.shape
    q = (h @ attn.q_proj.weight.t()).view(B, T, H, D).transpose(1, 2)
    k = (h @ attn.k_proj.weight.t()).view(B, T, KV, D).transpose(1, 2)
    v = (h @ attn.v_proj.weight.t()).view(B, T, KV, D).transpose(1, 2)
    q = q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)
    k = k * cos.unsqueeze(1) + rotate_half(k) * sin.unsqueeze(1)
    if past is not None:
        k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
    S = k.shape[2]
    causal = torch.arange(S).unsqueeze(0) <= (torch.arange(T).unsqueeze(1) + S - T)  # (T, S)
    g = torch.sigmoid(h @ adapter.prefix_gate.weight + adapter.prefix_gate.bias) if gated else None
    heads = []
    for i in range(H):
        j = i // (H // KV)
        real = (q[:, i] @ k[:, j].transpose(-1, -2)) / math.sqrt(D)  # (B, T, S)
        real = real.masked_fill(~causal, float("-inf"))
        pre = (q[:, i] @ adapter.prefix_key[j].t()) / math.sqrt(D)  # (B, T, P)
        if form == "paper":
            # One softmax over [prefix | real]; the gate multiplies the prefix's exp-weights.
            w_pre = torch.exp(pre) * (g.unsqueeze(-1) if gated else 1.0)
            w_real = torch.exp(real)
            z = w_pre.sum(-1, keepdim=True) + w_real.sum(-1, keepdim=True)
            out = (w_pre @ adapter.prefix_value[j] + w_real @ v[:, j]) / z
        else:
            base = softmax(real) @ v[:, j]
            scale = adapter.prefix_gating_factor[i] * (g.unsqueeze(-1) if gated else 1.0)
            out = base + scale * (softmax(pre) @ adapter.prefix_value[j])
        heads.append(out)
    return torch.stack(heads, 2).reshape(B, T, H * D) @ attn.o_proj.weight.t()


def causal_mask(impl, B, T, S):
    """The mask the model would pass: additive float for eager, bool (True = keep) for sdpa."""
    allowed = (torch.arange(S).unsqueeze(0) <= torch.arange(T).unsqueeze(1) + S - T).expand(
        B, 1, T, S
    )
    if impl == "sdpa":
        return allowed
    return torch.zeros(B, 1, T, S).masked_fill(~allowed, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("form", ["paper", "branch"])
@pytest.mark.parametrize(
    "impl, mask_kind", [("eager", "explicit"), ("sdpa", "explicit"), ("sdpa", "none")]
)  # sdpa without mask: is_causal
@pytest.mark.parametrize("gated", [False, True])
def test_both_forms_match_the_written_out_attention(form, impl, gated, mask_kind):
    model = build_tiny_model("llama", num_layers=2, attn_implementation=impl)
    apply_plan(model, f"1:prefix(tokens=3,form={form}{',gated' if gated else ''})")
    randomize(model)
    attn = model.model.layers[1].self_attn
    B, T = 2, 5
    h = torch.randn(B, T, HIDDEN, generator=torch.Generator().manual_seed(11))
    cos, sin = model.model.rotary_emb(h, torch.arange(T).unsqueeze(0).expand(B, T))
    mask = causal_mask(impl, B, T, T) if mask_kind == "explicit" else None
    with torch.no_grad():
        got = attn(hidden_states=h, position_embeddings=(cos, sin), attention_mask=mask)[0]
        want = reference_attention(attn, attn.prefix_adapter, h, cos, sin, form, gated)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_paper_form_decoding_step_with_cache_matches_the_formula(impl):
    """One cached decoding step: the prefix is prepended to cached + new keys, not cached."""
    from transformers import DynamicCache

    model = build_tiny_model("llama", num_layers=2, attn_implementation=impl)
    apply_plan(model, "0-1:prefix(tokens=3,form=paper,gated)")
    randomize(model)
    ids = tiny_batch(model, batch=2, seq=6)
    layer = model.model.layers[1]
    seen = {}
    hook = layer.self_attn.register_forward_hook(
        lambda m, a, kw, out: seen.update(
            h=kw["hidden_states"], pe=kw["position_embeddings"], out=out[0]
        ),
        with_kwargs=True,
    )
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :5], past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == 5  # real tokens only: the prefix never enters the cache
        past = (cache.layers[1].keys.clone(), cache.layers[1].values.clone())
        model(ids[:, 5:], past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == 6
        cos, sin = seen["pe"]
        want = reference_attention(
            layer.self_attn,
            layer.self_attn.prefix_adapter,
            seen["h"],
            cos,
            sin,
            "paper",
            True,
            past=past,
        )
    hook.remove()
    torch.testing.assert_close(seen["out"], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_paper_form_generation_with_and_without_cache(family, impl):
    model = build_tiny_model(family, num_layers=3, attn_implementation=impl)
    apply_plan(model, "1-2:prefix(tokens=4,form=paper,gated)")
    randomize(model, gate_scale=1.0)
    prompt = tiny_batch(model, batch=2, seq=5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kw)
        full = model.generate(prompt, use_cache=False, **kw)
        stepwise = torch.stack(
            model.generate(
                prompt, use_cache=True, output_scores=True, return_dict_in_generate=True, **kw
            ).scores,
            1,
        )
        one_pass = model(cached).logits[:, prompt.shape[1] - 1 : -1]
    assert torch.equal(cached, full)
    torch.testing.assert_close(stepwise, one_pass, rtol=1e-4, atol=1e-4)


def test_paper_form_eager_and_sdpa_agree_on_a_padded_batch():
    """Left padding: eager's float mask and sdpa's bool mask extend to the same attention."""
    outs = []
    ids = tiny_batch(128, batch=2, seq=7)
    pad = torch.ones(2, 7, dtype=torch.long)
    pad[0, :3] = 0
    for impl in ("eager", "sdpa"):
        model = build_tiny_model("llama", num_layers=2, attn_implementation=impl)
        apply_plan(model, "0-1:prefix(tokens=3,form=paper,gated)")
        randomize(model)
        with torch.no_grad():
            outs.append(model(ids, attention_mask=pad).logits)
    torch.testing.assert_close(outs[0][0, 3:], outs[1][0, 3:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Initialisation: not the identity unless the gate starts closed


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_identity_only_with_a_closed_gate(family, impl):
    def run(plan):
        model = build_tiny_model(family, num_layers=3, attn_implementation=impl)
        ids = tiny_batch(model)
        with torch.no_grad():
            base = model(ids).logits
            if plan:
                apply_plan(model, plan)
            return base, model(ids).logits

    base, closed = run("1-2:prefix(tokens=4,form=paper,gated,gate_bias=-30)")
    torch.testing.assert_close(closed, base, rtol=0, atol=1e-6)
    _, half_open = run("1-2:prefix(tokens=4,form=paper,gated)")  # g = 0.5 at init
    assert (half_open - base).abs().max() > 1e-2
    _, ungated = run("1-2:prefix(tokens=4,form=paper)")  # plain prefix tuning
    assert (ungated - base).abs().max() > 1e-2
    _, branch = run("1-2:prefix(tokens=4,gated)")  # the default form: zero factor, exact
    assert torch.equal(branch, base)


def test_closed_gate_prefix_mass_within_the_documented_bound():
    """Prefix attention mass m <= g P exp(max prefix logit - max real logit), per query and head."""
    model = build_tiny_model("llama", num_layers=2)
    apply_plan(model, "1:prefix(tokens=3,form=paper,gated,gate_bias=-8)")
    randomize(model, gate_scale=0.0)  # w = 0 keeps g = sigmoid(-8) for every token
    attn = model.model.layers[1].self_attn
    adapter = attn.prefix_adapter
    with torch.no_grad():
        adapter.prefix_gate.bias.fill_(-8.0)
    B, T, P = 2, 5, 3
    h = torch.randn(B, T, HIDDEN, generator=torch.Generator().manual_seed(2))
    cos, sin = model.model.rotary_emb(h, torch.arange(T).unsqueeze(0).expand(B, T))
    with torch.no_grad():
        _, weights = attn(
            hidden_states=h,
            position_embeddings=(cos, sin),
            attention_mask=causal_mask("eager", B, T, T),
        )
        q = (h @ attn.q_proj.weight.t()).view(B, T, H, D).transpose(1, 2)
        k = (h @ attn.k_proj.weight.t()).view(B, T, KV, D).transpose(1, 2)
        q = q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)
        k = k * cos.unsqueeze(1) + rotate_half(k) * sin.unsqueeze(1)
        kr = k.repeat_interleave(H // KV, 1)
        pk = adapter.prefix_key.repeat_interleave(H // KV, 0)
        real = (q @ kr.transpose(-1, -2) / math.sqrt(D)).masked_fill(
            ~(torch.arange(T).unsqueeze(0) <= torch.arange(T).unsqueeze(1)), float("-inf")
        )
        pre = torch.einsum("bhtd,hpd->bhtp", q, pk) / math.sqrt(D)
    g = 1 / (1 + math.exp(8.0))
    mass = weights[..., :P].sum(-1)  # eager returns the prefix columns first
    bound = g * P * torch.exp(pre.amax(-1) - real.amax(-1))
    assert weights.shape == (B, H, T, P + T)
    assert (mass > 0).all() and (mass <= bound * (1 + 1e-4)).all()
    assert mass.max() < 1e-2


# ------------------------------------------------------------------------------------------------
# Training, options, checks


def test_paper_form_trains_prefix_and_gate_from_the_first_step():
    model = build_tiny_model("llama", num_layers=2)
    applied = apply_plan(model, "1:prefix(tokens=4,form=paper,gated)")
    names = applied.trainable_names()
    assert names == [
        "model.layers.1.self_attn.prefix_adapter.prefix_key",
        "model.layers.1.self_attn.prefix_adapter.prefix_value",
        "model.layers.1.self_attn.prefix_adapter.prefix_gate.weight",
        "model.layers.1.self_attn.prefix_adapter.prefix_gate.bias",
    ]  # no zero-initialised factor in the paper form
    n_params = applied.summary().rows[1]["trainable_params"]
    assert n_params == 2 * KV * 4 * D + HIDDEN + 1
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in names}
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(applied.param_groups(lr=1e-2, weight_decay=0.0))
    ids = tiny_batch(model)
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(params[n].grad is not None and params[n].grad.abs().sum() > 0 for n in names)
    opt.step()
    assert all(torch.equal(params[n], t) for n, t in frozen.items())


def test_options_and_describe():
    cfg = from_dict(PrefixConfig, {"tokens": 4, "form": "paper", "gate_bias": -30})
    assert (cfg.form, cfg.gate_bias) == ("paper", -30)
    spec = PolicySpec("prefix", cfg)
    assert spec.describe() == "prefix(tokens=4,form=paper,gate_bias=-30.0)"
    assert PrefixConfig().form == "branch" and PrefixConfig().gate_bias == 0.0
    with pytest.raises(ConfigError, match="form: must be branch or paper, got 'softmax'"):
        PrefixConfig(form="softmax")
    with pytest.raises(ConfigError, match="gate_bias: must be a number, got 'closed'"):
        PrefixConfig(gate_bias="closed")


def test_gate_bias_sets_the_initial_gate_in_both_forms():
    model = build_tiny_model("llama", num_layers=2)
    apply_plan(model, "0:prefix(gated,gate_bias=-3),1:prefix(gated,form=paper,gate_bias=-5)")
    assert model.model.layers[0].self_attn.prefix_adapter.prefix_gate.bias.item() == -3
    assert model.model.layers[1].self_attn.prefix_adapter.prefix_gate.bias.item() == -5
    assert model.model.layers[1].self_attn.prefix_adapter.prefix_gating_factor is None


def test_paper_form_refuses_flash_attention_and_mixed_forms():
    model = build_tiny_model("llama", num_layers=2, attn_implementation="sdpa")
    layout = discover_layout(model)
    policy = get_policy("prefix")
    spec = PolicySpec("prefix", PrefixConfig(form="paper"))
    model.config._attn_implementation_internal = "flash_attention_2"
    (p,) = policy.check(layout.layers[0], spec, layout)
    assert p.startswith(
        "layer 0 (model.layers.0.self_attn, LlamaAttention): prefix(form=paper) "
        "needs attn_implementation eager or sdpa"
    )
    assert "got 'flash_attention_2'" in p
    assert policy.check(layout.layers[0], PolicySpec("prefix", PrefixConfig()), layout) == []
    model.config._attn_implementation_internal = "sdpa"
    apply_plan(model, "0:prefix(form=paper)")
    with pytest.raises(
        ConfigError,
        match="already carries a prefix adapter of form=paper, this plan asks for form=branch",
    ):
        apply_plan(model, "0:prefix")
    apply_plan(model, "0:prefix(form=paper)")  # the same form again is fine


@pytest.mark.parametrize("reentrant", [False, True])
def test_paper_form_gradient_checkpointing_gives_same_grads(reentrant):
    def grads(checkpointing):
        model = build_tiny_model("llama", num_layers=3)
        applied = apply_plan(
            model, "0:prefix(tokens=4,form=paper,gated,reparam=8),2:prefix(form=paper)"
        )
        randomize(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
            if reentrant:
                model.enable_input_require_grads()
        ids = tiny_batch(model)
        model(ids, labels=ids).loss.backward()
        params = dict(model.named_parameters())
        return {n: params[n].grad for n in applied.trainable_names()}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and any("prefix_mlp" in n for n in plain)
    for n in plain:
        assert plain[n].abs().sum() > 0, n
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7)
