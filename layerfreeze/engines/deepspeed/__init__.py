"""DeepSpeed engine: layer plans on DeepSpeed ZeRO 0-3; the only package that imports ``deepspeed``.

Two entry points:

* :func:`initialize` -- a drop-in for ``deepspeed.initialize`` for users' own scripts: applies the
  layer plan before DeepSpeed partitions anything, builds optimizer groups from it (per-policy
  lr scale and weight decay; frozen parameters never reach the optimizer or the gradient
  partitions) and returns the usual ``(engine, optimizer, dataloader, lr_scheduler)`` tuple.
* :class:`DeepSpeedRunner` -- what the training recipe drives: ``train_step`` (forward/backward
  over one accumulation window with a NaN/Inf guard, per-layer-group grad norms), plan-schedule
  phase switches that rebuild the engine and carry the optimizer state over, and atomic
  checkpoints (see :mod:`layerfreeze.checkpoint`).

Per-policy learning rates: DeepSpeed schedulers overwrite every group's ``lr``. Every scheduler
here therefore sees the *unscaled* base lr in every group, and :class:`ScaledLRScheduler` (which
wraps it) multiplies each group by its ``lr_scale`` after every scheduler step, so the scales
hold for the whole run, whatever the schedule.

Modules, one job each:

* ``config``     checks of a DeepSpeed JSON config (:func:`load_config`; optimizer type, lr, stage);
* ``zero_state`` DeepSpeed optimizer internals: per-group state tensors, fp32 masters, Adam
  moments, re-linking, :func:`optimizer_state_numel`, :func:`gathered_parameters`;
* ``engine``     :func:`init_distributed` and engine builds (:func:`engine_from_optimizer`);
* ``inference``  :func:`load_zero3_for_inference` (ZeRO-3 partitioned forwards, ``trace --zero3``);
* ``switch``     :func:`switch_engine_plan`: a new engine at a phase switch, the state carried;
* ``dropin``     :func:`initialize` and its checks of the user's arguments against the plan;
* ``runner``     :class:`DeepSpeedRunner`, the training loop;
* ``checkpoint`` the runner's checkpoints: save, resume, the layout-independent elastic format;
* ``recipe``     the recipe's hooks (:func:`check_run_config`, :func:`describe_run_config`,
  :func:`runner_from_run_config`).

Importing the package imports DeepSpeed (so ``get_engine("deepspeed")`` says at once when it is
not installed). The run config's DeepSpeed section is resolved by
:mod:`layerfreeze.engines.deepspeed_config`, outside this package, because ``layerfreeze
validate`` needs it without DeepSpeed.
"""

from __future__ import annotations

from layerfreeze.engines.base import StepOutput
from layerfreeze.engines.deepspeed.config import load_config
from layerfreeze.engines.deepspeed.dropin import initialize
from layerfreeze.engines.deepspeed.engine import engine_from_optimizer, init_distributed
from layerfreeze.engines.deepspeed.inference import load_zero3_for_inference
from layerfreeze.engines.deepspeed.recipe import (
    check_run_config,
    describe_run_config,
    runner_from_run_config,
)
from layerfreeze.engines.deepspeed.runner import DeepSpeedRunner
from layerfreeze.engines.deepspeed.switch import switch_engine_plan
from layerfreeze.engines.deepspeed.zero_state import gathered_parameters, optimizer_state_numel
from layerfreeze.optim import ScaledLRScheduler, build_param_groups

__all__ = [
    "DeepSpeedRunner",
    "check_run_config",
    "describe_run_config",
    "engine_from_optimizer",
    "gathered_parameters",
    "runner_from_run_config",
    "ScaledLRScheduler",
    "StepOutput",
    "build_param_groups",
    "init_distributed",
    "initialize",
    "load_config",
    "load_zero3_for_inference",
    "optimizer_state_numel",
    "switch_engine_plan",
]
