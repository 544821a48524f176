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

Under the Trainer's DeepSpeed integration (ZeRO 0-3), and to resume a run in a later phase, build
the Trainer from :func:`plan_trainer` instead: a phase switch there rebuilds the DeepSpeed engine
with the Adam state carried. See ``docs/hf_trainer.md``.

This module drives the Trainer's DeepSpeed integration, so it needs DeepSpeed's own functions
(``engine_from_optimizer``, ``switch_engine_plan``, ``gathered_parameters``); it gets them from
the engine module ``layerfreeze.engines.get_engine("deepspeed")`` at the point of use and never
imports ``layerfreeze.engines.deepspeed`` (the import guard, tests/unit/test_engine_imports.py).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainingArguments

from layerfreeze.utils.io import atomic_write_json
from layerfreeze.utils.logging import get_logger, log_rank0
from layerfreeze.utils.private_api import (
    replace_prepared_model,
    replace_prepared_optimizer,
    set_scheduler_last_lr,
    set_scheduler_step_count,
)

__all__ = ["LayerfreezeCallback", "apply_schedule", "plan_optimizer", "plan_trainer"]

logger = get_logger(__name__)

#: Written into each Trainer checkpoint directory: the phase and optimizer groups to resume with.
STATE_FILE = "layerfreeze_trainer.json"
_STATE_FORMAT = "layerfreeze.hf_trainer/1"


def apply_schedule(
    model: nn.Module,
    plan_or_schedule: Any,
    *,
    resume_from_checkpoint: str | os.PathLike | None = None,
) -> tuple[Any, Any]:
    """Apply a plan (or the first phase of a plan schedule) to ``model`` before Trainer is built.

    A single plan is :func:`layerfreeze.apply.apply_plan`. For a schedule every phase's adapters
    are installed and every parameter that *any* phase trains keeps ``requires_grad`` for the
    whole run: DDP builds its gradient reducer once, from ``requires_grad``, when the Trainer wraps
    the model. :class:`LayerfreezeCallback` then zeroes the gradients of parameters outside the
    current phase (they are in no optimizer group), so each phase trains exactly its plan.

    With ``resume_from_checkpoint`` (a Trainer checkpoint directory written with
    :class:`LayerfreezeCallback`) the phase that checkpoint was in is applied instead, so that the
    optimizer the Trainer restores has the groups it was saved with. (:func:`plan_trainer` does
    this itself from ``trainer.train(resume_from_checkpoint=...)``.)

    Args:
        model: a Hugging Face causal LM.
        plan_or_schedule: a plan spec (preset, string, dict, ``LayerPlan``) or a schedule (a list
            of ``{plan, until_step}`` phases, a ``PlanSchedule``).
        resume_from_checkpoint: a ``checkpoint-N`` directory to resume from.

    Returns:
        ``(applied, schedule)``: the ``AppliedPlan`` (the starting phase) and the ``PlanSchedule``.

    Raises:
        ValueError: the checkpoint has no readable layerfreeze state or belongs to another
            schedule (the message names the file).
    """
    from layerfreeze.apply import apply_plan
    from layerfreeze.schedule import PlanSchedule

    if isinstance(plan_or_schedule, list | tuple | PlanSchedule):
        schedule = PlanSchedule.parse(plan_or_schedule)
    else:
        schedule = PlanSchedule.single(plan_or_schedule)
    plans = schedule.plans
    phase = 0
    if resume_from_checkpoint is not None:
        phase = read_trainer_state(resume_from_checkpoint, schedule)["phase"]
    applied = apply_plan(model, plans[phase], install=tuple(plans[:phase] + plans[phase + 1:]))
    if len(plans) > 1:
        _set_union_requires_grad(applied, schedule)
    return applied, schedule


def _union_names(applied: Any, schedule: Any) -> set[str]:
    """Every parameter some phase of ``schedule`` trains."""
    return {n for p in schedule.plans for n in applied.trainable_names_for(p)}


def _set_union_requires_grad(applied: Any, schedule: Any) -> None:
    """``requires_grad`` on every phase's parameters (DDP builds its reducer once, from it)."""
    union = _union_names(applied, schedule)
    for name, p in applied.model.named_parameters():
        p.requires_grad_(name in union)


