"""Optimizer groups from an applied plan, and the learning-rate pieces every engine shares.

Engine-neutral: :class:`GroupSpec` names one optimizer group by parameter *names* (so it can be
stored in a checkpoint and rebuilt on a new engine after a plan-schedule phase switch);
:func:`group_specs` derives them from ``AppliedPlan.param_groups``; :class:`ScaledLRScheduler`
keeps each group's per-policy ``lr_scale`` under any scheduler; :func:`lr_factor` and
:class:`WarmupDecayLR` are the run config's warm-up + decay schedule in closed form. The DeepSpeed
and Megatron adapters build their optimizers from these.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layerfreeze.config import OptimConfig

__all__ = [
    "GroupSpec",
    "ScaledLRScheduler",
    "WarmupDecayLR",
    "assert_requires_grad_final",
    "build_param_groups",
    "group_specs",
    "lr_factor",
    "torch_groups",
]


@dataclass
class GroupSpec:
    """One optimizer group by parameter *names* (storable in a checkpoint)."""

    name: str
    lr_scale: float
    weight_decay: float
    params: list[str]
    step: int = 0  # Adam steps already taken by these params (carried over at a phase switch)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lr_scale": self.lr_scale,
            "weight_decay": self.weight_decay,
            "params": list(self.params),
            "step": self.step,
        }


def group_specs(
    applied: Any, weight_decay: float, steps: Mapping[str, int] | None = None
) -> list[GroupSpec]:
    """Group specs from ``applied.param_groups``; with ``steps``, split each group by step count."""
    names = {id(p): n for n, p in applied.model.named_parameters()}
    specs: list[GroupSpec] = []
    for g in applied.param_groups(1.0, weight_decay):
        pnames = [names[id(p)] for p in g["params"]]
        by_step: dict[int, list[str]] = {}
        for n in pnames:
            by_step.setdefault(int((steps or {}).get(n, 0)), []).append(n)
        for s in sorted(by_step):
            suffix = f"@{s}" if s and len(by_step) > 1 else ""
            specs.append(
                GroupSpec(
                    f"{g['name']}{suffix}",
                    float(g.get("lr_scale", 1.0)),
                    float(g["weight_decay"]),
                    by_step[s],
                    s,
                )
            )
    return specs


def torch_groups(model: nn.Module, specs: Sequence[GroupSpec], lr: float) -> list[dict[str, Any]]:
    params = dict(model.named_parameters())
    return [
        {
            "params": [params[n] for n in s.params],
            "lr": lr,
            "weight_decay": s.weight_decay,
            "lr_scale": s.lr_scale,
            "name": s.name,
        }
        for s in specs
    ]


def build_param_groups(applied: Any, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Torch optimizer groups from an applied plan (what DeepSpeed and plain torch take).

    Every group's ``lr`` is the *unscaled* ``lr``; its ``lr_scale`` is applied by
    :class:`ScaledLRScheduler` (so schedulers, which overwrite ``lr``, never erase it).

    Args:
        applied: an ``AppliedPlan`` (see :mod:`layerfreeze.apply`).
        lr: base learning rate.
        weight_decay: default weight decay (policies may override per parameter).

    Returns:
        torch optimizer groups with ``params``, ``lr``, ``weight_decay``, ``lr_scale``, ``name``.
    """
    return torch_groups(applied.model, group_specs(applied, weight_decay), lr)


@dataclass(frozen=True)
class SchedulePosition:
    """A :class:`ScaledLRScheduler`'s position: its wrapped scheduler's state and the unscaled
    lr (what :meth:`ScaledLRScheduler.carry_from` needs), holding no optimizer."""

    inner_state: dict[str, Any] | None
    base_lr: float


