"""The drop-in ``initialize``: ``deepspeed.initialize`` with a layer plan applied first.

Owns :func:`initialize` and its checks of the user's arguments against the plan (an optimizer
instance or callable, ``model_parameters``, the config / ``config_params`` /
``args.deepspeed_config`` precedence), and :func:`_apply_plan`, which the runner shares.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from layerfreeze.engines.deepspeed.config import _check_config, load_config
from layerfreeze.engines.deepspeed.engine import (
    _check_group_order,
    _deepspeed_initialize,
    _wrap_scheduler,
)
from layerfreeze.optim import GroupSpec, assert_requires_grad_final, group_specs, torch_groups
from layerfreeze.utils.logging import get_logger, log_rank0

#: The package's logger: records keep the name ``layerfreeze.engines.deepspeed`` whichever module
#: of the package logs them (what users and tests filter on).
logger = get_logger("layerfreeze.engines.deepspeed")


def _apply_plan(model: nn.Module, plan: Any, schedule: Any) -> Any:
    from layerfreeze.apply import apply_plan
    from layerfreeze.plan import LayerPlan
    from layerfreeze.schedule import PlanSchedule

    if schedule is not None:
        schedule = PlanSchedule.parse(schedule)
        return apply_plan(model, schedule.plans[0], install=tuple(schedule.plans[1:]))
    if plan is None:
        raise ValueError("initialize: pass plan=, schedule= or applied= (got none of them).")
    return apply_plan(model, LayerPlan.parse(plan))


def _plan_specs(applied: Any, weight_decay: float | None) -> tuple[list[GroupSpec], set[str]]:
    """The plan's group specs; with ``weight_decay=None``, also the names of the groups that take
    the optimizer's own default decay (found by building the specs with two distinct defaults:
    a group whose decay follows the default is the policy's "use the default" group)."""
    if weight_decay is not None:
        return group_specs(applied, weight_decay), set()
    one, two = group_specs(applied, 1.0), group_specs(applied, 2.0)
    if [s.params for s in one] != [s.params for s in two]:  # a policy overrides decay to 1.0
        return group_specs(applied, 0.0), set()
    defaulted = set()
    for a, b in zip(one, two, strict=True):
        if a.weight_decay != b.weight_decay:
            a.name = a.name.rsplit("/wd=", 1)[0] + "/wd=default"
            defaulted.add(a.name)
    return one, defaulted


def _user_groups(
    model: nn.Module, specs: list[GroupSpec], lr: float | None, defaulted: set[str]
) -> list[dict[str, Any]]:
    """Plan groups for a user's optimizer: ``lr`` / ``weight_decay`` only where layerfreeze
    knows them (absent keys take the optimizer's own defaults)."""
    groups = torch_groups(model, specs, 0.0)
    for g in groups:
        if lr is None:
            del g["lr"]
        else:
            g["lr"] = float(lr)
        if g["name"] in defaulted:
            del g["weight_decay"]
    return groups


def _names(model: nn.Module, ids: Any, limit: int = 5) -> str:
    names = [n for n, p in model.named_parameters() if id(p) in ids]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _check_optimizer_instance(
    optimizer: torch.optim.Optimizer, model: nn.Module, specs: list[GroupSpec]
) -> None:
    """Refuse an optimizer instance that contradicts the applied plan (frozen parameters in it,
    trainable ones missing, or an lr scale other than the plan's)."""
    params = dict(model.named_parameters())
    scale = {id(params[n]): s.lr_scale for s in specs for n in s.params}
    held: dict[int, float] = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            held[id(p)] = float(g.get("lr_scale", 1.0))
    frozen = {i for i in held if i not in scale}
    missing = {i for i in scale if i not in held}
    unknown = {i for i in frozen if i not in {id(p) for p in params.values()}}
    problems = []
    if frozen - unknown:
        problems.append(f"it holds parameters the plan freezes ({_names(model, frozen)})")
    if unknown:
        problems.append(f"it holds {len(unknown)} tensors that are not parameters of the model")
    if missing:
        problems.append(f"it misses parameters the plan trains ({_names(model, missing)})")
    bad_scale = {i for i in held if i in scale and not math.isclose(held[i], scale[i])}
    if bad_scale:
        problems.append(
            "its groups' lr_scale differs from the plan's per-policy scale for "
            f"{_names(model, bad_scale)}"
        )
    if problems:
        raise ValueError(
            f"initialize: optimizer= ({type(optimizer).__name__}) contradicts the plan: "
            + "; ".join(problems)
            + ". Build it after the plan is applied from its groups, e.g. "
            "`applied = apply_plan(model, plan); opt = torch.optim.AdamW(applied.param_groups(lr, "
            "wd))` and pass applied=applied, or pass a callable `optimizer=lambda groups: "
            "torch.optim.AdamW(groups, lr=...)` that receives the plan's groups."
        )


