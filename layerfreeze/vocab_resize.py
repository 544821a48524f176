"""Resizing a model's embedding and output head to an extended tokenizer (new ids appended).

After ``layerfreeze tokenizer extend`` (:mod:`layerfreeze.data.vocab_extend`) the new tokenizer
keeps every old id and appends the new pieces after them. :func:`resize_for_new_tokens` grows
the input embedding and the output head (tied or untied) to the new vocabulary with
transformers' public ``resize_token_embeddings(new_size, mean_resizing=False)`` and then writes
each new row:

- ``init="subtoken_mean"`` (default): the new id is decoded with the new tokenizer, the string is
  encoded with the old tokenizer without special tokens, and the new row is the mean of the
  rows of those old sub-tokens (the embedding rows for the embedding, the head rows for an
  untied head). A string the old tokenizer encodes to nothing falls back to the plain mean
  (counted in the report).
- ``init="mean"``: every new row is the mean of the old tokens' rows (ids below
  ``len(old_tokenizer)``).

Rows of the old ids are bit-identical afterwards. Means are computed in float32 and cast to the
weight's dtype. Under DeepSpeed ZeRO-3 (a model loaded with a live ``HfDeepSpeedConfig``, so
transformers' resize gathers the partitions) the rows are written on gathered weights; call it
on every rank. Megatron's vocabulary-parallel embedding is not handled here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.integrations import is_deepspeed_zero3_enabled

from layerfreeze.engines.partition import full_shape, gathered, is_partition_managed

INITS = ("subtoken_mean", "mean")


@dataclass(frozen=True)
class ResizeReport:
    """What :func:`resize_for_new_tokens` did.

    Attributes:
        old_rows: embedding rows before.
        new_rows: embedding rows after.
        first_new_id: first id that was initialised (``len(old_tokenizer)``).
        initialised: number of rows written (``len(new_tokenizer) - len(old_tokenizer)``).
        init: the init used.
        tied: whether the output head shares the embedding's weight.
        fallback_to_mean: ids whose string the old tokenizer encodes to no token (plain mean).
    """

    old_rows: int
    new_rows: int
    first_new_id: int
    initialised: int
    init: str
    tied: bool
    fallback_to_mean: tuple[int, ...]


def _check_prefix(old_tokenizer: Any, new_tokenizer: Any) -> None:
    old_vocab, new_vocab = old_tokenizer.get_vocab(), new_tokenizer.get_vocab()
    for tok, idx in old_vocab.items():
        if new_vocab.get(tok) != idx:
            raise ValueError(
                f"new_tokenizer: old token {tok!r} has id {idx} in the old tokenizer but "
                f"{new_vocab.get(tok)!r} in the new one. Resize only to a tokenizer that keeps "
                "every old id (as `layerfreeze tokenizer extend` writes)."
            )


def subtoken_ids(old_tokenizer: Any, new_tokenizer: Any, new_id: int) -> list[int]:
    """Old-tokenizer ids of the string that ``new_id`` stands for in the new tokenizer.

    Args:
        old_tokenizer: the tokenizer the model was trained with.
        new_tokenizer: the extended tokenizer.
        new_id: an id of the new tokenizer.

    Returns:
        ``old_tokenizer.encode(new_tokenizer.decode([new_id]), add_special_tokens=False)``.
    """
    text = new_tokenizer.decode([new_id])
    return list(old_tokenizer.encode(text, add_special_tokens=False))




def resize_for_new_tokens(
    model: Any,
    old_tokenizer: Any,
    new_tokenizer: Any,
    init: str = "subtoken_mean",
) -> ResizeReport:
    """Grow ``model``'s embedding and output head to ``new_tokenizer`` and initialise new rows.

    Args:
        model: a transformers ``PreTrainedModel`` (causal LM) whose embedding has at least
            ``len(old_tokenizer)`` rows (ZeRO-3 partitioned: call on every rank).
        old_tokenizer: the tokenizer the model was trained with.
        new_tokenizer: the same tokenizer with new tokens appended (every old id kept).
        init: ``"subtoken_mean"`` or ``"mean"`` (see the module docstring).

    Returns:
        A :class:`ResizeReport`.

    Raises:
        ValueError: an unknown ``init``, a new tokenizer that drops or moves an old id or is
            smaller than the old one, an embedding smaller than the old tokenizer, or ZeRO-3
            parameters without transformers' ZeRO-3 integration.
    """
    if init not in INITS:
        raise ValueError(f"init: unknown init {init!r}. Valid: {', '.join(INITS)}.")
    n_old, n_new = len(old_tokenizer), len(new_tokenizer)
    if n_new < n_old:
        raise ValueError(
            f"new_tokenizer: has {n_new} tokens, fewer than the old tokenizer's {n_old}. "
            "Pass the extended tokenizer as new_tokenizer and the base one as old_tokenizer."
        )
    _check_prefix(old_tokenizer, new_tokenizer)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if is_partition_managed(emb.weight) and not is_deepspeed_zero3_enabled():
        raise ValueError(
            "model: the embedding is a DeepSpeed ZeRO-3 parameter but transformers' ZeRO-3 "
            "integration is off (no live HfDeepSpeedConfig), so resize_token_embeddings cannot "
            "gather it. Keep an HfDeepSpeedConfig alive while loading and resizing the model."
        )
    old_rows = full_shape(emb.weight)[0]
    if old_rows < n_old:
        raise ValueError(
            f"model: the embedding has {old_rows} rows, fewer than the old tokenizer's "
            f"{n_old} tokens. Pass the tokenizer the model was trained with as old_tokenizer."
        )
    tied = head is not None and head.weight is emb.weight

    # Sub-token ids per new id, computed before any change (pure tokenizer work).
    new_ids = list(range(n_old, n_new))
    subs: dict[int, list[int]] = {}
    fallback: list[int] = []
    if init == "subtoken_mean":
        for i in new_ids:
            ids = subtoken_ids(old_tokenizer, new_tokenizer, i)
            if ids:
                subs[i] = ids
            else:
                fallback.append(i)
    else:
        fallback = new_ids

    if n_new > old_rows:
        model.resize_token_embeddings(n_new, mean_resizing=False)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    targets = [emb.weight]
    if head is not None and not tied:
        targets.append(head.weight)
    bias = getattr(head, "bias", None) if head is not None else None
    # ZeRO-3 (parameters still partitioned, e.g. no growth was needed): write on a gathered
    # copy, rank 0's values broadcast; a no-op for plain parameters (transformers' resize
    # builds plain ones).
    with gathered([*targets, *([bias] if bias is not None else [])], modifier_rank=0), \
            torch.no_grad():
        for weight in targets:
            old = weight[:n_old].float()
            mean = old.mean(dim=0)
            for i in new_ids:
                row = old[subs[i]].mean(dim=0) if i in subs else mean
                weight[i] = row.to(weight.dtype)
        if bias is not None and bias.shape[0] >= n_new:
            old_b = bias[:n_old].float()
            for i in new_ids:
                val = old_b[subs[i]].mean() if i in subs else old_b.mean()
                bias[i] = val.to(bias.dtype)
    return ResizeReport(
        old_rows=old_rows,
        new_rows=full_shape(model.get_input_embeddings().weight)[0],
        first_new_id=n_old,
        initialised=len(new_ids),
        init=init,
        tied=tied,
        fallback_to_mean=tuple(fallback),
    )
