"""The paper form of the ``prefix`` policy (``prefix(form=paper)``): HLPT's gated virtual tokens.

``form=paper`` prepends the layer's learned prefix keys ``P_k`` / values ``P_v`` to the keys and
values of the layer's own attention, so one softmax runs over prefix and real tokens (prefix
tuning, Li & Liang 2021, per layer as in P-Tuning v2), and the HLPT gate ``g = sigmoid(w . h +
b)`` (one value per query token, ``h`` = the attention input) multiplies the prefix's
*unnormalised* attention weights. For query ``t`` of head ``i`` (key/value head ``i // groups``
under grouped-query attention, ``s`` the module's softmax scale, ``M`` the model's own additive
mask: causal, padding, sliding window)::

    logits_t = [ q_t . P_k^T * s + log g_t   |   q_t . K^T * s + M_t ]        (P + S columns)
    out_t    = softmax(logits_t) @ [ P_v ; V ]

i.e. prefix column ``p`` gets weight ``g_t exp(q_t . P_k[p] s) / Z_t`` with ``Z_t`` the sum over
all ``P + S`` columns. ``g -> 0`` gives back the base attention exactly, ``g = 1`` is plain
(ungated) prefix tuning; without ``gated`` the ``log g`` term is absent (``g = 1``). The gate thus
scales how much attention mass the prefix takes from the real tokens, query by query (the
balance between prefix and input tokens that adaptive prefix tuning's gate controls). The stored
descriptions of the HLPT paper (Gu et al., EMNLP 2024) say the prefix is "enhanced ... with a
learnable adaptive mechanism" without a formula we could read, so the placement of the gate is
our reading. That is ``gate_at=logit`` (the default: the one placement for which a closed gate is
the identity); ``gate_at=value`` is the other reading, the gate scaling the prefix's value
vectors inside the same softmax::

    out_t    = softmax([ q_t . P_k^T * s | q_t . K^T * s + M_t ]) @ [ g_t P_v ; V ]

(the prefix keeps its attention mass whatever ``g``; a closed gate leaves the real tokens'
weights shrunk by that mass, so no gate value gives the base layer back).

No zero-initialised factor: at initialisation the layer is **not** the base layer unless the
gate starts closed. ``gate_bias`` sets the gate's initial bias ``b`` (``w = 0``), so ``g =
sigmoid(b)`` for every token and the prefix takes at most ``m <= g P exp(max_p q.P_k[p] s -
max_j (q.K[j] s + M_j))`` of the attention mass, changing the attention output by at most
``m * max|P_v - out|``. ``gate_bias=-30`` (``g = 9.4e-14``) is the base model to float32
rounding; gradients into the prefix and the gate scale with ``g`` as well, so a gate that starts
closed also starts slowly (``-8``, ``g = 3.4e-4``, is a compromise).

How it runs: in the wrapper attention implementation of
:mod:`layerfreeze.policies.prefix.attention` (transformers' ``ALL_ATTENTION_FUNCTIONS``; this
module registers :func:`paper_attention` as its ``paper`` form), after the KV cache was updated, the prefix is
concatenated in front of the cached-plus-new keys/values and the mask gets ``P`` columns in
front (``log g``, or 0); the original implementation then runs on the extended inputs. The prefix
never enters the KV cache (the cache holds real tokens only, positions and cache length are
unchanged; each decoding step prepends the prefix again) and carries no rotary position. Needs an
implementation that takes an additive float mask: ``eager`` and ``sdpa`` (sdpa then runs with an
explicit mask instead of ``is_causal``); ``flash_attention_*`` and ``flex_attention`` are refused.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from layerfreeze.policies.base import PolicySpec
from layerfreeze.policies.prefix.attention import (
    ADAPTER_ATTR,
    PREFIX_FORMS,
    base_attn_implementation,
    find_installer,
    find_route,
)

if TYPE_CHECKING:
    from layerfreeze.models import LayerInfo, ModelLayout

__all__ = [
    "PAPER_IMPLEMENTATIONS",
    "form_mismatch",
    "paper_form_problems",
    "configure_adapter",
    "paper_attention",
]

#: Base attention implementations the paper form runs on (they take an additive float mask).
PAPER_IMPLEMENTATIONS: tuple[str, ...] = ("eager", "sdpa")


def form_mismatch(layer: LayerInfo, form: str) -> list[str]:
    """A problem when ``layer``'s attention already carries a prefix adapter of another form."""
    existing = layer.attn._modules.get(ADAPTER_ATTR)
    have = getattr(existing, "form", "branch") if existing is not None else form
    if have == form:
        return []
    return [
        f"layer {layer.index} ({layer.name}.{layer.attn_name}, {type(layer.attn).__name__}): "
        f"already carries a prefix adapter of form={have}, this plan asks for form={form}; one "
        "layer holds one prefix form, so use the same form in every plan that covers this layer."
    ]


