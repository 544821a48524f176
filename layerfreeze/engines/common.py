"""Engine-neutral pieces every runner shares: NaN/Inf agreement, the default loss, and which
parameters an earlier plan-schedule phase trained.

No engine imports here (torch and torch.distributed only), so the DeepSpeed and Megatron
adapters stay thin and agree on semantics: a micro-batch is bad on every rank when its loss is
NaN/Inf on any rank of ``group``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from layerfreeze.utils.dist import is_dist

__all__ = ["agree_finite", "default_loss", "trained_then_frozen", "unwrap_module"]


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
