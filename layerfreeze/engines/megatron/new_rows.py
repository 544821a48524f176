"""The ``new_rows`` part policy on megatron's vocabulary-parallel embedding and output layer.

``embeddings: new_rows(from_id=N)`` / ``lm_head: new_rows(from_id=N)`` train only the token rows
``N .. vocab_size - 1`` (never megatron's padded rows past the real vocabulary), as on the
Hugging Face engines (:mod:`layerfreeze.policies.new_rows`): the full weight stays frozen and
the rows live in a separate parameter ``new_rows_weight`` on the ``VocabParallelEmbedding`` /
``ColumnParallelLinear`` output layer.

Tensor parallelism. The vocabulary is split over the TP ranks in contiguous blocks; the new rows
straddle them. ``new_rows_weight`` holds *all* new rows on every TP rank (replicated, like a
layer norm: not ``tensor_model_parallel``, so megatron's gradient-norm counts it once and the
checkpoints store it once); each rank puts its block's part into the output:

* embedding: the hook replaces the (already TP-reduced) output of the tokens ``>= N`` by their
  row of ``new_rows_weight``; every TP rank computes the same values and the same gradient;
* output layer: the hook replaces this rank's logit columns ``[max(N, start), min(vocab, end))``
  by ``x @ rows.T``, where ``x`` and the parameter go through megatron's
  ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce of the gradient over
  TP): the input gradient of those columns reaches every rank and the parameter's gradient is
  the sum of the ranks' slices, equal on every TP rank.

Optimizer state exists for ``new_rows_weight`` only (the old rows get no state and no weight
decay). :func:`~layerfreeze.policies.new_rows.merge_new_rows` writes each rank's intersection
into its shard (the merged HF export). A tied output layer at PP=1 reads the embedding's
parameter. Refused (one line each): sequence parallelism, tied embeddings on a multi-stage
pipeline, a model whose real vocabulary is unknown (the recipe records it with
:func:`record_vocab_size`; ``plan_model_provider(..., vocab_size=)`` too).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layerfreeze.policies import new_rows as nr

__all__ = ["record_vocab_size", "register", "vocab_size_of"]

#: attribute of a ``GPTModel`` holding its real (unpadded) vocabulary size
_VOCAB_ATTR = "_layerfreeze_vocab_size"


def _gpt_models(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    from megatron.core.models.gpt import GPTModel

    from layerfreeze.engines.common import unwrap_module

    items = list(model) if isinstance(model, (list, tuple, nn.ModuleList)) else [model]
    out = []
    for item in items:
        inner = unwrap_module(item, stop_at="decoder")
        if isinstance(inner, GPTModel):
            out.append(inner)
    return out


def record_vocab_size(model: nn.Module | Sequence[nn.Module], vocab_size: int) -> None:
    """Record the real vocabulary (the Hugging Face ``vocab_size``) on every ``GPTModel`` of
    ``model`` (a model, its wrappers or a list of chunks), so ``new_rows`` never trains the rows
    megatron pads past it.

    Raises:
        ValueError: ``vocab_size`` is not in ``1 .. the padded vocabulary``.
    """
    for gpt in _gpt_models(model):
        padded = int(gpt.vocab_size)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or \
                not 1 <= vocab_size <= padded:
            raise ValueError(
                f"record_vocab_size: vocab_size must be an integer in 1..{padded} (the model's "
                f"padded vocabulary), got {vocab_size!r}. Pass the tokenizer's vocabulary size."
            )
        gpt.__dict__[_VOCAB_ATTR] = vocab_size


def vocab_size_of(gpt: nn.Module) -> int | None:
    """The real vocabulary of a ``GPTModel``: recorded, else the padded-vocabulary mask's."""
    from layerfreeze.engines.megatron.vocab import masked_vocab_size

    n = gpt.__dict__.get(_VOCAB_ATTR)
    return int(n) if n is not None else masked_vocab_size(gpt)


def _tp(module: nn.Module) -> tuple[Any, int, int]:
    from megatron.core.utils import get_pg_rank, get_pg_size

    group = module.tp_group
    return group, get_pg_rank(group), get_pg_size(group)


def _embedding_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    state = module.__dict__[nr._STATE]
    start, stop = state["from_id"], state["stop"]
    ids = args[0]
    mask = (ids >= start) & (ids < stop)
    rows = F.embedding((ids - start).clamp(0, stop - start - 1), getattr(module, nr.PARAM))
    return torch.where(mask.unsqueeze(-1), rows.to(output.dtype), output)


def _head_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    owner = module.__dict__[_HEAD_ATTR]
    state = owner.__dict__[nr._STATE]
    start, stop = state["from_id"], state["stop"]
    logits, bias = output
    gather = kwargs.get("runtime_gather_output")
    if gather is None:
        gather = bool(getattr(module, "gather_output", False))
    group, rank, _ = _tp(module)
    cols = logits.shape[-1]
    first = 0 if gather else rank * cols  # global id of this rank's first column
    lo = max(start, first)
    hi = max(lo, min(stop, first + cols))  # [lo, hi): new rows in this block (maybe none)
    x = args[0] if args else kwargs["input_"]
    param = getattr(owner, nr.PARAM)
    if not gather:
        # also on a rank without new rows (an empty tail): the backward all-reduces of the
        # copies are collectives every TP rank must join
        x = copy_to_tensor_model_parallel_region(x, group=group)
        param = copy_to_tensor_model_parallel_region(param, group=group)
    elif lo == hi:
        return None
    # GPTModel's output layer has no bias (megatron-core builds it with bias=False)
    tail = F.linear(x, param[lo - start : hi - start].to(x.dtype)).to(logits.dtype)
    out = torch.cat([logits[..., : lo - first], tail, logits[..., hi - first :]], dim=-1)
    return out, bias


