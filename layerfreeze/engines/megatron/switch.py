"""Megatron runner plan-schedule phase switch: rebuild DDP and the optimizer for the next phase's
trainable set, carrying the optimizer state of the parameters that stay trainable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from layerfreeze.utils.logging import get_logger, log_rank0

if TYPE_CHECKING:
    from layerfreeze.engines.megatron.runner import MegatronRunner

__all__ = ["switch_phase"]

logger = get_logger(__name__)


def switch_phase(runner: MegatronRunner, target: int, carry: bool) -> None:
    """Switch ``runner`` to plan-schedule phase ``target``: tear down DDP and the optimizer,
    switch the applied plan (``requires_grad``), rebuild both, and with ``carry`` put back the
    fp32 master weights and Adam moments of the parameters trainable in both phases (collective
    under the distributed optimizer)."""
    new_plan = runner.schedule.plans[target]
    params = dict(runner._root.named_parameters())
    stay = set(runner.applied.trainable_names()) & set(runner.applied.trainable_names_for(new_plan))
    carried: dict[str, dict[str, torch.Tensor]] = {}
    if carry:
        for n in runner.applied.trainable_names():  # same order on every rank
            if n in stay:
                carried[n] = runner._full_state(params[n])
    runner._teardown()
    runner.applied = runner.applied.switch_plan(new_plan)
    runner.phase = target
    runner._build()
    for n, state in carried.items():
        runner._set_state(params[n], state)
    log_rank0(
        logger,
        "plan-schedule phase %d: %s (%d trainable params on this rank, %d carried)",
        target,
        new_plan,
        sum(params[n].numel() for n in runner.applied.trainable_names()),
        len(carried),
    )
