"""``prefix(form=paper)`` on megatron-core's local-spec ``SelfAttention``, per tensor-parallel rank.

Same maths as on Hugging Face models (:mod:`layerfreeze.policies.prefix.paper`): the layer's
prefix keys ``P_k`` / values ``P_v`` are prepended to its own (rotary-embedded) keys/values and
one softmax runs over ``P + S`` columns; the prefix keys carry no rotary position and every
query sees every prefix token (the model's causal mask covers the real columns only)::

    gate_at=logit  (or gate-free, g = 1):
        out_t = softmax([ q_t P_k^T s + log g_t | q_t K^T s + M_t ]) @ [ P_v ; V ]
    gate_at=value:
        out_t = softmax([ q_t P_k^T s | q_t K^T s + M_t ]) @ [ g_t P_v ; V ]

How it runs: megatron's ``SelfAttention`` calls its ``core_attention`` (``DotProductAttention``)
with query ``[sq, b, heads_local, d]`` and keys/values ``[sk, b, groups_local, d]`` after
rotary. A forward pre-hook on ``core_attention`` keeps those inputs and hands the module a
one-token slice instead (its output is discarded, so the base attention is not computed twice);
the forward hook then returns this module's attention over ``[prefix ; real]`` as
``[sq, b, heads_local * d]``. Each TP rank holds its query groups' prefix (split by group like
the branch form's) and the replicated gate; the gate's gradient is summed over the TP ranks
(every rank's heads add to it), so each rank holds the full gradient of the gate. Under
sequence parallelism the gate of this rank's sequence shard is all-gathered first
(``MegatronPrefix.sequence_gate``; see :mod:`layerfreeze.engines.megatron.prefix`).

Refused with a clear error (in :func:`paper_problems`): attention dropout (megatron draws it from
its CUDA RNG tracker inside ``core_attention``, which this path replaces), a softmax type other
than ``vanilla``, sliding-window attention, a ``core_attention`` that is not megatron's local
``DotProductAttention`` (Transformer Engine's fused attention takes other arguments), and an
adapter already installed with another ``gate_at``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["paper_attention", "paper_problems"]

_STASH = "_layerfreeze_paper_inputs"


class _SumGradOverTP(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the TP ranks (each rank's heads add
    their part of the replicated gate's gradient). Unlike megatron's
    ``copy_to_tensor_model_parallel_region`` it reduces a contiguous copy and returns that copy:
    megatron all-reduces ``grad.contiguous()`` in place and returns ``grad``, so a strided
    gradient (what a permuted gate gets) comes back unreduced."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def paper_problems(attn: nn.Module, where: str, gate_at: str) -> list[str]:
    """What stops ``prefix(form=paper)`` on megatron attention ``attn`` (besides the checks the
    branch form shares: TP split, context parallelism, selective recomputation)."""
    config = attn.config
    problems = []
    core = getattr(attn, "core_attention", None)
    try:
        from megatron.core.transformer.dot_product_attention import DotProductAttention
    except ImportError:  # pragma: no cover - megatron-core is there when this runs
        DotProductAttention = ()  # noqa: N806
    if core is not None and not isinstance(core, DotProductAttention):
        problems.append(
            f"{where}: prefix(form=paper) on megatron needs the local-spec DotProductAttention "
            f"as core_attention, got {type(core).__name__}. Build the model with "
            "get_gpt_layer_local_spec, or use form=branch (presets hlpt_branch, h2lpt_branch)."
        )
    dropout = getattr(config, "attention_dropout", 0.0)
    if dropout:
        problems.append(
            f"{where}: prefix(form=paper) on megatron computes the attention itself and cannot "
            f"reproduce megatron's attention dropout ({dropout}); set attention_dropout=0 or "
            "use form=branch."
        )
    softmax_type = getattr(config, "softmax_type", "vanilla")
    if softmax_type != "vanilla":
        problems.append(
            f"{where}: prefix(form=paper) supports softmax_type=vanilla only, got "
            f"{softmax_type!r}; use form=branch."
        )
    if getattr(config, "window_size", None) is not None:
        problems.append(
            f"{where}: prefix(form=paper) does not support sliding-window attention "
            f"(window_size={config.window_size}); use form=branch."
        )
    existing = attn._modules.get("prefix_adapter")
    have = getattr(existing, "gate_at", gate_at) if existing is not None else gate_at
    if have != gate_at:
        problems.append(
            f"{where}: already carries a prefix adapter with gate_at={have}, this plan asks for "
            f"gate_at={gate_at}; use the same prefix options in every plan that covers this layer."
        )
    return problems


def stash_inputs(core: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Keep ``core_attention``'s query/key/value/mask on ``core`` and return one-token inputs
    (the base call's output is replaced by :func:`paper_attention`'s)."""
    names = ("query", "key", "value", "attention_mask")
    values = list(args[:4]) + [kwargs.pop(n) for n in names[len(args[:4]) :] if n in kwargs]
    if len(values) < 3:
        raise RuntimeError("prefix(form=paper): core_attention called without query/key/value.")
    query, key, value = values[:3]
    mask = values[3] if len(values) > 3 else None
    core.__dict__[_STASH] = (query, key, value, mask)
    small = (query[:1, :1], key[:1, :1], value[:1, :1], None)
    return small + tuple(args[4:]), kwargs


