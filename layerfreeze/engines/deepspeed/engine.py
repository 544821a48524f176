"""Building DeepSpeed engines: the process group and ``deepspeed.initialize`` over plan groups.

Owns :func:`init_distributed`, the one reference to DeepSpeed's own ``initialize`` (taken at
import, so a script that swaps in :func:`layerfreeze.engines.deepspeed.initialize` cannot make
layerfreeze call itself), the engine builds of the runner (:func:`_ds_initialize`) and of the
Hugging Face Trainer (:func:`engine_from_optimizer`), and the :class:`ScaledLRScheduler` wrap
that keeps per-policy lr scales under any schedule.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from layerfreeze.engines.deepspeed.zero_state import _torch_optimizer
from layerfreeze.optim import ScaledLRScheduler
from layerfreeze.utils.dist import is_dist, single_process_rendezvous


def init_distributed(backend: str | None = None) -> None:
    """Initialise the default process group the way DeepSpeed expects (no-op when already up).

    Args:
        backend: ``"gloo"`` / ``"nccl"``; default ``nccl`` with CUDA, ``gloo`` on CPU. Works under
            ``torchrun``, the ``deepspeed`` launcher and a single plain process.
    """
    if is_dist():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    single_process_rendezvous()  # no launcher: a world of one on a free port
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's c10d rendezvous hands the workers the agents' own store, which outlives a
        # restart of the group (--max-restarts): the restarted ranks would read the failed
        # attempt's keys (the dead ranks' gloo/NCCL addresses) and fail to connect. Give every
        # attempt its own key space. TORCHELASTIC_RESTART_COUNT cannot name the attempt (an
        # agent whose workers were restarted for a membership change does not count it), so
        # the attempt is counted in the store: every worker of an attempt joins once, and all
        # of an attempt's workers have joined before the next attempt's start.
        from torch.distributed.constants import default_pg_timeout

        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=default_pg_timeout,
        )
        world = int(os.environ["WORLD_SIZE"])
        attempt = (store.add("layerfreeze/workers_joined", 1) - 1) // world
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(f"layerfreeze/attempt_{attempt}", store),
            rank=int(os.environ["RANK"]),
            world_size=world,
        )
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def _wrap_scheduler(engine: Any) -> ScaledLRScheduler:
    sched = ScaledLRScheduler(_torch_optimizer(engine.optimizer), engine.lr_scheduler)
    engine.lr_scheduler = sched
    return sched


def _check_group_order(engine: Any, groups: Sequence[Mapping[str, Any]]) -> None:
    """The engine's torch optimizer holds ``groups`` in their order (lr scales map by index)."""
    held = [g.get("name") for g in _torch_optimizer(engine.optimizer).param_groups]
    if held != [g.get("name") for g in groups]:
        raise AssertionError("DeepSpeed reordered the optimizer groups; cannot map lr scales")


def _ds_initialize(
    model: nn.Module,
    config: dict[str, Any],
    groups: list[dict[str, Any]],
    *,
    lr_scheduler: Any = None,
    training_data: Any = None,
    collate_fn: Any = None,
    args: Any = None,
    mpu: Any = None,
):
    if lr_scheduler is not None and not callable(lr_scheduler):
        raise TypeError(
            f"lr_scheduler: got a {type(lr_scheduler).__name__} instance; pass a callable "
            "`optimizer -> scheduler` (layerfreeze builds the optimizer from the plan), e.g. "
            "`lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, f)`, or use the config's 'scheduler'."
        )
    engine, optimizer, loader, sched = deepspeed.initialize(
        args=args,
        model=model,
        model_parameters=groups,
        config=config,
        lr_scheduler=lr_scheduler,
        training_data=training_data,
        collate_fn=collate_fn,
        mpu=mpu,
    )
    _check_group_order(engine, groups)
    return engine, optimizer, loader, _wrap_scheduler(engine)


#: DeepSpeed's own ``initialize``, taken at import: scripts may swap ``deepspeed.initialize`` for
#: :func:`initialize` (e.g. ``deepspeed.initialize = functools.partial(initialize, plan=...)``),
#: which must not end up calling itself.
_deepspeed_initialize = deepspeed.initialize


def engine_from_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, config: Mapping[str, Any]
) -> Any:
    """A DeepSpeed engine over ``model`` with a ready-made torch ``optimizer`` (its groups are
    kept in order) and no lr scheduler: what accelerate builds for the Hugging Face Trainer when
    the DeepSpeed config has no ``optimizer``/``scheduler`` section."""
    engine, _opt, _loader, _sched = _deepspeed_initialize(
        model=model, optimizer=optimizer, config=json.loads(json.dumps(dict(config)))
    )
    _check_group_order(engine, optimizer.param_groups)
    return engine
