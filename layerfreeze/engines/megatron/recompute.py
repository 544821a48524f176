"""Megatron activation recomputation with frozen layers: let gradients reach in-layer adapters.

Megatron's recomputation (``recompute_granularity``) wraps layers in a reentrant checkpoint
(``tensor_parallel.checkpoint``), which only backpropagates when one of its *inputs* requires
grad. With frozen embeddings, the first stage's decoder input does not, so adapters (LoRA,
prefix) or trainable layers inside a recomputed layer get no gradient and the loss has no
``grad_fn`` when nothing else trains. :func:`prepare_recompute` makes the embedding output
require grad on stages that hold the embedding, as transformers' ``enable_input_require_grads``
does; later pipeline stages receive their input with ``requires_grad`` set by the schedule.
Without recomputation it does nothing (the hook would only add backward work through frozen
layers).

Usage, after ``apply_plan`` and before DDP wrapping::

    prepare_recompute(model)          # a GPTModel, or the list of virtual-pipeline chunks
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from layerfreeze.engines.common import unwrap_module

__all__ = ["prepare_recompute"]


def _require_grad_hook(module: nn.Module, args: tuple, output):
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad:
        return output.requires_grad_()
    return output


def prepare_recompute(model_or_chunks: nn.Module | Sequence[nn.Module]) -> int:
    """Make the decoder input require grad when the model recomputes activations.

    Args:
        model_or_chunks: a megatron-core ``GPTModel`` (possibly wrapped) or a list of chunks.

    Returns:
        The number of embedding modules that now carry the hook (0 without recomputation or
        on stages without the embedding). Idempotent.
    """
    is_list = isinstance(model_or_chunks, (list, tuple, nn.ModuleList))
    chunks = list(model_or_chunks) if is_list else [model_or_chunks]
    count = 0
    for chunk in chunks:
        model = unwrap_module(chunk, stop_at="decoder")
        config = getattr(model, "config", None)
        embedding = getattr(model, "embedding", None)
        if getattr(config, "recompute_granularity", None) is None:
            continue
        if not getattr(model, "pre_process", False) or not isinstance(embedding, nn.Module):
            continue
        if not any(h is _require_grad_hook for h in embedding._forward_hooks.values()):
            embedding.register_forward_hook(_require_grad_hook)
        count += 1
    return count
