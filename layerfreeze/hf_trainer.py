"""Hugging Face ``Trainer`` integration: plan-aware optimizer, plan schedules, evaluation, hooks.

Apply the plan before the ``Trainer`` is built, hand it the plan's optimizer, add the callback::

    from layerfreeze.hf_trainer import LayerfreezeCallback, apply_schedule, plan_optimizer

    applied, schedule = apply_schedule(model, "freeze_deep")          # or a list of phases
    trainer = Trainer(
        model=model, args=args, train_dataset=ds,
        optimizers=(plan_optimizer(applied, args), None),             # Trainer builds its scheduler
        callbacks=[LayerfreezeCallback(applied, schedule, evaluation=eval_cb, sensitivity=hooks)],
    )
    trainer.train()

See ``docs/hf_trainer.md`` for what works with the Trainer's DeepSpeed integration (single-phase
plans, ZeRO 0-3) and why phase switches there are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainingArguments

from layerfreeze.utils.logging import get_logger, log_rank0

__all__ = ["LayerfreezeCallback", "apply_schedule", "plan_optimizer", "plan_trainer"]

logger = get_logger(__name__)


def apply_schedule(model: nn.Module, plan_or_schedule: Any) -> tuple[Any, Any]:
    """Apply a plan (or the first phase of a plan schedule) to ``model`` before the Trainer is built.

    A single plan is :func:`layerfreeze.apply.apply_plan`. For a schedule every phase's adapters
    are installed and every parameter that *any* phase trains keeps ``requires_grad`` for the
    whole run: DDP builds its gradient reducer once, from ``requires_grad``, when the Trainer wraps
    the model. :class:`LayerfreezeCallback` then zeroes the gradients of parameters outside the
    current phase (they are in no optimizer group), so each phase trains exactly its plan.

    Args:
        model: a Hugging Face causal LM.
        plan_or_schedule: a plan spec (preset, string, dict, ``LayerPlan``) or a schedule (a list
            of ``{plan, until_step}`` phases, a ``PlanSchedule``).

    Returns:
        ``(applied, schedule)``: the ``AppliedPlan`` (phase 0) and the ``PlanSchedule``.
    """
    from layerfreeze.apply import apply_plan
    from layerfreeze.schedule import PlanSchedule

    if isinstance(plan_or_schedule, list | tuple | PlanSchedule):
        schedule = PlanSchedule.parse(plan_or_schedule)
    else:
        schedule = PlanSchedule.single(plan_or_schedule)
    plans = schedule.plans
    applied = apply_plan(model, plans[0], install=tuple(plans[1:]))
    if len(plans) > 1:
        union = {n for p in plans for n in applied.trainable_names_for(p)}
        for name, p in model.named_parameters():
            p.requires_grad_(name in union)
    return applied, schedule


def plan_optimizer(applied: Any, args: TrainingArguments) -> torch.optim.Optimizer:
    """The optimizer ``TrainingArguments`` asks for, over the plan's parameter groups.

    Only the current plan's trainable parameters are in it, one group per policy group with
    ``lr = args.learning_rate * lr_scale`` and the plan's weight decay (``args.weight_decay``,
    none on norms, biases and gates). The Trainer's schedulers (``LambdaLR``) multiply each
    group's own initial lr, so the per-policy scales hold for the whole run. Pass it as
    ``Trainer(optimizers=(plan_optimizer(applied, args), None))``; with the Trainer's DeepSpeed
    integration leave ``optimizer`` out of the DeepSpeed config so that this one is used.

    Raises:
        ValueError: ``args.optim`` is an optimizer that takes the whole model instead of groups.
    """
    from transformers import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, applied.model)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(
            f"TrainingArguments.optim: {args.optim!r} builds its optimizer from the whole model; "
            "plan_optimizer needs one that takes parameter groups (e.g. adamw_torch)."
        )
    kwargs = {k: v for k, v in kwargs.items() if k not in ("lr", "weight_decay")}
    return cls(applied.param_groups(args.learning_rate, args.weight_decay), **kwargs)


def plan_trainer(trainer_cls: type | None = None) -> type:
    """A subclass of ``trainer_cls`` (default ``transformers.Trainer``) whose ``create_optimizer``
    returns :func:`plan_optimizer` for the ``applied=`` plan given at construction.

    Needed under the Trainer's DeepSpeed integration, which discards ``optimizers=`` and calls
    ``create_optimizer`` itself (when the DeepSpeed config has no ``optimizer`` section)::

        trainer = plan_trainer()(model=model, args=args, train_dataset=ds, applied=applied,
                                 callbacks=[LayerfreezeCallback(applied)])
    """
    from transformers import Trainer

    base = trainer_cls or Trainer

    class _PlanTrainer(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, applied: Any, **kwargs: Any) -> None:
            self.layerfreeze_applied = applied
            super().__init__(*args, **kwargs)

        def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
            if self.optimizer is None:
                self.optimizer = plan_optimizer(self.layerfreeze_applied, self.args)
            return self.optimizer

    _PlanTrainer.__name__ = _PlanTrainer.__qualname__ = f"Plan{base.__name__}"
    return _PlanTrainer


def _uses_deepspeed(args: TrainingArguments) -> bool:
    return (
        bool(getattr(args, "deepspeed", None))
        or getattr(args, "hf_deepspeed_config", None) is not None
    )


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside accelerate's and DeepSpeed's wrappers (or itself)."""
    for _ in range(4):
        if optimizer is None or type(optimizer).__module__.startswith("torch.optim"):
            break
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