def _unscale_optimizer_instance(optimizer: torch.optim.Optimizer, lr_scheduler: Any) -> None:
    """Turn the scaled lrs of an optimizer built from ``applied.param_groups`` into unscaled ones.

    ``AppliedPlan.param_groups(lr, wd)`` gives each group ``lr * lr_scale`` (right for plain
    torch). Under :class:`ScaledLRScheduler` the groups must hold the unscaled lr, which it
    multiplies by ``lr_scale`` itself, so each group's ``lr`` (and ``initial_lr``) and a bound torch
    scheduler's ``base_lrs`` / ``_last_lr`` are divided by the group's scale here; otherwise every
    group would train at ``lr * lr_scale ** 2``.
    """
    scales = [float(g.get("lr_scale", 1.0)) or 1.0 for g in optimizer.param_groups]
    for g, scale in zip(optimizer.param_groups, scales, strict=True):
        g["lr"] = float(g["lr"]) / scale
        if "initial_lr" in g:  # set by a torch scheduler built on this optimizer
            g["initial_lr"] = float(g["initial_lr"]) / scale
    if lr_scheduler is None or callable(lr_scheduler):
        return
    for attr in ("base_lrs", "_last_lr"):  # torch LRScheduler bookkeeping, one value per group
        values = getattr(lr_scheduler, attr, None)
        if isinstance(values, list) and len(values) == len(scales):
            setattr(lr_scheduler, attr, [float(v) / s for v, s in zip(values, scales, strict=True)])


def _check_model_parameters(
    model_parameters: Any, model: nn.Module, specs: list[GroupSpec], new_ids: set[int]
) -> None:
    """Reconcile the user's ``model_parameters`` with the plan: it says which parameters may
    train; the plan's trainable parameters must all be in it (adapters the plan installed are
    new and count as included). Parameters it lists that the plan freezes are left out."""
    entries = list(model_parameters)
    given: set[int] = set()
    for i, e in enumerate(entries):
        if isinstance(e, Mapping):
            extra = sorted(set(e) - {"params", "name"})
            if extra:
                raise ValueError(
                    f"initialize: model_parameters[{i}] is a parameter group with its own options "
                    f"{extra}; the plan builds the groups (per-policy lr scale and weight decay). "
                    "Pass plain parameters (e.g. model.parameters()) or an optimizer callable."
                )
            ps = e["params"]
            given.update(id(p) for p in ([ps] if isinstance(ps, torch.Tensor) else ps))
        elif isinstance(e, torch.Tensor):
            given.add(id(e))
        else:
            raise TypeError(
                f"initialize: model_parameters[{i}] is a {type(e).__name__}; expected tensors or "
                "dicts with 'params' (what torch optimizers take)."
            )
    params = dict(model.named_parameters())
    trains = {id(params[n]) for s in specs for n in s.params}
    left_out = trains - given - new_ids
    if left_out:
        raise ValueError(
            "initialize: model_parameters leaves out parameters the plan trains "
            f"({_names(model, left_out)}). Pass model.parameters() (the plan decides what "
            "trains) or change the plan."
        )
    frozen = given - trains
    if frozen:
        log_rank0(
            logger,
            f"initialize: {len(frozen)} of the model_parameters are frozen by the plan and stay "
            "out of the optimizer.",
        )