#: attribute of an output layer: the module whose ``new_rows_weight`` its hook reads
_HEAD_ATTR = "_layerfreeze_new_rows_owner"


def _gather_rows(module: nn.Module, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of a vocabulary-parallel weight (collective over the TP group)."""
    import torch.distributed as dist

    group, _, world = _tp(module)
    local = module.weight.detach()
    if world > 1:
        shards = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(shards, local.contiguous(), group=group)
        local = torch.cat(shards, dim=0)
    return local[start:stop].clone()


def _embedding_sharded_state_dict(module, prefix="", sharded_offsets=(), metadata=None):
    """megatron's embedding state dict (the weight) plus ``new_rows_weight``, replicated."""
    from megatron.core.utils import get_pg_rank

    from layerfreeze.engines.megatron.sharded import _groups, _replicated

    _, dp_cp = _groups(module.tp_group, metadata)
    metadata = {**(metadata or {}), "dp_cp_group": dp_cp}
    out = type(module).sharded_state_dict(module, prefix, sharded_offsets, metadata)
    _, rank, _ = _tp(module)
    key = f"{prefix}{nr.PARAM}"
    out[key] = _replicated(getattr(module, nr.PARAM), key, rank, get_pg_rank(dp_cp))
    return out


def _install(module: nn.Module, from_id: int, stop: int, kind: str) -> nn.Parameter:
    """``new_rows_weight`` (rows ``from_id:stop``, gathered over TP) and the hook on ``module``
    (``kind``: ``"embedding"`` or ``"head"``)."""
    state = module.__dict__.get(nr._STATE)
    if state is not None:  # installed by an earlier plan of the schedule (same from_id: checked)
        return getattr(module, nr.PARAM)
    param = nn.Parameter(_gather_rows(module, from_id, stop))
    module.register_parameter(nr.PARAM, param)
    _, rank, _ = _tp(module)
    per = module.weight.shape[0]
    first = rank * per
    lo = max(from_id, first)
    hi = max(lo, min(stop, first + per))  # [lo, hi): this shard's new rows (maybe none)
    if kind == "embedding":
        hook = module.register_forward_hook(_embedding_hook)
        module.sharded_state_dict = _embedding_sharded_state_dict.__get__(module)
    else:
        hook = _attach_head(module, module)
    module.__dict__[nr._STATE] = {
        "from_id": from_id, "stop": stop, "hook": hook, "orig": None,
        "rows": (slice(lo - first, hi - first), slice(lo - from_id, hi - from_id)),
    }
    return param


def _attach_head(head: nn.Module, owner: nn.Module) -> Any:
    if _HEAD_ATTR in head.__dict__:
        return None
    head.__dict__[_HEAD_ATTR] = owner
    return head.register_forward_hook(_head_hook, with_kwargs=True)


class _MegatronNewRows:
    """The handler :func:`layerfreeze.policies.new_rows.register_new_rows_engine` takes."""

    @staticmethod
    def owns(model: nn.Module) -> bool:
        return bool(_gpt_models(model))

    @staticmethod
    def check(model: nn.Module, layout: Any, part: str, from_id: int, where: str) -> list[str]:
        problems = []
        for gpt in _gpt_models(model):
            cfg = gpt.config
            if getattr(cfg, "sequence_parallel", False):
                problems.append(
                    f"{where}: new_rows is not supported with megatron.sequence_parallel: true. "
                    "Set sequence_parallel: false or use freeze / full for this part."
                )
            if layout.tied_embeddings and int(cfg.pipeline_model_parallel_size or 1) > 1:
                problems.append(
                    f"{where}: new_rows on tied embeddings is not supported with pipeline "
                    f"parallelism (pipeline_model_parallel_size "
                    f"{cfg.pipeline_model_parallel_size}). Use pipeline_model_parallel_size: 1 "
                    "or an untied model."
                )
            vocab = vocab_size_of(gpt)
            if vocab is None:
                problems.append(
                    f"{where}: new_rows needs the megatron model's real vocabulary size (its "
                    f"{gpt.vocab_size} rows may include TP padding). Call layerfreeze.engines."
                    "megatron.new_rows.record_vocab_size(model, len(tokenizer)) (or "
                    "mask_padded_vocab) before applying the plan."
                )
            elif not 0 <= from_id < vocab:
                problems.append(
                    f"{where}: new_rows from_id={from_id} is out of range for a {vocab}-token "
                    f"vocabulary (valid 0-{vocab - 1}; rows from {vocab} are megatron's padding)."
                    " Set from_id to len(old tokenizer) after resizing."
                )
            if problems:
                break
        return problems

    @staticmethod
    def install(model: nn.Module, layout: Any, resolved: Any, path: str) -> None:
        emb, head = resolved.embeddings, resolved.lm_head
        for gpt in _gpt_models(model):
            stop = vocab_size_of(gpt)
            words = getattr(getattr(gpt, "embedding", None), "word_embeddings", None)
            has_emb = bool(getattr(gpt, "pre_process", False)) and words is not None
            out = getattr(gpt, "output_layer", None)
            has_head = bool(getattr(gpt, "post_process", False)) and out is not None
            tied = bool(getattr(gpt, "share_embeddings_and_output_weights", False))
            if emb.name == "new_rows" and has_emb:
                _install(words, emb.options.from_id, stop, "embedding")
                if tied and has_head:
                    _attach_head(out, words)
            if head.name == "new_rows" and has_head and not tied:
                _install(out, head.options.from_id, stop, "head")


_HANDLER = _MegatronNewRows()


def register() -> None:
    """Register the megatron handler of ``new_rows`` (idempotent)."""
    nr.register_new_rows_engine(_HANDLER)
