"""Hooks for existing Megatron-LM scripts: a plan-applying model provider and optimizer overrides.

Two lines change in a ``pretrain_gpt.py``-style script (see ``docs/megatron.md``)::

    from layerfreeze.megatron import optimizer_overrides, plan_model_provider

    model_provider = plan_model_provider(model_provider, "freeze_deep")   # 1. before pretrain()
    ...
    optimizer = get_megatron_optimizer(                                    # 2. where it is built
        opt_config, model, config_overrides=optimizer_overrides(model, opt_config))

:func:`plan_model_provider` wraps the provider ``get_model`` calls once per virtual-pipeline
chunk: it passes through whatever it is given (old ``(pre_process, post_process)`` and new
``(pre_process, post_process, vp_stage, config, pg_collection)`` styles), then applies the plan
to the returned ``GPTModel`` by *global* layer index (:func:`megatron_layout`), before
Megatron wraps it in DDP and builds the optimizer. :func:`optimizer_overrides` turns the plan's
optimizer groups (per-policy lr scale, weight decay, no decay on norms / biases / gates) into
``get_megatron_optimizer``'s ``config_overrides``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from layerfreeze.engines.common import unwrap_module
from layerfreeze.utils.logging import get_logger, log_rank0

__all__ = [
    "apply_megatron_plan",
    "load_base_checkpoint",
    "optimizer_overrides",
    "plan_model_provider",
]

logger = get_logger(__name__)

#: attribute of a provider-built model holding its ``AppliedPlan``
APPLIED_ATTR = "layerfreeze_applied"


def apply_megatron_plan(
    model: nn.Module | Sequence[nn.Module], plan: Any, *, install: Sequence[Any] = ()
) -> Any:
    """Apply ``plan`` (and install the adapters of ``install``) to a megatron ``GPTModel`` stage
    or the list of its virtual-pipeline chunks, addressing layers by global index.

    Args:
        model: a ``GPTModel`` (not yet DDP-wrapped), a list of chunks, or
            ``chunks_module(chunks)``.
        plan: any plan spec ``LayerPlan.parse`` accepts.
        install: further plans whose adapters must exist (later schedule phases).

    With activation recomputation configured, the embedding output is made to require grad
    (:func:`~layerfreeze.engines.megatron.recompute.prepare_recompute`), so adapters above
    frozen embeddings get gradients through megatron's reentrant checkpoint.

    Returns:
        The ``AppliedPlan`` (its ``model`` is the GPTModel, or a ``ModuleList`` of the chunks).
    """
    from layerfreeze.apply import apply_plan
    from layerfreeze.engines.megatron.layout import chunks_module, megatron_layout
    from layerfreeze.engines.megatron.recompute import prepare_recompute

    if isinstance(model, (list, tuple)):
        model = chunks_module(model) if len(model) > 1 else model[0]
    chunks = list(model) if isinstance(model, nn.ModuleList) else model
    applied = apply_plan(
        model, plan, install=tuple(install), layout=megatron_layout(chunks), log=False
    )
    prepare_recompute(chunks)
    chunk_list = chunks if isinstance(chunks, list) else [chunks]
    log_rank0(logger, "%s", plan_totals_line(applied, chunk_list))
    return applied


def _local_counts(applied: Any, chunks: Sequence[nn.Module]) -> tuple[int, int]:
    """(trainable, total) parameter elements of this rank that no other rank of its model
    replica also counts: a tensor-parallel shard counts on every TP rank, a TP-replicated
    tensor on TP rank 0 only, and the last stage's copy of tied embeddings not at all."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    copies = set()
    for chunk in chunks:
        m = unwrap_module(chunk, stop_at="decoder")
        tied = getattr(m, "share_embeddings_and_output_weights", False)
        if tied and getattr(m, "post_process", False) and not getattr(m, "pre_process", False):
            copies.add(id(m.output_layer.weight))
    trainable = total = 0
    for p in applied.model.parameters():
        if id(p) in copies or not param_is_not_tensor_parallel_duplicate(p):
            continue
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    out: list[str] = []
    for i in sorted(indices):
        if out and i == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ", ".join(out)


def _stage_parts(applied: Any) -> str:
    """What this rank's stage holds: its global layers (as ranges) and the other modules."""
    layout = applied.layout
    parts = [f"layers {_ranges([x.index for x in layout.layers])}"] if layout.layers else []
    if any("word_embeddings" in e for e in layout.embeddings):
        parts.append("embeddings")
    if layout.final_norm:
        parts.append("final norm")
    if layout.lm_head:
        parts.append("output layer")
    return ", ".join(parts) or "nothing"


