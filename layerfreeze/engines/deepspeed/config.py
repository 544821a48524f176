"""Checks of a DeepSpeed JSON config for what layerfreeze relies on (optimizer type, lr, stage).

Owns :func:`load_config` and the checks :func:`initialize` and :class:`DeepSpeedRunner` run on a
user's DeepSpeed config before an engine is built. Building a DeepSpeed config from the run config
is :mod:`layerfreeze.engines.deepspeed_config` (outside this package: it must import without
DeepSpeed, for ``layerfreeze validate``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

from layerfreeze.utils.logging import get_logger, log_rank0

#: The package's logger: records keep the name ``layerfreeze.engines.deepspeed`` whichever module
#: of the package logs them (what users and tests filter on).
logger = get_logger("layerfreeze.engines.deepspeed")


def load_config(config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Read a DeepSpeed config (JSON file path or dict) into a fresh dict.

    Raises:
        ValueError: the file is missing or not a JSON object (a ``ConfigError``).
    """
    from layerfreeze.config import load_deepspeed_config

    return load_deepspeed_config(dict(config) if isinstance(config, Mapping) else str(config))


def _zero_stage(config: Mapping[str, Any]) -> int:
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def _check_config(config: dict[str, Any], lr: float | None) -> float:
    """Validate the parts of the DeepSpeed config layerfreeze relies on; return the base lr."""
    opt = config.get("optimizer")
    if not isinstance(opt, Mapping) or "type" not in opt:
        raise ValueError(
            "deepspeed config.optimizer: missing; layerfreeze builds the optimizer groups itself and "
            'needs e.g. {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": true}}.'
        )
    if str(opt["type"]).lower() not in ("adam", "adamw"):
        raise ValueError(
            f"deepspeed config.optimizer.type: {opt['type']!r} is not supported; use 'Adam' or "
            "'AdamW' (plan-schedule phase switches carry Adam moments over)."
        )
    params = opt.setdefault("params", {})
    if lr is None:
        if "lr" not in params:
            raise ValueError(
                "deepspeed config.optimizer.params.lr: missing and no lr= given. Set one of them."
            )
        lr = float(params["lr"])
    else:
        _warn_scheduler_overrides_lr(config, lr)
    params["lr"] = lr
    if bool(params.get("amsgrad", False)):
        raise ValueError(
            "deepspeed config.optimizer.params.amsgrad: not supported, got true. Remove it."
        )
    if _zero_stage(config) not in (0, 1, 2, 3):
        raise ValueError(
            f"deepspeed config.zero_optimization.stage: must be 0, 1, 2 or 3, got {_zero_stage(config)}."
        )
    return lr


#: DeepSpeed scheduler params that set absolute learning rates (the optimizer's lr is ignored).
_ABSOLUTE_LR_KEYS = ("warmup_max_lr", "cycle_max_lr")


def _warn_scheduler_overrides_lr(config: Mapping[str, Any], lr: float) -> None:
    """Warn when an explicit ``lr=`` will not be the trained lr: DeepSpeed's WarmupLR /
    WarmupDecayLR / OneCycle write their own absolute values into every group each step."""
    sched = config.get("scheduler")
    params = sched.get("params") if isinstance(sched, Mapping) else None
    if not isinstance(params, Mapping):
        return
    for key in _ABSOLUTE_LR_KEYS:
        if key in params and not math.isclose(float(params[key]), lr):
            log_rank0(
                logger,
                "lr=%g is not the learning rate that trains: the DeepSpeed config's scheduler "
                "%s sets absolute values (scheduler.params.%s = %g). Set %s to %g, or drop the "
                "scheduler section (or pass lr_scheduler=) to follow lr=.",
                lr, sched.get("type"), key, float(params[key]), key, lr,
                level=logging.WARNING,
            )
            return