def read_trainer_state(checkpoint: str | os.PathLike, schedule: Any) -> dict[str, Any]:
    """The layerfreeze state a :class:`LayerfreezeCallback` saved in a Trainer checkpoint.

    Returns:
        ``{"phase", "global_step", "groups"}`` (``groups``: the optimizer's group specs, or None).

    Raises:
        ValueError: the file is missing (while the checkpoint's step is past the first phase),
            unreadable, or written for another schedule; the message names the file.
    """
    directory = Path(checkpoint)
    path = directory / STATE_FILE
    if not path.is_file():
        step = _checkpoint_step(directory)
        if step is not None and schedule.phase_at(step) == 0:
            return {"phase": 0, "global_step": step, "groups": None}
        raise ValueError(
            f"{path}: missing. Resuming a plan schedule needs the phase the checkpoint was saved "
            "in, which LayerfreezeCallback writes at every save; pass a checkpoint directory "
            "(checkpoint-N) of a run trained with the callback."
        )
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e}).") from e
    if state.get("format") != _STATE_FORMAT:
        raise ValueError(f"{path}: format {state.get('format')!r}, expected {_STATE_FORMAT!r}.")
    phase = int(state["phase"])
    want = [p.to_dict() for p in schedule.plans]
    if state.get("plans") != want:
        raise ValueError(
            f"{path}: written for another plan schedule ({len(state.get('plans') or [])} phases); "
            "resume with the schedule the run was started with."
        )
    return {"phase": phase, "global_step": int(state["global_step"]), "groups": state.get("groups")}