def paper_form_problems(
    policy: Any, layer: LayerInfo, spec: PolicySpec, layout: ModelLayout
) -> list[str]:
    """Problems that stop ``prefix(form=paper)`` on ``layer``: the branch form's checks plus the
    paper form's own (registry dispatch, an eager/sdpa implementation, no adapter of the other
    form already installed)."""
    mismatch = form_mismatch(layer, "paper")
    if mismatch:
        return mismatch
    installer = find_installer(layer.attn)
    if installer is not None and "paper" in getattr(installer, "forms", ("branch",)):
        return list(installer.check(layer, spec, layout))  # it checks the paper form itself
    branch = PolicySpec(
        spec.name, dataclasses.replace(spec.options, form="branch", gate_at="logit")
    )
    problems = list(policy.check(layer, branch, layout))
    if problems == form_mismatch(layer, "branch"):  # our own paper adapter, already installed
        problems = []
    attn = layer.attn
    where = f"layer {layer.index} ({layer.name}.{layer.attn_name}, {type(attn).__name__})"
    existing = attn._modules.get(ADAPTER_ATTR)
    gate_at = spec.options.gate_at
    if existing is not None and getattr(existing, "gate_at", "logit") != gate_at:
        problems.append(
            f"{where}: already carries a prefix adapter with gate_at="
            f"{getattr(existing, 'gate_at', 'logit')}, this plan asks for gate_at={gate_at}; use "
            "the same prefix options in every plan that covers this layer."
        )
    dropout = getattr(attn, "attention_dropout", 0.0)
    if gate_at == "value" and isinstance(dropout, (int, float)) and dropout > 0:
        problems.append(
            f"{where}: prefix(gate_at=value) reads the prefix's attention mass from the attention "
            f"output, which attention dropout ({dropout}) would perturb; set attention_dropout=0 "
            "or use gate_at=logit."
        )
    # Installers (other engines) and query routes (inline attention) bypass the registry call.
    if find_installer(attn) is not None or find_route(attn):
        problems.append(
            f"{where}: prefix(form=paper) extends the keys/values inside transformers' "
            "ALL_ATTENTION_FUNCTIONS call, which this attention module does not make; use "
            "form=branch here (presets: hlpt_branch, h2lpt_branch, or hlpt(form=branch))."
        )
        return problems
    config = getattr(attn, "config", None)
    impl = base_attn_implementation(getattr(config, "_attn_implementation", None))
    if isinstance(impl, str) and impl not in PAPER_IMPLEMENTATIONS:
        problems.append(
            f"{where}: prefix(form=paper) needs attn_implementation "
            f"{' or '.join(PAPER_IMPLEMENTATIONS)} (the gate enters as an additive bias on the "
            f"prefix columns of the attention mask), got {impl!r}. Load the model with "
            "attn_implementation='sdpa', or use form=branch (any implementation; presets "
            "hlpt_branch, h2lpt_branch)."
        )
    return problems


def configure_adapter(
    adapter: nn.Module, form: str, gate_bias: float, gate_at: str = "logit"
) -> None:
    """Finish a newly built ``PrefixAdapter``: record ``form`` and ``gate_at``, set the gate's
    initial bias, and for ``form=paper`` drop the zero-initialised factor (the paper form has
    none)."""
    adapter.form = form
    adapter.gate_at = gate_at
    gate = getattr(adapter, "prefix_gate", None)
    if gate is not None:
        with torch.no_grad():
            gate.bias.fill_(float(gate_bias))
    if form == "paper" and "prefix_gating_factor" in adapter._parameters:
        del adapter._parameters["prefix_gating_factor"]
        adapter.__dict__["prefix_gating_factor"] = None


def _real_mask(
    mask: torch.Tensor | None,
    base: str,
    module: nn.Module,
    q_len: int,
    kv_len: int,
    dtype: torch.dtype,
    device: torch.device,
    is_causal: bool | None,
) -> torch.Tensor:
    """The base implementation's mask as an additive float ``(b|1, 1|h, q_len, kv_len)``.

    ``None`` means what the base implementation does without a mask: sdpa attends causally
    when ``q_len > 1`` (its ``is_causal`` rule), eager attends to every key.
    """
    low = torch.finfo(dtype).min
    if mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if base == "sdpa" and q_len > 1 and causal:
            pos_q = torch.arange(q_len, device=device).unsqueeze(1) + (kv_len - q_len)
            allowed = torch.arange(kv_len, device=device).unsqueeze(0) <= pos_q
        else:
            allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
        mask = allowed.view(1, 1, q_len, kv_len)
    mask = mask[..., :kv_len]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, low)
    return mask.to(dtype)