def _resolve_ds_config(args: Any, config: Any, config_params: Any) -> tuple[Any, Any]:
    """DeepSpeed's config precedence: ``config``, else ``config_params``, else
    ``args.deepspeed_config`` (both at once is an error there too). Returns the config and the
    ``args`` to hand on (a copy without the config path, since layerfreeze passes the dict)."""
    if config is None:
        config = config_params
    elif config_params is not None:
        raise ValueError(
            "initialize: config= and config_params= both given; config_params is the old name of "
            "config (DeepSpeed). Pass one of them."
        )
    for attr in ("deepspeed_config", "deepscale_config"):
        path = getattr(args, attr, None)
        if path is None:
            continue
        if config is not None:
            raise ValueError(
                f"initialize: args.{attr}={path!r} and config= both given; DeepSpeed refuses two "
                "configs. Drop one of them."
            )
        config = path
        args = copy.copy(args)
        setattr(args, attr, None)
    if config is None:
        raise ValueError(
            "initialize: no DeepSpeed config; pass config= (dict or JSON path), config_params= or "
            "args.deepspeed_config."
        )
    return args, config


def initialize(
    args: Any = None,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] | None = None,
    model_parameters: Any = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    distributed_port: int = 29500,
    mpu: Any = None,
    dist_init_required: bool | None = None,
    collate_fn: Callable | None = None,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    mesh_param: Any = None,
    config_params: str | os.PathLike | Mapping[str, Any] | None = None,
    *,
    plan: Any = None,
    applied: Any = None,
    schedule: Any = None,
    lr: float | None = None,
    weight_decay: float | None = None,
):
    """Drop-in for ``deepspeed.initialize`` that trains ``model`` under a layer plan.

    Takes every argument of ``deepspeed.initialize`` (DeepSpeed 0.19), in its order and with its
    meaning, plus ``plan=`` (or ``applied=`` / ``schedule=``), ``lr=`` and ``weight_decay=``.
    The plan is applied (adapters installed, ``requires_grad`` set) *before* DeepSpeed sees the
    model, so ZeRO-3 partitions adapter parameters and every stage builds its partitions from
    trainable parameters only. The optimizer gets one group per policy group (per-policy lr
    scale, no decay on norms/biases/gates); the returned scheduler is a
    :class:`ScaledLRScheduler` keeping the scales under any DeepSpeed or torch schedule.

    For plan *schedules* (phases) use :class:`DeepSpeedRunner`, which rebuilds the engine at phase
    boundaries; here ``schedule`` only installs all phases' adapters and applies phase 0.

    Args:
        args: as DeepSpeed: an object with ``local_rank`` / ``deepspeed_config`` (the config
            path is read from it when ``config`` is not given).
        model: the ``nn.Module`` to train (required).
        optimizer: ``None``: built by DeepSpeed from the config's ``optimizer`` section (Adam /
            AdamW) over the plan's groups. A callable: called with the plan's groups (``lr`` /
            ``weight_decay`` set only where ``lr=`` / the plan fixes them, else the optimizer's
            defaults). An optimizer instance: used when its parameters are exactly the plan's
            trainable ones with the plan's ``lr_scale`` per group, refused otherwise.
        model_parameters: as DeepSpeed: what may train. Every parameter the plan trains must be
            in it (adapters the plan installs count as included); those it lists that the plan
            freezes stay out of the optimizer. Groups with their own options are refused.
        training_data, collate_fn, distributed_port, mpu, dist_init_required, mesh_param: passed to
            ``deepspeed.initialize`` unchanged.
        lr_scheduler: a callable ``optimizer -> scheduler``, or a scheduler instance bound to the
            ``optimizer`` instance you pass (else the config's ``scheduler`` section is used).
        config: DeepSpeed config (dict or JSON path); ``config_params`` is its old name.
        config_params: same as ``config`` (DeepSpeed's backwards-compatible name).
        plan: a plan spec (``"freeze_deep"``, a compact string, a dict, a ``LayerPlan``).
        applied: an ``AppliedPlan`` already applied to ``model`` (then ``plan`` is not used).
        schedule: a ``PlanSchedule`` spec (phase 0 is applied; all phases' adapters installed).
        lr: base learning rate (default: the config's ``optimizer.params.lr``, or with a user
            optimizer its own).
        weight_decay: default weight decay (default: the config's, or with a user optimizer
            its own).

    Returns:
        ``(engine, optimizer, dataloader, lr_scheduler)`` like ``deepspeed.initialize``; the
        ``AppliedPlan`` is available as ``engine.layerfreeze_applied``.

    Raises:
        ValueError / TypeError: a missing model or config, an optimizer or ``model_parameters``
            that contradicts the plan, a config layerfreeze cannot build the optimizer from.
    """
    if model is None:
        if isinstance(args, nn.Module):
            raise TypeError(
                "initialize: the first positional argument is `args` (as in deepspeed.initialize) "
                "and got a model; pass model=model."
            )
        raise ValueError("initialize: model= is required (as in deepspeed.initialize).")
    args, config = _resolve_ds_config(args, config, config_params)
    cfg = load_config(config)
    user_opt = optimizer is not None
    if user_opt and not (isinstance(optimizer, torch.optim.Optimizer) or callable(optimizer)):
        raise TypeError(
            f"initialize: optimizer= must be a torch optimizer or a callable `groups -> optimizer`, "
            f"got {type(optimizer).__name__}."
        )
    if not user_opt:
        lr = _check_config(cfg, lr)
        if weight_decay is None:
            weight_decay = float(cfg["optimizer"]["params"].get("weight_decay", 0.0))
    before = {id(p) for p in model.parameters()}
    if applied is None:
        applied = _apply_plan(model, plan, schedule)
        new_ids = {id(p) for p in model.parameters()} - before
    elif plan is not None or schedule is not None:
        raise ValueError("initialize: pass plan=/schedule= or applied=, not both.")
    else:
        new_ids = set()
    specs, defaulted = _plan_specs(applied, weight_decay)
    assert_requires_grad_final(model, specs, "deepspeed.initialize")
    if model_parameters is not None:
        _check_model_parameters(model_parameters, model, specs, new_ids)
    if isinstance(optimizer, torch.optim.Optimizer):
        _check_optimizer_instance(optimizer, model, specs)
        groups: Any = None
    elif user_opt:
        groups = _user_groups(model, specs, lr, defaulted)
    else:
        groups = torch_groups(model, specs, lr)
    if lr_scheduler is not None and not callable(lr_scheduler):
        if getattr(lr_scheduler, "optimizer", None) is not optimizer or groups is not None:
            raise TypeError(
                f"lr_scheduler: got a {type(lr_scheduler).__name__} instance that is not bound to "
                "the optimizer= instance passed here; pass a callable `optimizer -> scheduler` "
                "(the optimizer is built from the plan), e.g. "
                "`lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, f)`, or use the config's "
                "'scheduler'."
            )
    if groups is None:
        _unscale_optimizer_instance(optimizer, lr_scheduler)
    engine, ds_opt, loader, _sched = _deepspeed_initialize(
        args=args,
        model=model,
        optimizer=optimizer,
        model_parameters=groups if groups is not None else optimizer.param_groups,
        training_data=training_data,
        lr_scheduler=lr_scheduler,
        distributed_port=distributed_port,
        mpu=mpu,
        dist_init_required=dist_init_required,
        collate_fn=collate_fn,
        config=cfg,
        mesh_param=mesh_param,
    )
    if groups is not None:
        _check_group_order(engine, groups)
    engine.layerfreeze_applied = applied
    return engine, ds_opt, loader, _wrap_scheduler(engine)