def plan_totals_line(applied: Any, chunks: Sequence[nn.Module]) -> str:
    """The ``plan applied`` line with model-wide totals and what each pipeline stage holds.

    A collective over the world when a process group is up (every rank must call it): each
    rank's de-duplicated counts (:func:`_local_counts`) are gathered, the first data-parallel
    replica's are summed over its tensor-parallel ranks per pipeline stage and over stages.
    """
    import torch.distributed as dist

    trainable, total = _local_counts(applied, chunks)
    mine = {"dp": 0, "pp": 0, "tp": 0, "counts": (trainable, total), "holds": _stage_parts(applied)}
    rows = [mine]
    if dist.is_available() and dist.is_initialized():
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            mine.update(
                dp=ps.get_data_parallel_rank(),
                pp=ps.get_pipeline_model_parallel_rank(),
                tp=ps.get_tensor_model_parallel_rank(),
            )
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, mine)
    stages: dict[int, list[int]] = {}
    holds: dict[int, str] = {}
    for r in rows:
        if r["dp"] != 0:  # the other replicas hold the same model
            continue
        t = stages.setdefault(r["pp"], [0, 0])
        t[0] += r["counts"][0]
        t[1] += r["counts"][1]
        if r["tp"] == 0:
            holds[r["pp"]] = r["holds"]
    tp_size = sum(1 for r in rows if r["dp"] == 0 and r["pp"] == 0)
    all_t = sum(t for t, _ in stages.values())
    all_n = sum(n for _, n in stages.values())
    line = (
        f"plan applied: {applied.plan} ({all_t} of {all_n} parameters trainable, model-wide: "
        f"{len(stages)} pipeline stage(s) x {tp_size} tensor-parallel rank(s))"
    )
    if len(stages) > 1:
        line += "; " + "; ".join(
            f"stage {pp}: {holds.get(pp, '?')} ({t} of {n} trainable)"
            for pp, (t, n) in sorted(stages.items())
        )
    return line


def plan_model_provider(
    model_provider: Callable[..., nn.Module], plan: Any, *, vocab_size: int | None = None
) -> Callable[..., nn.Module]:
    """Wrap a Megatron-LM model provider so every model it builds trains under ``plan``.

    Args:
        model_provider: the script's provider, any signature (``(pre_process=True,
            post_process=True)``, ``(pre_process, post_process, vp_stage=None, config=None,
            pg_collection=None)``, ...). Arguments are passed through unchanged.
        plan: a plan spec (``"freeze_deep"``, a dict, a ``LayerPlan``) or a ``PlanSchedule``
            spec. For a schedule, phase 0 is applied and every phase's adapters are installed;
            phase switches need :class:`~layerfreeze.engines.megatron.runner.MegatronRunner`
            (Megatron-LM's ``pretrain`` builds DDP and the optimizer once).
        vocab_size: the tokenizer's real vocabulary. Given, the padded vocabulary rows are kept
            out of the softmax (:func:`~layerfreeze.engines.megatron.vocab.mask_padded_vocab`):
            the loss and logits are the Hugging Face model's. None keeps megatron-core's
            behaviour (padded rows at logit 0 in the softmax).

    Returns:
        A provider with the same call signature; the model it returns carries its
        ``AppliedPlan`` as ``model.layerfreeze_applied`` (read by :func:`optimizer_overrides`).
    """
    from layerfreeze.schedule import PlanSchedule

    is_schedule = (
        isinstance(plan, Sequence)
        and not isinstance(plan, (str, Mapping))
        and all(isinstance(p, Mapping) and "plan" in p for p in plan)
    )
    if isinstance(plan, PlanSchedule) or is_schedule:
        schedule = PlanSchedule.parse(plan)
        first, rest = schedule.plans[0], tuple(schedule.plans[1:])
    else:
        first, rest = plan, ()

    @functools.wraps(model_provider)
    def provider(*args: Any, **kwargs: Any) -> nn.Module:
        model = model_provider(*args, **kwargs)
        inner = unwrap_module(model, stop_at="decoder")
        if vocab_size is not None:  # new_rows trains real rows only, never the padding
            from layerfreeze.engines.megatron.new_rows import record_vocab_size

            record_vocab_size(inner, vocab_size)
        applied = apply_megatron_plan(inner, first, install=rest)
        inner.__dict__[APPLIED_ATTR] = applied
        if vocab_size is not None:
            from layerfreeze.engines.megatron.vocab import mask_padded_vocab

            mask_padded_vocab(inner, vocab_size)
        return model

    return provider


def _applied_plans(model: Any) -> list[Any]:
    if hasattr(model, "param_groups") and hasattr(model, "layout"):  # an AppliedPlan
        return [model]
    items = list(model) if isinstance(model, (list, tuple, nn.ModuleList)) else [model]
    out = []
    for item in items:
        if hasattr(item, "param_groups") and hasattr(item, "layout"):
            out.append(item)
            continue
        applied = unwrap_module(item, stop_at="decoder").__dict__.get(APPLIED_ATTR)
        if applied is None:
            raise ValueError(
                f"optimizer_overrides: {type(item).__name__} carries no layer plan. Build the "
                "model with plan_model_provider(model_provider, plan), or pass the AppliedPlan."
            )
        out.append(applied)
    return out


