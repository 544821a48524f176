"""Engine-neutral pieces every runner shares: NaN/Inf agreement, the default loss, and which
parameters an earlier plan-schedule phase trained.

No engine imports here (torch and torch.distributed only), so the DeepSpeed and Megatron
adapters stay thin and agree on semantics: a micro-batch is bad on every rank when its loss is
NaN/Inf on any rank of ``group``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from layerfreeze.utils.dist import is_dist

__all__ = [
    "agree_finite",
    "commit_engine_checkpoint",
    "default_loss",
    "maybe_switch_phase",
    "trained_then_frozen",
    "unwrap_module",
]


def agree_finite(loss: torch.Tensor, group: Any = None) -> tuple[bool, float]:
    """Whether the micro-batch is bad (NaN/Inf loss on some rank of ``group``), and the mean
    finite loss over the group's ranks (collective when distributed).

    Args:
        loss: this rank's scalar loss.
        group: process group to agree over (default: the world, i.e. all data-parallel ranks).

    Returns:
        ``(bad, mean_loss)``, identical on every rank of ``group``.
    """
    value = float(loss.detach().float())
    finite = math.isfinite(value)
    t = torch.tensor([value if finite else 0.0, 0.0 if finite else 1.0], dtype=torch.float64)
    size = 1
    if is_dist():
        t = t.to(loss.device)
        dist.all_reduce(t, group=group)
        size = dist.get_world_size(group)
    return float(t[1]) > 0, float(t[0]) / max(1, size)


def default_loss(model: Any, micro_batch: Mapping[str, Any]) -> torch.Tensor:
    """``model(**micro_batch).loss`` (Hugging Face causal LMs with ``labels`` in the batch)."""
    out = model(**micro_batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            "train_step: the model returned no .loss; put 'labels' in the micro-batch or pass loss_fn=."
        )
    return loss


def trained_then_frozen(applied: Any, schedule: Any, phase: int) -> list[str]:
    """Parameters an earlier phase of ``schedule`` trained that ``phase`` freezes (they differ
    from the base checkpoint, so a trainable-only checkpoint must keep them).

    Side-effect free: reads the plans' trainable names without touching ``requires_grad``.
    """
    now = set(applied.trainable_names_for(schedule.plans[phase]))
    earlier: set[str] = set()
    plans = schedule.plans[:phase]
    for plan in {id(p): p for p in plans}.values():  # rotating schedules' phases share plans
        earlier |= set(applied.trainable_names_for(plan))
    return sorted(earlier - now)


def unwrap_module(module: Any, stop_at: str | None = None) -> Any:
    """The module under its training wrappers (torch DDP, a DeepSpeed engine, Megatron's DDP and
    ``Float16Module``): follows ``.module`` while it is an ``nn.Module``.

    Args:
        module: a module, possibly wrapped (anything else comes back as it is).
        stop_at: stop at the first module that has this attribute, even if it has a ``.module``
            (Megatron: ``"decoder"``, the ``GPTModel``).
    """
    while not (stop_at is not None and hasattr(module, stop_at)) and isinstance(
        getattr(module, "module", None), nn.Module
    ):
        module = module.module
    return module


def maybe_switch_phase(runner: Any, global_step: int | None = None) -> bool:
    """What both runners' ``maybe_switch_phase`` do: switch ``runner`` to the plan-schedule phase
    ``global_step`` falls in (default: its current step) when that is another phase, carrying
    optimizer state as the schedule says (``schedule.carry_state``).

    Returns:
        True when a switch happened.
    """
    step = runner.global_step if global_step is None else global_step
    target = runner.schedule.phase_at(step)
    if target == runner.phase:
        return False
    runner._switch_phase(target, carry=runner.schedule.carry_state)
    return True


def commit_engine_checkpoint(
    root: Path,
    staging: Path,
    step: int,
    build_meta: Callable[[], Any],
    *,
    run_meta: Mapping[str, Any] | None,
    keep_last: int | None,
    logger: Any,
) -> Path:
    """The collective end of both engines' ``save_checkpoint``, once every rank has staged its
    files: each rank hashes a share of them, global rank 0 commits the checkpoint atomically with
    the engine's :class:`~layerfreeze.checkpoint_meta.CheckpointMeta` (``build_meta()``, called
    on rank 0 only) and the run metadata, and every rank returns the committed directory.
    """
    from layerfreeze import checkpoint as ckpt
    from layerfreeze.checkpoint_meta import META_KEY
    from layerfreeze.resume import staged_checksums
    from layerfreeze.utils.dist import broadcast_object, get_rank
    from layerfreeze.utils.logging import log_rank0

    checksums = staged_checksums(staging)  # each rank hashes a share of the files
    committed = None
    if get_rank() == 0:
        info = ckpt.commit_checkpoint(
            root,
            staging,
            step,
            {META_KEY: build_meta().to_dict(), "run": dict(run_meta or {})},
            keep_last=keep_last,
            checksums=checksums,
        )
        committed = str(info.path)
    committed = broadcast_object(committed)
    log_rank0(logger, "saved checkpoint %s", committed)
    return Path(committed)