class LayerfreezeCallback(TrainerCallback):
    """Runs a plan schedule, C-Eval/CMMLU at checkpoints and the sensitivity hooks in a Trainer.

    Args:
        applied: the ``AppliedPlan`` from :func:`apply_schedule` (or ``apply_plan``).
        schedule: the ``PlanSchedule``; ``None`` for a single plan.
        evaluation: a :class:`layerfreeze.evaluation.EvalCallback`; run at every checkpoint the
            Trainer saves (``on_save``) and at the end; its flat metrics go to the Trainer's
            ``state.log_history``.
        sensitivity: a :class:`layerfreeze.diagnostics.hooks.SensitivityHooks`; computed before
            the first step (the reference) and every ``sensitivity_every`` steps.
        sensitivity_every: steps between sensitivity computations.

    Raises:
        ValueError: (when the Trainer is built) a multi-phase schedule under the Trainer's
            DeepSpeed integration, or a schedule whose parameters were not prepared by
            :func:`apply_schedule`.
    """

    def __init__(
        self,
        applied: Any,
        schedule: Any = None,
        *,
        evaluation: Any = None,
        sensitivity: Any = None,
        sensitivity_every: int = 10,
    ) -> None:
        from layerfreeze.schedule import PlanSchedule

        if sensitivity is not None and sensitivity_every < 1:
            raise ValueError(f"sensitivity_every: must be >= 1, got {sensitivity_every}.")
        self.applied = applied
        self.schedule = schedule if schedule is not None else PlanSchedule.single(applied.plan)
        self.evaluation = evaluation
        self.sensitivity = sensitivity
        self.sensitivity_every = sensitivity_every
        self.phase = 0
        self.records: list[tuple[int, dict[str, float]]] = []
        self._active: set[str] = set(applied.trainable_names())
        self._hooks: list[Any] = []
        self._masked: set[str] = set()

    # ---- checks when the Trainer is built ---------------------------------------------------

    def on_init_end(self, args, state, control, **kwargs):
        if len(self.schedule.plans) < 2:
            return
        if _uses_deepspeed(args):
            raise ValueError(
                "LayerfreezeCallback: plan schedules (several phases) are refused under the "
                "Trainer's DeepSpeed integration: the Trainer builds the DeepSpeed engine once "
                "(accelerate.prepare) and ZeRO partitions the optimizer state and gradients over "
                "the parameters trainable at that time, so a phase that trains other parameters "
                "needs a new engine, which the Trainer cannot rebuild mid-run. Use one plan per "
                "Trainer run, or `layerfreeze train` / layerfreeze.deepspeed.DeepSpeedRunner, "
                "which rebuild the engine at each phase boundary."
            )
        union = {n for p in self.schedule.plans for n in self.applied.trainable_names_for(p)}
        trainable = {n for n, p in self.applied.model.named_parameters() if p.requires_grad}
        if trainable != union:
            raise ValueError(
                "LayerfreezeCallback: the model's requires_grad does not cover every phase's "
                "parameters; apply the schedule with layerfreeze.hf_trainer.apply_schedule(model, "
                "schedule) before building the Trainer (DDP fixes its gradient set when it wraps "
                "the model)."
            )

    # ---- training ---------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._check_optimizer(optimizer)
        if len(self.schedule.plans) > 1:
            params = dict(self.applied.model.named_parameters())
            for name, p in params.items():
                if p.requires_grad and name not in self._masked:
                    self._hooks.append(p.register_hook(self._mask(name)))
                    self._masked.add(name)
            target = self.schedule.phase_at(state.global_step)
            if target != self.phase:
                self._switch(target, args, optimizer, kwargs.get("lr_scheduler"))
        if self.sensitivity is not None:
            self._record(state, self.sensitivity.compute(model, state.global_step))

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        target = self.schedule.phase_at(state.global_step)
        if target != self.phase:
            self._switch(target, args, optimizer, kwargs.get("lr_scheduler"))
        if self.sensitivity is not None and state.global_step % self.sensitivity_every == 0:
            self._record(state, self.sensitivity.compute(model, state.global_step))

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.evaluation is not None:
            metrics = self.evaluation.maybe_run(state.global_step, model, force=True)
            if metrics:
                self._record(state, metrics)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.evaluation is not None:
            if self.evaluation.cfg.at_end:
                metrics = self.evaluation.maybe_run(state.global_step, model, force=True)
                if metrics:
                    self._record(state, metrics)
            self.evaluation.finalize()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._masked.clear()

    # ---- helpers ----------------------------------------------------------------------------

    def _mask(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            # outside the current phase: no gradient (the parameter is in no optimizer group;
            # a zero keeps DDP's reducer and the Trainer's gradient clipping exact)
            return grad if name in self._active else torch.zeros_like(grad)

        return hook

    def _record(self, state, metrics: Mapping[str, float]) -> None:
        self.records.append((state.global_step, dict(metrics)))
        state.log_history.append({**metrics, "step": state.global_step})

    def _check_optimizer(self, optimizer: Any) -> None:
        """The Trainer's optimizer holds exactly the plan's trainable parameters (when visible:
        under DeepSpeed the engine owns it)."""
        opt = _torch_optimizer(optimizer)
        if opt is None:
            return
        if not all("lr_scale" in g for g in opt.param_groups):
            raise ValueError(
                "LayerfreezeCallback: the Trainer's optimizer was not built from the plan (its "
                "groups carry no lr_scale), so per-policy learning rates are lost. Build the "
                "Trainer with optimizers=(layerfreeze.hf_trainer.plan_optimizer(applied, args), "
                "None), or, under the DeepSpeed integration (which discards optimizers=), use "
                "layerfreeze.hf_trainer.plan_trainer()(..., applied=applied) and leave "
                "'optimizer' out of the DeepSpeed config."
            )
        known = {id(p) for p in self.applied.model.parameters()}
        held_tensors = [p for g in opt.param_groups for p in g["params"]]
        if any(hasattr(p, "ds_id") for p in self.applied.model.parameters()) or any(
            id(p) not in known for p in held_tensors
        ):
            return  # ZeRO: flat partitions / swapped sub-groups; the groups came from the plan
        names = {id(p): n for n, p in self.applied.model.named_parameters()}
        held = {names.get(id(p), "?") for g in opt.param_groups for p in g["params"]}
        if held != self._active:
            extra, missing = sorted(held - self._active)[:3], sorted(self._active - held)[:3]
            raise ValueError(
                "LayerfreezeCallback: the Trainer's optimizer does not match the plan (holds "
                f"{extra} the current phase does not train; misses {missing}). Build the Trainer "
                "with optimizers=(layerfreeze.hf_trainer.plan_optimizer(applied, args), None)."
            )

    def _switch(self, target: int, args: TrainingArguments, optimizer: Any, scheduler: Any) -> None:
        """Make phase ``target`` trainable: the optimizer's groups are rebuilt in place (Adam
        state carried for parameters that stay trainable) and the scheduler follows them."""
        opt = _torch_optimizer(optimizer)
        sched = getattr(scheduler, "scheduler", scheduler)
        if opt is None or not isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
            raise ValueError(
                "LayerfreezeCallback: a phase switch rebuilds the torch optimizer's groups and a "
                f"LambdaLR scheduler's base lrs; got {type(optimizer).__name__} / "
                f"{type(scheduler).__name__}. Use the Trainer's own schedulers (lr_scheduler_type "
                "linear, cosine, constant, ...) and plan_optimizer."
            )
        params = dict(self.applied.model.named_parameters())
        carried = {n: opt.state[params[n]] for n in self._active if params[n] in opt.state}
        self.applied.switch_plan(self.schedule.plans[target])
        union = {n for p in self.schedule.plans for n in self.applied.trainable_names_for(p)}
        for name, p in params.items():  # requires_grad stays the union (DDP's reducer)
            p.requires_grad_(name in union)
        groups = self.applied.param_groups(args.learning_rate, args.weight_decay)
        factor = sched.lr_lambdas[0](sched.last_epoch)
        opt.param_groups.clear()
        opt.state.clear()
        for g in groups:
            g["initial_lr"] = g["lr"]
            g["lr"] = g["initial_lr"] * factor
            opt.add_param_group(g)
        sched.base_lrs = [g["initial_lr"] for g in opt.param_groups]
        sched.lr_lambdas = [sched.lr_lambdas[0]] * len(opt.param_groups)
        sched._last_lr = [g["lr"] for g in opt.param_groups]
        self._active = set(self.applied.trainable_names())
        for n, st in carried.items():
            if n in self._active:
                opt.state[params[n]] = st
        self.phase = target
        numel = sum(params[n].numel() for n in self._active)
        log_rank0(
            logger,
            "plan phase %d: %s (%d trainable parameters, %d carry their Adam state)",
            target,
            self.applied.plan,
            numel,
            sum(1 for n in carried if n in self._active),
        )