def optimizer_overrides(
    model_or_applied: Any,
    config: Any = None,
    *,
    lr: float | None = None,
    min_lr: float | None = None,
    weight_decay: float | None = None,
) -> dict[Any, dict[str, float]]:
    """``config_overrides`` for ``get_megatron_optimizer`` from the plan's optimizer groups.

    One ``ParamKey`` per group (matching its parameters by identity, so DDP's ``module.`` name
    prefix does not matter) -> ``ParamGroupOverride`` with ``lr_mult`` (the policy's lr scale),
    ``max_lr`` / ``min_lr`` (scaled, what megatron-core 0.16's ``OptimizerParamScheduler``
    reads) and ``wd_mult`` (or ``start_wd`` / ``end_wd`` when the base weight decay is 0).
    Norms, biases, 1-D tensors and gates get no decay, as on every engine. Passing overrides
    replaces Megatron's default ones; every trainable parameter is covered here.

    Args:
        model_or_applied: model chunks built by :func:`plan_model_provider` (DDP-wrapped or
            not), one such model, an ``AppliedPlan`` or a list of them.
        config: the ``OptimizerConfig`` (its ``lr``, ``min_lr``, ``weight_decay`` are the
            defaults of the next three arguments).
        lr: base learning rate.
        min_lr: base minimum learning rate (default 0).
        weight_decay: default weight decay (default 0).

    Returns:
        ``{ParamKey: ParamGroupOverride}``.

    Raises:
        ValueError: no lr given, or a model without a plan.
    """
    from megatron.core.optimizer import ParamKey, ParamPredicate

    lr = lr if lr is not None else getattr(config, "lr", None)
    if lr is None:
        raise ValueError("optimizer_overrides: pass config= (an OptimizerConfig) or lr=.")
    min_lr = min_lr if min_lr is not None else (getattr(config, "min_lr", None) or 0.0)
    weight_decay = (
        weight_decay if weight_decay is not None else float(getattr(config, "weight_decay", 0.0))
    )
    groups: dict[tuple[str, float, float], set[int]] = {}
    for applied in _applied_plans(model_or_applied):
        for g in applied.param_groups(1.0, weight_decay):
            key = (str(g["name"]), float(g.get("lr_scale", 1.0)), float(g["weight_decay"]))
            groups.setdefault(key, set()).update(id(p) for p in g["params"])
    out: dict[Any, dict[str, float]] = {}
    for (name, scale, wd), ids in groups.items():
        frozen_ids = frozenset(ids)
        override: dict[str, float] = {
            "lr_mult": scale,
            "max_lr": float(lr) * scale,
            "min_lr": float(min_lr) * scale,
        }
        if weight_decay > 0:
            override["wd_mult"] = wd / weight_decay
        else:
            override.update({"wd_mult": 1.0, "start_wd": wd, "end_wd": wd})
        predicate = ParamPredicate(
            name=f"layerfreeze:{name}", fn=lambda p, ids=frozen_ids: id(p) in ids
        )
        out[ParamKey(predicate=predicate)] = override
    return out


def load_base_checkpoint(model: nn.Module, directory: str) -> list[str]:
    """Load a megatron-core distributed checkpoint of the model *without* adapters (a
    pretrained base, ``torch_dist``) into a model that already carries a plan.

    Every tensor the model declares (``model.sharded_state_dict()``) is loaded, at any TP/PP
    layout; the adapter tensors, and only those, may be absent from the checkpoint (a base
    checkpoint has none) and then keep their values (LoRA ``B`` and gates start at zero, so the
    planned model computes the base model). A checkpoint that holds the adapters (one saved
    from a planned model) loads them too. A collective call: every rank of the model calls it.

    Args:
        model: the planned ``GPTModel`` of this rank (DDP / Float16 wrappers are unwrapped).
        directory: the checkpoint directory (``dist_checkpointing.save`` output).

    Returns:
        The state-dict keys loaded.

    Raises:
        ValueError: the checkpoint lacks a tensor that is not an adapter's (named, with the
            number of others), or a loaded tensor's shape differs from the model's.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from layerfreeze.apply import adapter_param_names
    from layerfreeze.engines.megatron.sharded import load_sharded_into

    inner = unwrap_module(model, stop_at="decoder")
    names = set(adapter_param_names(inner))
    adapters = {id(p) for n, p in inner.named_parameters() if n in names}
    saved = set(dist_checkpointing.load_tensors_metadata(directory))
    sharded = inner.sharded_state_dict()
    missing_base, keep = [], {}
    for name, v in sharded.items():
        if isinstance(v, (ShardedTensor, ShardedTensorFactory)) and v.key not in saved:
            if id(getattr(v, "data", None)) in adapters:
                continue  # an adapter tensor a base checkpoint cannot hold
            missing_base.append(v.key)
        keep[name] = v
    if missing_base:
        more = f" (and {len(missing_base) - 1} more)" if len(missing_base) > 1 else ""
        raise ValueError(
            f"{directory}: the checkpoint has no {sorted(missing_base)[0]}{more}, which is not "
            "an adapter tensor (only adapter tensors may be absent from a base checkpoint). "
            "Load a checkpoint of the same architecture and layer count."
        )
    return load_sharded_into(inner, keep, directory)
