"""The LoRA arithmetic, engine-neutral: the one copy every LoRA adapter computes with.

For a base map ``W`` (out x in) with the low-rank factors ``A`` (r x in) and ``B`` (out x r),
scale ``s = alpha / r`` and the optional HLPT gate ``g`` (one fp32 value per token)::

    update(x) = g * s * (x A^T) B^T          delta weight = s * B A

Users: the Hugging Face adapters of :mod:`layerfreeze.policies.lora` (``nn.Linear``, GPT-2
``Conv1D`` with its ``(in, out)`` layout, fused MoE experts batched over the expert dimension)
and the megatron tensor-parallel adapters of :mod:`layerfreeze.engines.megatron.lora`, which
pass their local shards of ``A`` / ``B`` / the weight and put their collectives between the
steps (:func:`scale_low_rank` runs on the rank-r intermediate after a row-parallel all-reduce,
:func:`add_low_rank` after a column-parallel copy). No torch.distributed, no module state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from layerfreeze.engines.partition import full_shape

__all__ = [
    "delta_weight",
    "merge_delta",
    "unmerge_delta",
    "scale_low_rank",
    "add_low_rank",
    "weight_shape",
]


def delta_weight(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    *,
    transposed: bool = False,
    fp32: bool = True,
) -> torch.Tensor:
    """``scaling * B A``, laid out like the base weight.

    Args:
        lora_a: ``(..., r, in)``; leading dimensions batch (one LoRA per expert).
        lora_b: ``(..., out, r)``.
        scaling: ``alpha / r``.
        transposed: the base weight is stored ``(in, out)`` (GPT-2 ``Conv1D``, transposed
            fused experts): return the last two dimensions swapped.
        fp32: compute in float32 (merging: the caller casts to the weight's dtype once); False
            keeps the factors' dtype (a differentiable weight-space update).

    Returns:
        ``(..., out, in)``, or ``(..., in, out)`` when ``transposed``.
    """
    if fp32:
        lora_a, lora_b = lora_a.float(), lora_b.float()
    d = torch.matmul(lora_b, lora_a) * scaling
    return d.transpose(-1, -2) if transposed else d


@torch.no_grad()
def merge_delta(weight: torch.Tensor, delta: torch.Tensor) -> None:
    """Fold ``delta`` into ``weight`` in place (cast to its device and dtype)."""
    weight.add_(delta.to(device=weight.device, dtype=weight.dtype))


@torch.no_grad()
def unmerge_delta(weight: torch.Tensor, delta: torch.Tensor) -> None:
    """Take a merged ``delta`` back out of ``weight`` in place (exact up to float rounding)."""
    weight.sub_(delta.to(device=weight.device, dtype=weight.dtype))


def scale_low_rank(
    h: torch.Tensor, scaling: float, gate: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """Apply the gate to the rank-r intermediate ``h = x A^T``; return ``(h, scale left)``.

    Ungated, ``h`` is returned as is and the whole ``scaling`` is left for :func:`add_low_rank`
    (it becomes the ``alpha`` of one ``addmm``: no full-size multiply). Gated, ``h`` is
    multiplied by ``g * scaling`` per token in fp32 (gate maths in fp32 on the rank-r tensor
    only, never a full-size upcast) and the scale left is 1.

    Args:
        h: ``(..., r)``.
        scaling: ``alpha / r``.
        gate: ``(..., 1)`` fp32 gate values for the same tokens, or None.
    """
    if gate is None:
        return h, scaling
    return (h.float() * (gate * scaling)).to(h.dtype), 1.0


def add_low_rank(
    base_out: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """``base_out + scale * h B^T`` as a new tensor (``B`` is ``(out, r)``).

    One ``addmm`` when the dtypes agree (so ``B = 0`` keeps ``base_out`` bit-exact); otherwise
    the update is computed in the adapter's dtype and cast to ``base_out``'s.
    """
    if h.dtype != base_out.dtype:  # adapter kept in another dtype than the base output
        return base_out + (F.linear(h, lora_b) * scale).to(base_out.dtype)
    out2d = torch.addmm(
        base_out.reshape(-1, base_out.shape[-1]),
        h.reshape(-1, h.shape[-1]),
        lora_b.t(),
        alpha=scale,
    )
    return out2d.view(base_out.shape)


def weight_shape(w: torch.Tensor) -> tuple[int, ...]:
    """The full shape of a base weight, also when ZeRO-3 partitioned it
    (:func:`layerfreeze.engines.partition.full_shape`)."""
    return tuple(full_shape(w))