class ScaledLRScheduler:
    """Wraps a learning-rate scheduler so each group's lr is ``scheduled lr * group['lr_scale']``.

    The wrapped scheduler always sees unscaled values in ``group['lr']`` (restored before each of
    its steps), so both closed-form (``WarmupLR``) and recursive (``ExponentialLR``) schedulers
    compute the base schedule; the scale is applied after. With ``inner=None`` the lr is constant.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, inner: Any | None):
        self.optimizer = optimizer
        self.inner = inner
        self._unscaled = [float(g["lr"]) for g in optimizer.param_groups]
        self._apply()

    def _apply(self) -> None:
        for g, base in zip(self.optimizer.param_groups, self._unscaled, strict=True):
            g["lr"] = base * float(g.get("lr_scale", 1.0))

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Advance the wrapped scheduler one step and re-apply the per-group scales."""
        if self.inner is not None:
            for g, base in zip(self.optimizer.param_groups, self._unscaled, strict=True):
                g["lr"] = base
            self.inner.step(*args, **kwargs)
            self._unscaled = [float(g["lr"]) for g in self.optimizer.param_groups]
        self._apply()

    def get_last_lr(self) -> list[float]:
        """Current (scaled) lr of every group."""
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def get_lr(self) -> list[float]:
        """Same as :meth:`get_last_lr` (DeepSpeed's engine calls this name)."""
        return self.get_last_lr()

    @property
    def base_lr(self) -> float:
        """The unscaled scheduled lr (the lr of a group with ``lr_scale`` 1)."""
        return self._unscaled[0] if self._unscaled else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": None if self.inner is None else self.inner.state_dict(),
            "unscaled": list(self._unscaled),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the wrapped scheduler; a closed-form one recomputes the unscaled lr at the
        restored position (so its own configuration wins over the checkpoint's values)."""
        unscaled = list(state["unscaled"])
        if len(unscaled) != len(self.optimizer.param_groups):
            raise ValueError(
                f"lr scheduler state: {len(unscaled)} groups saved, optimizer has "
                f"{len(self.optimizer.param_groups)}; the checkpoint belongs to another plan."
            )
        if self.inner is not None and state.get("inner") is not None:
            self.inner.load_state_dict(state["inner"])
            if isinstance(self.inner, WarmupDecayLR):
                unscaled = [float(v) for v in self.inner.get_lr()]
        self._unscaled = unscaled
        self._apply()

    def position(self) -> SchedulePosition:
        """Where this schedule is, without a reference to its optimizer (see :meth:`carry_from`)."""
        inner = None if self.inner is None else copy.deepcopy(self.inner.state_dict())
        return SchedulePosition(inner, self.base_lr)

    def carry_from(self, other: ScaledLRScheduler | SchedulePosition) -> None:
        """Continue ``other``'s schedule on a rebuilt optimizer (different groups, same base lr).

        Every group of both optimizers follows the same unscaled schedule, so the position (the
        wrapped scheduler's counters) and the current unscaled lr are all there is to carry;
        since unscaled values are restored before each wrapped step, this holds for closed-form
        and recursive schedulers alike. ``other`` may be the old scheduler's :meth:`position`,
        taken before its optimizer was freed (a phase switch frees it before building the new).
        """
        pos = other.position() if isinstance(other, ScaledLRScheduler) else other
        if self.inner is not None and pos.inner_state is not None:
            sd = pos.inner_state
            if "last_batch_iteration" in sd:  # DeepSpeed schedulers
                self.inner.load_state_dict(sd)
            else:  # torch LRScheduler: per-group lists (base_lrs) stay those of the new optimizer
                for k in ("last_epoch", "_step_count"):
                    if k in sd:
                        setattr(self.inner, k, sd[k])
        self._unscaled = [pos.base_lr] * len(self.optimizer.param_groups)
        if self.inner is not None and hasattr(self.inner, "_last_lr"):
            self.inner._last_lr = list(self._unscaled)
        self._apply()


def assert_requires_grad_final(model: nn.Module, specs: Sequence[GroupSpec], engine: str = "the engine") -> None:
    """Every trainable parameter is in exactly the groups ``specs`` name, and nothing else is
    (engines build gradient buffers / partitions from ``requires_grad`` once)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    grouped = {n for s in specs for n in s.params}
    if trainable != grouped:
        extra, missing = sorted(trainable - grouped)[:5], sorted(grouped - trainable)[:5]
        raise AssertionError(
            f"requires_grad is not final before {engine} builds the optimizer: trainable but not in the "
            f"optimizer groups {extra}; in the groups but frozen {missing}"
        )


def lr_factor(optim: OptimConfig, total_steps: int, step: int) -> float:
    """Multiplier of the peak lr at 0-based optimizer ``step``: linear warm-up from 0, then
    constant / linear / cosine decay to ``min_lr_ratio`` at ``total_steps``."""
    if step < optim.warmup_steps:
        return step / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    span = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    if optim.schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * decay


class WarmupDecayLR(torch.optim.lr_scheduler.LRScheduler):
    """``lr = base_lr * lr_factor(optim, total_steps, step)`` in closed form.

    Closed form (``_get_closed_form_lr``) so the DeepSpeed runner can continue it on a rebuilt
    optimizer at a plan-schedule phase switch; holds only plain numbers, so its state dict is
    checkpointable. Per-policy lr scales are applied on top by the runner.

    A checkpoint stores the whole state, but :meth:`load_state_dict` restores only the
    *position* (the step): peak lr, warm-up, decay shape, floor and total steps always come
    from the run config this scheduler was built from, so a resume with a lower ``optim.lr``
    (recovering from a NaN stop) or more ``train.steps`` (extending a run) follows what the
    user asked for.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int
    ) -> None:
        self.warmup_steps = optim.warmup_steps
        self.schedule = optim.schedule
        self.min_lr_ratio = optim.min_lr_ratio
        self.total_steps = total_steps
        super().__init__(optimizer)

    def _factor(self) -> float:
        cfg = OptimConfig(
            lr=1.0, warmup_steps=self.warmup_steps, schedule=self.schedule,
            min_lr_ratio=self.min_lr_ratio,
        )
        return lr_factor(cfg, self.total_steps, self.last_epoch)

    def get_lr(self) -> list[float]:
        """Scheduled lr of every group at ``last_epoch`` (the 0-based optimizer step)."""
        return [base * self._factor() for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the position (``last_epoch``, ``_step_count``) only; see the class doc."""
        for key in ("last_epoch", "_step_count"):
            if key in state_dict:
                setattr(self, key, state_dict[key])
        self._last_lr = self.get_lr()