def _checkpoint_step(directory: Path) -> int | None:
    try:
        return int(json.loads((directory / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError):
        return None


def _torch_param_groups(applied: Any, args: TrainingArguments, specs: Any) -> list[dict[str, Any]]:
    """Groups with ``lr = args.learning_rate * lr_scale``: from the plan, or from group specs
    (a phase switch under ZeRO splits groups by Adam step count, so bias correction is exact)."""
    if specs is None:
        return applied.param_groups(args.learning_rate, args.weight_decay)
    from layerfreeze.optim import torch_groups

    groups = torch_groups(applied.model, _as_specs(specs), args.learning_rate)
    for g in groups:
        g["lr"] = args.learning_rate * g["lr_scale"]
    return groups


def _as_specs(specs: Any) -> list[Any]:
    """``GroupSpec``s from specs or their dicts (as a checkpoint's state file stores them)."""
    from layerfreeze.optim import GroupSpec

    return [s if isinstance(s, GroupSpec) else GroupSpec(**s) for s in specs]


def plan_optimizer(
    applied: Any, args: TrainingArguments, specs: Any = None
) -> torch.optim.Optimizer:
    """The optimizer ``TrainingArguments`` asks for, over the plan's parameter groups.

    Only the current plan's trainable parameters are in it, one group per policy group with
    ``lr = args.learning_rate * lr_scale`` and the plan's weight decay (``args.weight_decay``,
    none on norms, biases and gates). The Trainer's schedulers (``LambdaLR``) multiply each
    group's own initial lr, so the per-policy scales hold for the whole run. Pass it as
    ``Trainer(optimizers=(plan_optimizer(applied, args), None))``; with the Trainer's DeepSpeed
    integration leave ``optimizer`` out of the DeepSpeed config so that this one is used.

    Args:
        applied: the ``AppliedPlan``.
        args: the Trainer's arguments (``optim``, ``learning_rate``, ``weight_decay``, betas, eps).
        specs: optional group specs (``layerfreeze.optim.GroupSpec`` or their dicts) to build
            instead of the plan's groups (what a resumed checkpoint was saved with).

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
    return cls(_torch_param_groups(applied, args, specs), **kwargs)


def plan_trainer(trainer_cls: type | None = None) -> type:
    """A subclass of ``trainer_cls`` (default ``transformers.Trainer``) that trains a plan schedule.

    Build it with ``applied=`` (from :func:`apply_schedule`) and a :class:`LayerfreezeCallback`::

        trainer = plan_trainer()(model=model, args=args, train_dataset=ds, applied=applied,
                                 callbacks=[LayerfreezeCallback(applied, schedule)])
        trainer.train()                                   # or train(resume_from_checkpoint=True)

    What it adds to the Trainer:

    - ``create_optimizer`` returns :func:`plan_optimizer` (the DeepSpeed integration discards
      ``optimizers=`` and calls ``create_optimizer`` itself, when the DeepSpeed config has no
      ``optimizer`` section);
    - under the DeepSpeed integration, ``requires_grad`` is exactly the current phase's and each
      phase switch rebuilds the DeepSpeed engine over the new phase's parameters, carrying master
      weights and Adam state of parameters that stay trainable (see
      :func:`layerfreeze.engines.deepspeed.switch_engine_plan`);
    - ``train(resume_from_checkpoint=...)`` resumes in the phase the checkpoint was saved in, with
      the optimizer groups it was saved with.
    """
    from transformers import Trainer

    base = trainer_cls or Trainer

    class _PlanTrainer(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, applied: Any, **kwargs: Any) -> None:
            self.layerfreeze_applied = applied
            self.layerfreeze_specs: list[Any] | None = None
            self._layerfreeze_retired: list[Any] = []
            self._layerfreeze_callback: LayerfreezeCallback | None = None
            for cb in kwargs.get("callbacks") or ():
                if isinstance(cb, LayerfreezeCallback):
                    if cb.applied is not applied:
                        raise ValueError(
                            "plan_trainer: the LayerfreezeCallback was built for another "
                            "AppliedPlan than applied=; pass the same one to both."
                        )
                    cb.trainer = self  # before on_init_end, which checks it
                    self._layerfreeze_callback = cb
            targs = kwargs.get("args") if "args" in kwargs else (args[1] if len(args) > 1 else None)
            if targs is not None and _uses_deepspeed(targs):
                # ZeRO builds its partitions over what requires grad: exactly this phase
                applied.switch_plan(applied.plan)
            super().__init__(*args, **kwargs)

        def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
            if self.optimizer is None:
                self.optimizer = plan_optimizer(
                    self.layerfreeze_applied, self.args, self.layerfreeze_specs
                )
            return self.optimizer

        def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
            cb = self._layerfreeze_callback
            if resume_from_checkpoint is not None and resume_from_checkpoint is not False:
                path = resume_from_checkpoint
                if path is True:
                    from transformers.trainer_utils import get_last_checkpoint

                    path = get_last_checkpoint(self.args.output_dir)
                if path is not None and cb is not None:
                    self._layerfreeze_resume(cb, path)
            return super().train(resume_from_checkpoint, *args, **kwargs)

        def _layerfreeze_resume(self, cb: LayerfreezeCallback, path: Any) -> None:
            state = read_trainer_state(path, cb.schedule)
            phase, groups = state["phase"], state["groups"]
            plan = cb.schedule.plans[phase]
            if phase != cb.phase or self.layerfreeze_applied.plan.to_dict() != plan.to_dict():
                self.layerfreeze_applied.switch_plan(plan)
                if not _uses_deepspeed(self.args):
                    _set_union_requires_grad(self.layerfreeze_applied, cb.schedule)
                self.optimizer = None  # built for another phase's groups: rebuild it
            if groups is not None:
                self.layerfreeze_specs = groups
                self.optimizer = None
            cb.resumed(phase)
            log_rank0(logger, "resuming %s in plan phase %d: %s", path, phase, plan)

        def training_step(self, model: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            # the training loop holds the engine of the phase it started in; after a rebuild the
            # live engine is self.model_wrapped
            if any(model is old for old in self._layerfreeze_retired):
                model = self.model_wrapped
            return super().training_step(model, *args, **kwargs)

        def layerfreeze_rebuild_engine(self, new_plan: Any, lr_lambda: Any, last_epoch: int) -> Any:
            """Phase switch under the DeepSpeed integration: a new engine over ``new_plan``."""
            from accelerate.utils import DeepSpeedEngineWrapper, DeepSpeedOptimizerWrapper

            from layerfreeze.engines import get_engine
            from layerfreeze.optim import group_specs

            deepspeed = get_engine("deepspeed")
            engine_from_optimizer = deepspeed.engine_from_optimizer
            switch_engine_plan = deepspeed.switch_engine_plan

            old_engine, old_wrapper = self.model_wrapped, self.optimizer
            applied = self.layerfreeze_applied
            specs = self.layerfreeze_specs
            if specs is None:  # the engine was built from plan_optimizer's groups
                specs = group_specs(applied, self.args.weight_decay)
            specs = _as_specs(specs)
            config = self.accelerator.deepspeed_config

            def build(new_specs: list[Any]) -> Any:
                opt = plan_optimizer(applied, self.args, new_specs)
                return engine_from_optimizer(self.model, opt, config)

            engine, applied, new_specs, _nbytes = switch_engine_plan(
                old_engine, applied, new_plan, specs,
                weight_decay=self.args.weight_decay, build=build,
            )
            self.layerfreeze_specs = new_specs
            wrapper = DeepSpeedOptimizerWrapper(engine.optimizer)
            sched = torch.optim.lr_scheduler.LambdaLR(wrapper, lr_lambda)
            _position_lambda_lr(sched, last_epoch)
            self._layerfreeze_retired.append(old_engine)
            self.model_wrapped = self.deepspeed = engine
            self.optimizer, self.lr_scheduler = wrapper, sched
            acc = self.accelerator
            acc.deepspeed_engine_wrapped = DeepSpeedEngineWrapper(engine)
            replace_prepared_model(acc, old_engine, engine)
            replace_prepared_optimizer(acc, old_wrapper, wrapper)
            self.callback_handler.optimizer = wrapper
            self.callback_handler.lr_scheduler = sched
            return engine

    _PlanTrainer.__name__ = _PlanTrainer.__qualname__ = f"Plan{base.__name__}"
    return _PlanTrainer


def _position_lambda_lr(sched: torch.optim.lr_scheduler.LambdaLR, last_epoch: int) -> None:
    """Put a fresh ``LambdaLR`` at ``last_epoch`` (each group at its initial lr x the factor)."""
    sched.last_epoch = last_epoch
    set_scheduler_step_count(sched, last_epoch + 1)
    for g, base, lam in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas,
                            strict=True):
        g["lr"] = base * lam(last_epoch)
    set_scheduler_last_lr(sched, [g["lr"] for g in sched.optimizer.param_groups])


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

    Under the Trainer's DeepSpeed integration a schedule needs the Trainer class from
    :func:`plan_trainer` (a phase switch rebuilds the engine); without it, plain DDP works with
    any Trainer (the callback masks gradients outside the current phase and rebuilds the
    optimizer's groups in place). At every save it writes :data:`STATE_FILE` into the checkpoint
    directory: the phase and optimizer groups a resume needs.

    Raises:
        ValueError: (when the Trainer is built) a multi-phase schedule under the Trainer's
            DeepSpeed integration without :func:`plan_trainer`, or (without DeepSpeed) a
            schedule whose parameters were not prepared by :func:`apply_schedule`.
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
        #: the plan_trainer() Trainer this callback belongs to (set by the Trainer)
        self.trainer: Any = None
        self._deepspeed = False

    # ---- checks when the Trainer is built ---------------------------------------------------

    def on_init_end(self, args, state, control, **kwargs):
        self._deepspeed = _uses_deepspeed(args)
        if len(self.schedule.plans) < 2:
            return
        if self._deepspeed:
            if self.trainer is None:
                raise ValueError(
                    "LayerfreezeCallback: a plan schedule (several phases) under the Trainer's "
                    "DeepSpeed integration needs the Trainer class from "
                    "layerfreeze.hf_trainer.plan_trainer(): ZeRO partitions optimizer state and "
                    "gradients over the parameters trainable when the engine is built, so each "
                    "phase switch rebuilds the engine, which only that Trainer subclass can do. "
                    "Build it as plan_trainer(YourTrainer)(..., applied=applied, "
                    "callbacks=[callback])."
                )
            return
        union = _union_names(self.applied, self.schedule)
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
            sched = kwargs.get("lr_scheduler")
            inner = getattr(sched, "scheduler", sched)
            if not isinstance(inner, torch.optim.lr_scheduler.LambdaLR):
                raise ValueError(
                    "LayerfreezeCallback: a plan schedule continues the Trainer's own learning-"
                    "rate schedule across phase switches (a LambdaLR: lr_scheduler_type linear, "
                    f"cosine, constant, ...); got {type(sched).__name__}. Leave 'scheduler' out "
                    "of the DeepSpeed config and do not pass a scheduler in optimizers=."
                )
            if not self._deepspeed:
                params = dict(self.applied.model.named_parameters())
                for name, p in params.items():
                    if p.requires_grad and name not in self._masked:
                        self._hooks.append(p.register_hook(self._mask(name)))
                        self._masked.add(name)
            target = self.schedule.phase_at(state.global_step)
            if self.schedule.plans[target].to_dict() == self.applied.plan.to_dict():
                self.phase = target  # applied for this step already (e.g. a resume)
                self._active = set(self.applied.trainable_names())
            elif self._deepspeed:
                raise ValueError(
                    f"LayerfreezeCallback: step {state.global_step} is in plan phase {target} "
                    f"({self.schedule.plans[target]}) but the DeepSpeed engine was built for "
                    f"{self.applied.plan}. Resume through plan_trainer's "
                    "train(resume_from_checkpoint=...), which applies the checkpoint's phase "
                    "before the engine is built."
                )
            else:
                self._switch(target, args, optimizer, sched)
        if self.sensitivity is not None:
            self._sense(model, state)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        target = self.schedule.phase_at(state.global_step)
        if target != self.phase:
            self._switch(target, args, optimizer, kwargs.get("lr_scheduler"))
        if self.sensitivity is not None and state.global_step % self.sensitivity_every == 0:
            self._sense(model, state)

    def on_save(self, args, state, control, model=None, **kwargs):
        if args.should_save:
            specs = getattr(self.trainer, "layerfreeze_specs", None)
            atomic_write_json(
                Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE,
                {
                    "format": _STATE_FORMAT,
                    "phase": self.phase,
                    "global_step": state.global_step,
                    "plan": self.applied.plan.to_dict(),
                    "plans": [p.to_dict() for p in self.schedule.plans],
                    "groups": None if specs is None else [
                        s if isinstance(s, Mapping) else s.to_dict() for s in specs
                    ],
                },
            )
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

    def _sense(self, model: Any, state: Any) -> None:
        gather = self._gather()
        self._record(state, self.sensitivity.compute(model, state.global_step, gather=gather))

    def _gather(self) -> Any:
        """Under DeepSpeed, what the sensitivity hooks gather ZeRO-3 partitions with."""
        if not self._deepspeed:
            return None
        from layerfreeze.engines import get_engine

        return functools.partial(get_engine("deepspeed").gathered_parameters, self.applied.model)

    def resumed(self, phase: int) -> None:
        """Called by :func:`plan_trainer`'s ``train`` when it resumes in ``phase``."""
        self.phase = phase
        self._active = set(self.applied.trainable_names())

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
        from layerfreeze.engines.partition import is_partition_managed

        if any(is_partition_managed(p) for p in self.applied.model.parameters()) or any(
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
        """Make phase ``target`` trainable. Under DeepSpeed the Trainer rebuilds its engine;
        otherwise the optimizer's groups are rebuilt in place (Adam state carried for parameters
        that stay trainable) and the scheduler follows them."""
        sched = getattr(scheduler, "scheduler", scheduler)
        if self._deepspeed:
            if not isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
                raise ValueError(
                    "LayerfreezeCallback: a phase switch continues the Trainer's LambdaLR; got "
                    f"{type(scheduler).__name__}."
                )
            stay = set(self.applied.trainable_names_for(self.schedule.plans[target]))
            carried = len(stay & self._active)
            self.trainer.layerfreeze_rebuild_engine(
                self.schedule.plans[target], sched.lr_lambdas[0], sched.last_epoch
            )
            self._active = set(self.applied.trainable_names())
            self.phase = target
            log_rank0(
                logger,
                "plan phase %d: %s (DeepSpeed engine rebuilt; %d trainable tensors, %d carry "
                "their Adam state)",
                target, self.applied.plan, len(self._active), carried,
            )
            return
        opt = _torch_optimizer(optimizer)
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
        _set_union_requires_grad(self.applied, self.schedule)  # DDP's reducer keeps the union
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
        set_scheduler_last_lr(sched, [g["lr"] for g in opt.param_groups])
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