def paper_attention(
    fn: Any,
    base: str,
    module: nn.Module,
    adapter: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """Run the base attention ``fn`` with the prefix prepended to ``key`` / ``value`` and the
    gate's ``log g`` as the prefix columns of the mask (see the module docstring).

    Args:
        fn: the original attention implementation (eager or sdpa).
        base: its name (``eager`` / ``sdpa``), for what a missing mask means.
        module: the attention module.
        adapter: its ``PrefixAdapter`` (``form=paper``).
        query: ``(batch, heads, q_len, head_dim)``, rotary applied.
        key: ``(batch, kv_heads, kv_len, head_dim)`` after the cache update.
        value: ``(batch, kv_heads, kv_len, value_dim)``.
        attention_mask: what the base implementation was given (None, bool or additive float).
        **kwargs: passed through (``scaling``, ``dropout``, ...).

    Returns:
        ``fn``'s ``(output, weights)``; eager's weights have the ``P`` prefix columns first.
    """
    adapter.pending = False
    pk, pv = adapter.keys_values()  # (kv_heads, P, d)
    if key.dim() != 4 or key.shape[1] != pk.shape[0] or value.shape[1] != pv.shape[0]:
        raise RuntimeError(
            f"{adapter.where}: prefix(form=paper) expected keys/values as (batch, "
            f"{pk.shape[0]} kv heads, kv_len, dim), got {tuple(key.shape)} / "
            f"{tuple(value.shape)}; this attention layout is not supported by form=paper."
        )
    batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    tokens = pk.shape[1]
    key = torch.cat([pk.to(key.dtype).unsqueeze(0).expand(batch, -1, -1, -1), key], dim=2)
    value = torch.cat([pv.to(value.dtype).unsqueeze(0).expand(batch, -1, -1, -1), value], dim=2)
    mask = _real_mask(
        attention_mask,
        base,
        module,
        q_len,
        kv_len,
        query.dtype,
        query.device,
        kwargs.get("is_causal"),
    )
    mask = mask.expand(batch, mask.shape[1], q_len, kv_len)
    gate = adapter.prefix_gate
    if gate is not None and getattr(adapter, "gate_at", "logit") == "value":
        return _value_gated(fn, module, adapter, query, key, value, mask, tokens, **kwargs)
    if gate is not None:
        g = gate.current(query[:, 0, :, :1])  # (batch, q_len, 1) fp32
        # Clamp so that a gate that underflowed to 0 gives a finite bias and gradient.
        bias = torch.log(g.clamp_min(torch.finfo(torch.float32).tiny)).to(query.dtype)
        bias = bias.unsqueeze(1).expand(batch, mask.shape[1], q_len, tokens)
    else:
        bias = mask.new_zeros(batch, mask.shape[1], q_len, tokens)
    mask = torch.cat([bias, mask], dim=-1)
    return fn(module, query, key, value, mask, **kwargs)


def _value_gated(
    fn: Any,
    module: nn.Module,
    adapter: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    tokens: int,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """``gate_at=value``: ``softmax([q P_k^T s | q K^T s + M]) @ [g P_v ; V]``, ``g`` per query.

    ``fn`` cannot scale values per query, so the values get one extra column (1 on the prefix
    rows, 0 on the real ones): the output's last column is the prefix's attention mass ``m``.
    Within the one softmax the prefix rows weigh ``m * softmax(q P_k^T s)`` (their own softmax
    times their mass), so the prefix's share of the output is ``m * R`` with ``R`` the prefix
    read-out computed here, and ``out - (1 - g) m R`` is the value-gated output.
    """
    batch = query.shape[0]
    ones = value.new_ones(*value.shape[:-1], 1)
    ones[:, :, tokens:] = 0
    value = torch.cat([value, ones], dim=-1)
    bias = mask.new_zeros(batch, mask.shape[1], mask.shape[2], tokens)
    out, weights = fn(module, query, key, value, torch.cat([bias, mask], dim=-1), **kwargs)
    # transformers' eager and sdpa return (batch, q_len, heads, value_dim + 1).
    mass, out = out[..., -1:], out[..., :-1]
    pk, pv = adapter.keys_values()
    groups = query.shape[1] // pk.shape[0]
    pk = pk.float().repeat_interleave(groups, dim=0)
    pv = pv.float().repeat_interleave(groups, dim=0)
    scaling = kwargs.get("scaling")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.einsum("bhtd,hpd->bhtp", query.float(), pk) * scaling
    readout = torch.einsum("bhtp,hpd->bthd", torch.softmax(scores, dim=-1), pv)
    g = adapter.prefix_gate.current(query[:, 0, :, :1]).unsqueeze(-1)  # (batch, q_len, 1, 1)
    out = out - ((1 - g) * mass.float() * readout).to(out.dtype)
    return out, weights


PREFIX_FORMS["paper"] = paper_attention
