"""``prefix(form=paper)`` on megatron-core's ``SelfAttention`` (local and Transformer Engine
specs), per tensor-parallel rank.

Same maths as on Hugging Face models (:mod:`layerfreeze.policies.prefix.paper`): the layer's
prefix keys ``P_k`` / values ``P_v`` are prepended to its own (rotary-embedded) keys/values and
one softmax runs over ``P + S`` columns; the prefix keys carry no rotary position and every
query sees every prefix token (the model's causal mask covers the real columns only)::

    gate_at=logit  (or gate-free, g = 1):
        out_t = softmax([ q_t P_k^T s + log g_t | q_t K^T s + M_t ]) @ [ P_v ; V ]
    gate_at=value:
        out_t = softmax([ q_t P_k^T s | q_t K^T s + M_t ]) @ [ g_t P_v ; V ]

How it runs: megatron's ``SelfAttention`` calls its ``core_attention`` (local
``DotProductAttention`` or Transformer Engine's ``TEDotProductAttention``) with query
``[sq, b, heads_local, d]`` and keys/values ``[sk, b, groups_local, d]`` after rotary, the mask
positionally and ``attn_mask_type`` / ``attention_bias`` / ``packed_seq_params`` as keywords
(``SelfAttention.forward``, megatron-core 0.16.1 ``transformer/attention.py``). A forward
pre-hook on ``core_attention`` keeps those inputs and hands the module a one-token slice instead
(its output is discarded, so the base attention is not computed twice; for TE the slice is made
contiguous, ``sbhd`` ``[1, 1, heads, d]`` with the same ``attn_mask_type``, which every TE
backend accepts); the forward hook then returns this module's attention over ``[prefix ; real]``
as ``[sq, b, heads_local * d]`` (TE's own ``sbhd`` output shape: TE reshapes its context to
``[sq, b, heads * d]``, ``backends.py`` ``output.view(*output.shape[:-2], -1)``). Cost on TE:
one tiny kernel per layer, and TE keeps one global backend-selection cache keyed on the call's
shapes (``_attention_backends["attention_params"]``), so a model that mixes paper-form layers
(one-token calls) with full-size TE calls re-runs TE's backend selection (host-side work) on
every switch; results are unaffected.

Masks: the local ``DotProductAttention`` uses the mask it is given and builds a causal one when
it gets None. ``TEDotProductAttention`` follows TE's ``attn_mask_type`` (the per-call keyword):
``causal`` is a top-left aligned causal mask and TE ignores ``attention_mask`` for it (TE's
``DotProductAttention.forward`` docstring: the mask "should be None for causal masks and
no_mask"), ``causal_bottom_right`` is bottom-right aligned, ``no_mask`` masks nothing; this
module does the same. TE's padding / arbitrary mask types are refused at forward time (they come
with packed sequences or explicit masks this path does not reproduce), as are
``packed_seq_params`` (THD: a prefix per packed sequence is not implemented; use form=branch,
which is per token and so exact on packed sequences) and ``attention_bias``.

The TE-spec paths were written against megatron-core 0.16.1's
``extensions/transformer_engine.py`` (``TEDotProductAttention`` l.1140-1420) and Transformer
Engine's ``attention/dot_product_attention/dot_product_attention.py`` (mask types l.1731-1790)
and ``backends.py``, and have not been executed on this CPU-only machine (no TE):
``tests/gpu/test_cuda_megatron_te_prefix.py`` checks them against the local spec on a GPU. Each TP rank holds its query groups' prefix (split by group like
the branch form's) and the replicated gate; the gate's gradient is summed over the TP ranks
(every rank's heads add to it), so each rank holds the full gradient of the gate. Under
sequence parallelism the gate of this rank's sequence shard is all-gathered first
(``MegatronPrefix.sequence_gate``; see :mod:`layerfreeze.engines.megatron.prefix`).

Refused with a clear error (in :func:`paper_problems`): attention dropout (megatron and TE
draw it from the CUDA RNG tracker inside ``core_attention``, which this path replaces), a softmax
type other than ``vanilla``, sliding-window attention, FP8 attention (``fp8_dot_product_attention``:
this path computes the attention in the model's dtype; ``fp8_multi_head_attention`` is refused
for both forms in :mod:`layerfreeze.engines.megatron.prefix`), QK-clip
and max-logit logging (``qk_clip`` / ``log_max_attention_logit``: TE would record the max logit
of the one-token call), a ``core_attention`` that is neither ``DotProductAttention`` nor
``TEDotProductAttention``, and an adapter already installed with another ``gate_at``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["is_te_core_attention", "paper_attention", "paper_problems"]

_STASH = "_layerfreeze_paper_inputs"
_TE_MODULE = "megatron.core.extensions.transformer_engine"


def is_te_core_attention(core: nn.Module) -> bool:
    """``core`` is megatron-core's ``TEDotProductAttention`` (or a subclass); decided from the
    class hierarchy, so nothing imports Transformer Engine here."""
    return any(
        c.__name__ == "TEDotProductAttention" and c.__module__ == _TE_MODULE
        for c in type(core).__mro__
    )


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
    if core is not None and not (
        isinstance(core, DotProductAttention) or is_te_core_attention(core)
    ):
        problems.append(
            f"{where}: prefix(form=paper) on megatron needs DotProductAttention (local spec) or "
            f"TEDotProductAttention (Transformer Engine spec) as core_attention, got "
            f"{type(core).__name__}. Build the model with get_gpt_layer_local_spec or "
            "get_gpt_layer_with_transformer_engine_spec, or use form=branch (presets "
            "hlpt_branch, h2lpt_branch)."
        )
    dropout = getattr(config, "attention_dropout", 0.0)
    if dropout:
        problems.append(
            f"{where}: prefix(form=paper) on megatron computes the attention itself and cannot "
            f"reproduce megatron's or Transformer Engine's attention dropout ({dropout}); set "
            "attention_dropout=0 or use form=branch."
        )
    if getattr(config, "fp8_dot_product_attention", False):  # fp8_multi_head_attention: prefix.py
        problems.append(
            f"{where}: prefix(form=paper) computes the attention itself in the model's dtype and "
            "cannot run Transformer Engine's FP8 attention (fp8_dot_product_attention=True); "
            "turn it off or use form=branch."
        )
    clip = [k for k in ("qk_clip", "log_max_attention_logit") if getattr(config, k, False)]
    if clip:
        problems.append(
            f"{where}: prefix(form=paper) replaces core_attention's output, so the max "
            f"attention logit that {'=True, '.join(clip)}=True reads from it would be wrong; "
            "turn it off or use form=branch."
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


def stash_inputs(
    core: nn.Module, args: tuple, kwargs: dict, where: str = "prefix(form=paper)"
) -> tuple[tuple, dict]:
    """Keep ``core_attention``'s query/key/value/mask/``attn_mask_type`` on ``core`` and return
    one-token inputs (the base call's output is replaced by :func:`paper_attention`'s).

    Raises:
        RuntimeError: the call carries ``packed_seq_params`` (THD / packed sequences) or an
            ``attention_bias``, which this path does not reproduce.
    """
    names = ("query", "key", "value", "attention_mask")
    values = list(args[:4]) + [kwargs.pop(n) for n in names[len(args[:4]) :] if n in kwargs]
    if len(values) < 3:
        raise RuntimeError("prefix(form=paper): core_attention called without query/key/value.")
    query, key, value = values[:3]
    mask = values[3] if len(values) > 3 else None
    later = ("attn_mask_type", "attention_bias", "packed_seq_params")  # after the mask
    rest = dict(zip(later, args[4:], strict=False))
    rest.update({k: kwargs[k] for k in later if k in kwargs})
    if rest.get("packed_seq_params") is not None:
        fmt = getattr(rest["packed_seq_params"], "qkv_format", None)
        raise RuntimeError(
            f"{where}: prefix(form=paper) does not support packed sequences (packed_seq_params "
            f"with qkv_format={fmt!r}): it would need a prefix per packed sequence. Feed unpacked "
            "[s, b] batches (packed_seq_params=None) or use form=branch, which is exact on "
            "packed sequences."
        )
    if rest.get("attention_bias") is not None:
        raise RuntimeError(
            f"{where}: prefix(form=paper) does not apply core_attention's attention_bias; run "
            "without attention_bias or use form=branch."
        )
    core.__dict__[_STASH] = (query, key, value, mask, rest.get("attn_mask_type"))
    small = (query[:1, :1], key[:1, :1], value[:1, :1])
    if is_te_core_attention(core):  # TE reads the layout from strides: hand it dense tensors
        small = tuple(x.contiguous() for x in small)
    return small + (None,) + tuple(args[4:]), kwargs


def take_inputs(core: nn.Module) -> tuple:
    """The inputs :func:`stash_inputs` kept (removed from ``core``): ``(query, key, value,
    attention_mask, attn_mask_type)``."""
    return core.__dict__.pop(_STASH)


def te_mask(mask_type, where: str = "prefix(form=paper)") -> tuple[bool, bool]:
    """``(causal, top_left)`` of Transformer Engine's ``attn_mask_type`` (megatron's
    ``AttnMaskType`` or TE's string): TE's ``causal`` is top-left aligned, its
    ``causal_bottom_right`` bottom-right aligned, ``no_mask`` masks nothing; TE ignores
    ``attention_mask`` for all three. The padding / arbitrary types are refused.

    Raises:
        RuntimeError: a mask type other than the three.
    """
    name = getattr(mask_type, "name", mask_type)
    name = {"padding,causal": "padding_causal", "causal,padding": "padding_causal"}.get(name, name)
    table = {
        "causal": (True, True),
        "causal_bottom_right": (True, False),
        "no_mask": (False, False),
    }
    if name not in table:
        raise RuntimeError(
            f"{where}: prefix(form=paper) on TEDotProductAttention supports attn_mask_type "
            f"causal, causal_bottom_right or no_mask, got {name!r} (padding and arbitrary masks "
            "are not reproduced); use a causal mask type or form=branch."
        )
    return table[name]


def _real_mask(
    mask, causal: bool, b: int, sq: int, sk: int, dtype, device, top_left: bool = False
) -> torch.Tensor:
    """Megatron's mask (bool, True = masked; None with a causal type = causal, aligned to the
    bottom right, or to the top left with ``top_left`` as TE's ``causal``) as an additive float
    ``(b, 1, sq, sk)``."""
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
    elif causal and (sq > 1 or top_left):  # bottom right with one query: nothing masked
        pos_q = torch.arange(sq, device=device).unsqueeze(1) + (0 if top_left else sk - sq)
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
    top_left: bool = False,
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
        top_left: align the causal mask to the top left (TE's ``causal``) instead of the bottom
            right (the same when ``sq == sk``, as in training).

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
    real = _real_mask(mask, causal, b, sq, sk, dtype, query.device, top_left)
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
