"""Padded vocabulary rows kept out of megatron-core's softmax (loss and evaluation logits).

megatron-core pads the vocabulary of ``GPTModel`` to a multiple of
``make_vocab_size_divisible_by x tensor_model_parallel_size`` (503 becomes 504 at TP=2). The
padded rows of the output layer are real columns of the logits: megatron-core 0.16.1's
``GPTModel._postprocess`` passes the output layer's logits straight to
``compute_language_model_loss`` -> ``tensor_parallel.vocab_parallel_cross_entropy`` (or its fused
variants), whose softmax sums over every local column. A zero padded row adds ``exp(0)`` to the
normaliser of every token, so the per-token loss is not the Hugging Face model's (up to 0.018 at
initialisation with 503 tokens), and a plan that freezes the output layer keeps those rows at
logit 0 for the whole run.

:func:`mask_padded_vocab` installs a forward hook on the output layer (the ``ColumnParallelLinear``
every logit of the model goes through, including the tied-embedding and multi-token-prediction
calls) that sets the padded columns *this tensor-parallel rank owns* to the dtype's lowest value
before the logits reach the loss or the caller: ``exp`` of them is exactly 0 in the softmax, no
gradient reaches the padded rows, and a padded column never wins an argmax. Gathered logits
(``gather_output`` / ``runtime_gather_output``) are masked by global column. Ranks without
padded columns leave the logits untouched (no copy).

megatron-core, Megatron-LM and Megatron-Bridge keep padded rows in the softmax;
``megatron.mask_padded_vocab: false`` keeps that behaviour in ``layerfreeze train``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["mask_padded_vocab", "masked_vocab_size", "unmask_padded_vocab"]

#: attribute of an output layer carrying ``(vocab_size, hook handle)`` once masked
_ATTR = "_layerfreeze_vocab_mask"


def _output_layers(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    """The output layers of ``model`` (a GPTModel, its DDP / Float16 wrappers, or a list of
    virtual-pipeline chunks); chunks without one (not the last stage) are skipped."""
    from layerfreeze.engines.common import unwrap_module

    items = list(model) if isinstance(model, (list, tuple, nn.ModuleList)) else [model]
    out = []
    for item in items:
        inner = unwrap_module(item, stop_at="decoder")
        layer = getattr(inner, "output_layer", None)
        if layer is not None and getattr(inner, "post_process", True):
            out.append(layer)
    return out


def _tp_rank_size(layer: nn.Module) -> tuple[int, int]:
    group = getattr(layer, "tp_group", None)
    if group is None:
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    from megatron.core.utils import get_pg_rank, get_pg_size

    return get_pg_rank(group), get_pg_size(group)


def _hook(layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    vocab = layer.__dict__[_ATTR][0]
    logits, bias = output
    gather = kwargs.get("runtime_gather_output")
    if gather is None:
        gather = bool(getattr(layer, "gather_output", False))
    cols = logits.shape[-1]
    if gather:
        start = 0
    else:
        rank, _ = _tp_rank_size(layer)
        start = rank * cols  # megatron splits the vocabulary in contiguous equal blocks
    first_padded = vocab - start  # local column of the first padded row
    if first_padded >= cols:
        return None  # this rank owns no padded row
    keep = torch.arange(cols, device=logits.device) < max(first_padded, 0)
    masked = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
    return masked, bias


def mask_padded_vocab(model: nn.Module | Sequence[nn.Module], vocab_size: int) -> int:
    """Exclude the padded vocabulary rows (index >= ``vocab_size``) from the model's logits.

    Installs (idempotently) a forward hook on each output layer of ``model`` that sets the
    padded columns to ``torch.finfo(dtype).min``: they get probability exactly 0 in the loss's
    softmax (on every TP size and with megatron-core's fused cross entropy alike), no gradient,
    and never win in evaluation. Call it on the model a provider built, before or after the
    plan and DDP (hooks survive wrapping).

    Args:
        model: a ``GPTModel`` (wrapped or not) or the list of this rank's chunks.
        vocab_size: the real vocabulary (the tokenizer's / Hugging Face config's
            ``vocab_size``); rows from it up to the model's padded ``vocab_size`` are masked.

    Returns:
        The number of output layers on this rank now masked (0 on stages without one).

    Raises:
        ValueError: ``vocab_size`` is not in ``1 .. padded vocabulary``, or the output layer is
            already masked with another size.
    """
    from layerfreeze.engines.common import unwrap_module

    layers = _output_layers(model)
    items = list(model) if isinstance(model, (list, tuple, nn.ModuleList)) else [model]
    padded = max(
        (int(getattr(unwrap_module(i, stop_at="decoder"), "vocab_size", 0) or 0) for i in items),
        default=0,
    )
    if not isinstance(vocab_size, int) or vocab_size < 1 or (padded and vocab_size > padded):
        raise ValueError(
            f"mask_padded_vocab: vocab_size must be an integer in 1..{padded or '?'} (the "
            f"model's padded vocabulary), got {vocab_size!r}. Pass the tokenizer's vocabulary size."
        )
    for layer in layers:
        current = layer.__dict__.get(_ATTR)
        if current is not None:
            if current[0] != vocab_size:
                raise ValueError(
                    f"mask_padded_vocab: the output layer is already masked at vocab_size "
                    f"{current[0]}, got {vocab_size}. Call unmask_padded_vocab(model) first."
                )
            continue
        handle = layer.register_forward_hook(_hook, with_kwargs=True)
        layer.__dict__[_ATTR] = (vocab_size, handle)
    return len(layers)


def unmask_padded_vocab(model: nn.Module | Sequence[nn.Module]) -> None:
    """Remove :func:`mask_padded_vocab`'s hooks (megatron-core's behaviour again)."""
    for layer in _output_layers(model):
        current = layer.__dict__.pop(_ATTR, None)
        if current is not None:
            current[1].remove()


def masked_vocab_size(model: nn.Module | Sequence[nn.Module]) -> int | None:
    """The ``vocab_size`` the output layer of ``model`` is masked at, or None (not masked, or
    no output layer on this rank)."""
    for layer in _output_layers(model):
        current = layer.__dict__.get(_ATTR)
        if current is not None:
            return int(current[0])
    return None