def take_inputs(core: nn.Module) -> tuple:
    """The inputs :func:`stash_inputs` kept (removed from ``core``)."""
    return core.__dict__.pop(_STASH)


def _real_mask(mask, causal: bool, b: int, sq: int, sk: int, dtype, device) -> torch.Tensor:
    """Megatron's mask (bool, True = masked; None with a causal type = causal) as an additive
    float ``(b, 1, sq, sk)``."""
    low = torch.finfo(dtype).min
    if mask is not None:
        if mask.dtype != torch.bool:
            raise RuntimeError(
                f"prefix(form=paper): expected megatron's boolean attention mask, got {mask.dtype}."
            )
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        mask = mask[..., -sq:, -sk:]
        add = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(mask, low)
    elif causal and sq > 1:
        pos_q = torch.arange(sq, device=device).unsqueeze(1) + (sk - sq)
        allowed = torch.arange(sk, device=device).unsqueeze(0) <= pos_q
        add = torch.zeros(1, 1, sq, sk, dtype=dtype, device=device).masked_fill(~allowed, low)
    else:
        add = torch.zeros(1, 1, sq, sk, dtype=dtype, device=device)
    return add.expand(b, add.shape[1], sq, sk)


def paper_attention(
    adapter: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scaling: float,
) -> torch.Tensor:
    """One TP rank's paper-form attention.

    Args:
        adapter: the layer's ``MegatronPrefix`` (``form=paper``).
        query: ``[sq, b, heads_local, d]``, rotary applied.
        key: ``[sk, b, groups_local, d]``, rotary applied.
        value: ``[sk, b, groups_local, d]``.
        mask: megatron's attention mask (bool, True = masked) or None.
        causal: the module's mask type is causal (used when ``mask`` is None).
        scaling: the softmax scale.

    Returns:
        ``[sq, b, heads_local * d]`` in the query's dtype.
    """
    pk, pv = adapter.keys_values()  # (groups_local, P, d)
    np_, ng = adapter.num_heads, adapter.num_kv_heads
    if query.dim() != 4 or query.shape[2] != np_ or key.dim() != 4 or key.shape[2] != ng:
        raise RuntimeError(
            f"{adapter.where}: prefix(form=paper) expected megatron's query [sq, b, {np_}, d] "
            f"and keys [sk, b, {ng}, d], got {tuple(query.shape)} / {tuple(key.shape)}."
        )
    sq, b, sk = query.shape[0], query.shape[1], key.shape[0]
    tokens, dtype = pk.shape[1], query.dtype
    k = torch.cat([pk.to(dtype).unsqueeze(0).expand(b, -1, -1, -1), key.permute(1, 2, 0, 3)], 2)
    v = torch.cat([pv.to(dtype).unsqueeze(0).expand(b, -1, -1, -1), value.permute(1, 2, 0, 3)], 2)
    k = k.repeat_interleave(np_ // ng, dim=1)  # query head i reads group i // (np / ng)
    v = v.repeat_interleave(np_ // ng, dim=1)
    q = query.permute(1, 2, 0, 3)  # [b, np, sq, d]
    real = _real_mask(mask, causal, b, sq, sk, dtype, query.device)
    gate, g = adapter.prefix_gate, None
    if gate is not None:
        if getattr(adapter, "sequence_parallel", False):
            g = adapter.sequence_gate(query)  # (sq, b, 1) fp32 from this rank's sequence shard
        else:
            g = gate.current(query[:, :, 0, :1])  # (sq, b, 1) fp32
            if adapter.tp_size > 1:
                g = _SumGradOverTP.apply(g, adapter.__dict__["_tp_group"])
        g = g.permute(1, 2, 0).unsqueeze(-1)  # (b, 1, sq, 1)
    if g is not None and getattr(adapter, "gate_at", "logit") == "value":
        bias = real.new_zeros(b, real.shape[1], sq, tokens)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * scaling
        probs = torch.softmax(scores + torch.cat([bias, real], -1).float(), dim=-1)
        probs = torch.cat([probs[..., :tokens] * g, probs[..., tokens:]], dim=-1)
        out = torch.matmul(probs.to(dtype), v)
    else:
        if g is not None:
            # Clamp so that a gate that underflowed to 0 gives a finite bias and gradient.
            bias = torch.log(g.clamp_min(torch.finfo(torch.float32).tiny)).to(dtype)
            bias = bias.expand(b, real.shape[1], sq, tokens)
        else:
            bias = real.new_zeros(b, real.shape[1], sq, tokens)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.cat([bias, real], dim=-1), scale=scaling
        )
    return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * out.shape[-1])
