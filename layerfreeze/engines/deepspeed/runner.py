"""DeepSpeed adapter: plan-aware ``initialize``, plan-schedule phase switches, atomic checkpoints.

The only module in layerfreeze that imports ``deepspeed``. Two entry points:

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
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.utils import (
    lazy_init_hp_params_optimizer_state,
    safe_get_full_fp32_param,
    safe_get_full_grad,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from safetensors.torch import load_file, save_file
from torch import nn

from layerfreeze import checkpoint as ckpt
from layerfreeze.client_state import load_client_state, save_client_state
from layerfreeze.engines.base import EngineCapabilities, StepOutput
from layerfreeze.engines.common import agree_finite, default_loss, trained_then_frozen
from layerfreeze.models import param_numel
from layerfreeze.optim import (
    GroupSpec,
    ScaledLRScheduler,
    assert_requires_grad_final,
    build_param_groups,
    group_specs,
    torch_groups,
)
from layerfreeze.resume import check_content, engine_problems, staged_checksums
from layerfreeze.utils.dist import (
    barrier,
    broadcast_object,
    get_rank,
    get_world_size,
    is_dist,
    single_process_rendezvous,
)
from layerfreeze.utils.logging import get_logger, log_rank0

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

#: The package's logger: records keep the name ``layerfreeze.engines.deepspeed`` whichever module
#: of the package logs them (what users and tests filter on).
logger = get_logger("layerfreeze.engines.deepspeed")

#: Optimizer-state tensors carried over at a phase switch (Adam / AdamW).
_ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")
_DS_TAG = "ds"
_META_KEY = "layerfreeze"
_META_FORMAT = 1
#: Layout-independent part of a checkpoint (see ``DeepSpeedRunner._save_elastic``).
_ELASTIC_DIR = "elastic"
_ELASTIC_INDEX = "index.json"
_ELASTIC_FORMAT = "layerfreeze.elastic/1"


# --------------------------------------------------------------------------------------------
# set-up helpers
# --------------------------------------------------------------------------------------------


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


def _state_tensors(ds_optimizer: Any) -> list[list[torch.Tensor]]:
    """Per optimizer group, the tensors the torch optimizer keys its state on (this rank's).

    ZeRO-1/2 and plain optimizers keep them in ``param_groups``; ZeRO-3 swaps its fp32 sub-group
    partitions in only while stepping, so they are read from the stage-3 optimizer itself.
    """
    opt = _torch_optimizer(ds_optimizer)
    flats = getattr(ds_optimizer, "fp32_partitioned_groups_flat", None)
    owner = getattr(ds_optimizer, "sub_group_to_group_id", None)
    if flats is not None and owner is not None:
        out: list[list[torch.Tensor]] = [[] for _ in opt.param_groups]
        for sub, flat in enumerate(flats):
            out[owner[sub]].append(flat)
        return out
    return [list(g["params"]) for g in opt.param_groups]


def _relink_optimizer_state(ds_optimizer: Any) -> None:
    """Point every parameter's ``_hp_mapping`` at the current Adam state of its group.

    ZeRO-1/2 and the bf16 optimizer link the state lazily from inside the step of the *first*
    group only, so groups after it keep empty state fragments and ``safe_get_full_optimizer_state``
    fails for them; re-linking all groups (DeepSpeed's own public helper) fixes that.
    """
    opt = _torch_optimizer(ds_optimizer)
    for lp_name, hp_name in (
        ("bit16_groups", "single_partition_of_fp32_groups"),
        ("bf16_groups", "fp32_groups_flat_partition"),
    ):
        lp_groups, hp_groups = (
            getattr(ds_optimizer, lp_name, None),
            getattr(ds_optimizer, hp_name, None),
        )
        if lp_groups is not None and hp_groups is not None:
            for lp, hp in zip(lp_groups, hp_groups, strict=True):
                if hp in opt.state:
                    lazy_init_hp_params_optimizer_state(lp, hp, opt.state)
            if hasattr(ds_optimizer, "_hp_optimizer_states_linked"):
                ds_optimizer._hp_optimizer_states_linked = True
            return


def _balanced_owners(names: Sequence[str], params: Mapping[str, nn.Parameter]) -> dict[str, int]:
    """Rank that writes each named parameter's tensors: largest first onto the least-loaded
    rank, so each rank holds and writes about 1/world of the bytes. The same on every rank."""
    world = get_world_size()
    load = [0] * world
    owners: dict[str, int] = {}
    for n in sorted(names, key=lambda n: (-param_numel(params[n]), n)):
        r = min(range(world), key=lambda i: (load[i], i))
        owners[n] = r
        load[r] += param_numel(params[n])
    return owners


def _plain_master(ds_optimizer: Any, param: nn.Parameter) -> torch.Tensor:
    """The tensor the torch optimizer updates for a non-ZeRO ``param``: its fp32 copy under
    DeepSpeed's ZeRO-0 mixed-precision optimizer (``fp16_groups`` -> ``fp32_groups``), else itself."""
    lp_groups = getattr(ds_optimizer, "fp16_groups", None)
    hp_groups = getattr(ds_optimizer, "fp32_groups", None)
    if lp_groups is not None and hp_groups is not None:
        for lg, hg in zip(lp_groups, hp_groups, strict=True):
            for lp, hp in zip(lg, hg, strict=True):
                if lp is param:
                    return hp
    return param


def _torch_optimizer(ds_optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer doing the actual update inside DeepSpeed's wrapper (or itself)."""
    inner = getattr(ds_optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        return inner
    if isinstance(ds_optimizer, torch.optim.Optimizer):
        return ds_optimizer
    raise TypeError(f"cannot find the torch optimizer inside {type(ds_optimizer).__name__}")


def _wrap_scheduler(engine: Any) -> ScaledLRScheduler:
    sched = ScaledLRScheduler(_torch_optimizer(engine.optimizer), engine.lr_scheduler)
    engine.lr_scheduler = sched
    return sched


def optimizer_state_numel(engine: Any) -> dict[str, int]:
    """Elements held in optimizer state across all ranks, per state key (and ``master``).

    Counts the fp32 master partitions and Adam moments actually allocated in the torch optimizer
    (summed over data-parallel ranks; ZeRO pads partitions by a few elements), i.e. what a
    frozen parameter must not add to. Collective under ZeRO: call it on every rank.
    """
    opt = _torch_optimizer(engine.optimizer)
    counts: dict[str, int] = {"master": 0}
    for tensors in _state_tensors(engine.optimizer):
        for p in tensors:
            counts["master"] += p.numel()
            for k, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    counts[k] = counts.get(k, 0) + v.numel()
    if engine.zero_optimization_stage() >= 1 and is_dist():
        keys = sorted(counts)
        t = torch.tensor([counts[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        counts = {k: int(v) for k, v in zip(keys, t.tolist(), strict=True)}
    return counts


# --------------------------------------------------------------------------------------------
# initialize (drop-in)
# --------------------------------------------------------------------------------------------


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


@contextlib.contextmanager
def gathered_parameters(
    model: nn.Module, names: Sequence[str] | None = None, modifier_rank: int | None = None
) -> Iterator[None]:
    """Context in which the named parameters of ``model`` (default: all) are whole on every rank:
    ZeRO-3 partitions are gathered (``deepspeed.zero.GatheredParameters``; on exit, changes made
    on ``modifier_rank`` are re-partitioned); parameters that are not partitioned are left as
    they are. Collective when anything is partitioned."""
    params = dict(model.named_parameters())
    selected = [params[n] for n in names] if names is not None else list(params.values())
    selected = [p for p in selected if hasattr(p, "ds_id")]
    if selected:
        with deepspeed.zero.GatheredParameters(selected, modifier_rank=modifier_rank):
            yield
    else:
        yield


def load_zero3_for_inference(
    load: Callable[[], nn.Module], dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Any]:
    """A model partitioned over the ranks from the moment it is loaded (ZeRO-3), for forwards.

    While ``load`` runs (e.g. ``from_pretrained``), a ZeRO-3 ``HfDeepSpeedConfig`` is alive, so
    transformers builds the model under ``deepspeed.zero.Init`` and each rank keeps only its
    1/world of every weight; DeepSpeed's engine (no optimizer: parameter fetching only) then
    gathers one module's weights at a time inside each forward. Every rank must run the same
    forwards. Use :func:`gathered_parameters` for code that needs whole weights.

    Returns:
        ``(model, engine)``: the Hugging Face module (partitioned) and the engine that keeps its
        hooks alive.
    """
    from transformers.integrations import HfDeepSpeedConfig

    init_distributed()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    elif dtype == torch.float16:
        config["fp16"] = {"enabled": True}
    hf_config = HfDeepSpeedConfig(config)  # transformers reads it (a weak reference) while alive
    model = load()
    engine, _opt, _loader, _sched = _deepspeed_initialize(model=model, config=config)
    engine.layerfreeze_hf_config = hf_config  # ZeRO-3 stays visible to transformers meanwhile
    engine.eval()
    return engine.module, engine

# --------------------------------------------------------------------------------------------
# optimizer state across an engine rebuild (plan-schedule phase switch)
# --------------------------------------------------------------------------------------------


def _named_trainable(
    model: nn.Module, specs: Sequence[GroupSpec]
) -> list[tuple[str, nn.Parameter]]:
    params = dict(model.named_parameters())
    return [(n, params[n]) for s in specs for n in s.params]


def _full_fp32(engine: Any, p: nn.Parameter) -> torch.Tensor:
    """The whole fp32 master of ``p`` (collective under ZeRO)."""
    v = safe_get_full_fp32_param(p)
    if v is None:
        v = _plain_master(engine.optimizer, p).detach()
    return v.float().cpu().clone()


def _full_state(engine: Any, p: nn.Parameter, key: str) -> torch.Tensor:
    """The whole Adam state ``key`` of ``p`` (collective under ZeRO)."""
    v = safe_get_full_optimizer_state(p, key)
    if v is None:
        v = _torch_optimizer(engine.optimizer).state[_plain_master(engine.optimizer, p)][key]
    return v.float().cpu().clone()


def _step_of_groups(engine: Any) -> list[int]:
    """Adam step count of each optimizer group (collective: max over ranks)."""
    opt = _torch_optimizer(engine.optimizer)
    out = []
    for tensors in _state_tensors(engine.optimizer):
        step = 0
        for p in tensors:
            st = opt.state.get(p, {})
            if "step" in st:
                step = int(float(st["step"]))
                break
        out.append(step)
    if is_dist():  # a rank may hold no partition of a group; take the max
        t = torch.tensor(out or [0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out = [int(v) for v in t.tolist()][: len(out)]
    return out


def _materialize_state(engine: Any, steps: Sequence[int]) -> None:
    """Create Adam state (zeros, given step) for every group, as torch would on first step."""
    opt = _torch_optimizer(engine.optimizer)
    for tensors, step in zip(_state_tensors(engine.optimizer), steps, strict=True):
        for p in tensors:
            st = opt.state[p]
            st["step"] = torch.tensor(float(step), dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    _relink_optimizer_state(engine.optimizer)


def _carry_owners(names: Sequence[str], params: Mapping[str, nn.Parameter]) -> dict[str, int]:
    """Which rank keeps each carried parameter's state across a switch (partitioned
    optimizers only; empty otherwise), balanced by size (:func:`_balanced_owners`)."""
    partitioned = [
        n for n in names if hasattr(params[n], "ds_id") or hasattr(params[n], "_hp_mapping")
    ]
    return _balanced_owners(partitioned, params) if get_world_size() > 1 else {}


def _broadcast_from(
    src: int, tensor: torch.Tensor | None, shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """``tensor`` (fp32, on ``src`` only) on every rank, through ``device``."""
    buf = (
        tensor.to(device)
        if tensor is not None and get_rank() == src
        else torch.empty(shape, dtype=torch.float32, device=device)
    )
    dist.broadcast(buf, src=src)
    return buf


#: DeepSpeed engine counters a rebuilt engine continues from.
_ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")


class _Carry:
    """What a phase switch carries from the old engine to the new one.

    ``tensors[name]`` holds the full fp32 master and Adam moments of each parameter that stays
    trainable, kept on the parameter's owner rank only when the optimizer is partitioned (see
    :func:`_carry_owners`), so a switch holds O(trainable / world) extra bytes per rank; every
    rank knows every carried name (``keys``), its Adam step (``steps``) and its owner.
    """

    def __init__(
        self,
        engine: Any,
        model: nn.Module,
        specs: Sequence[GroupSpec],
        new_trainable: set[str],
        carry: bool,
    ) -> None:
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        self.keys: dict[str, tuple[str, ...]] = {}
        self.steps: dict[str, int] = {}
        self.owners: dict[str, int] = {}
        self.counters = {k: getattr(engine, k) for k in _ENGINE_COUNTERS}
        if not carry:
            return
        _relink_optimizer_state(engine.optimizer)
        group_steps = _step_of_groups(engine)
        params = dict(model.named_parameters())
        names = [n for spec in specs for n in spec.params if n in new_trainable]
        self.owners = _carry_owners(names, params)
        for spec, gstep in zip(specs, group_steps, strict=True):
            for n in spec.params:
                if n not in new_trainable:
                    continue
                p = params[n]
                keys = ("master", *(_ADAM_STATE_KEYS if gstep > 0 else ()))
                entry = {}
                for key in keys:  # collective under ZeRO: every rank takes part
                    full = _full_fp32(engine, p) if key == "master" else _full_state(engine, p, key)
                    if self.owners.get(n, get_rank()) == get_rank():
                        entry[key] = full
                    del full
                self.tensors[n], self.keys[n], self.steps[n] = entry, keys, gstep

    @property
    def nbytes(self) -> int:
        """fp32 bytes this rank holds."""
        return sum(t.numel() * t.element_size() for e in self.tensors.values() for t in e.values())

    def restore(self, engine: Any, model: nn.Module, specs: Sequence[GroupSpec]) -> None:
        """Write the carried state into ``engine`` (built over ``specs``; collective)."""
        for k, v in self.counters.items():
            setattr(engine, k, v)
        if not self.keys:
            return
        _materialize_state(engine, [s.step for s in specs])
        opt = _torch_optimizer(engine.optimizer)
        for n, p in _named_trainable(model, specs):  # the same order on every rank
            if n not in self.keys:
                continue
            entry = self.tensors.pop(n)
            if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
                shape = tuple(getattr(p, "ds_shape", p.shape))
                for key in self.keys[n]:
                    full = entry.pop(key, None)
                    if n in self.owners:  # partitioned: the owner sends it, one tensor at a time
                        full = _broadcast_from(self.owners[n], full, shape, engine.device)
                    full = full.to(p.device)
                    if key == "master":
                        safe_set_full_fp32_param(p, full)
                    else:
                        safe_set_full_optimizer_state(p, full, key)
                    del full
            else:  # ZeRO-0: torch optimizer over the parameters or their fp32 copies
                master = _plain_master(engine.optimizer, p)
                with torch.no_grad():
                    master.copy_(entry["master"].to(master.dtype))
                    if master is not p:
                        p.copy_(entry["master"].to(p.dtype))
                    for key in _ADAM_STATE_KEYS:
                        if key in entry:
                            opt.state[master][key].copy_(entry[key])


def switch_engine_plan(
    engine: Any,
    applied: Any,
    new_plan: Any,
    specs: Sequence[GroupSpec],
    *,
    weight_decay: float,
    build: Callable[[list[GroupSpec]], Any],
    carry: bool = True,
    new_specs: list[GroupSpec] | None = None,
) -> tuple[Any, Any, list[GroupSpec], int]:
    """Move a running DeepSpeed engine to ``new_plan``: a new engine, the old one's state carried.

    ZeRO partitions gradients and optimizer state over the parameters trainable when the engine
    is built, so a plan that trains other parameters needs a new engine. Every parameter that
    stays trainable keeps its fp32 master weights, Adam moments and Adam step (its optimizer
    group is split by step count so that bias correction stays exact); new ones start fresh.
    The engine's step counters carry over. Collective: every rank calls it.

    Args:
        engine: the current engine, built over ``specs`` (destroyed here).
        applied: the ``AppliedPlan`` the engine trains (``new_plan`` installed in it).
        new_plan: the plan to train next.
        specs: the current engine's optimizer groups, in its order.
        weight_decay: default weight decay for the new groups.
        build: ``specs -> engine``: builds the new engine over those groups (in that order).
        carry: False to start every parameter fresh (e.g. before loading a checkpoint).
        new_specs: the new groups to build (default: from the plan, split by carried steps).

    Returns:
        ``(engine, applied, specs, carried_bytes)``: the new engine, the switched plan, the new
        engine's groups, and the fp32 bytes this rank held across the switch.
    """
    new_trainable = set(applied.trainable_names_for(new_plan))
    state = _Carry(engine, applied.model, specs, new_trainable, carry)
    nbytes = state.nbytes
    engine.destroy()
    applied = applied.switch_plan(new_plan)
    if new_specs is None:
        new_specs = group_specs(applied, weight_decay, state.steps)
    engine = build(new_specs)
    state.restore(engine, applied.model, new_specs)
    return engine, applied, new_specs, nbytes


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


# --------------------------------------------------------------------------------------------
# the recipe's entry points (layerfreeze train)
# --------------------------------------------------------------------------------------------


def check_run_config(cfg: Any, world_size: int) -> list[str]:
    """Validate the run config's DeepSpeed side before anything is written.

    Returns:
        One warning line per DeepSpeed value the run config replaces.

    Raises:
        ConfigError: a missing or malformed DeepSpeed JSON file.
    """
    from layerfreeze.engines.deepspeed_config import build_deepspeed_config

    return build_deepspeed_config(cfg, world_size)[1]


def describe_run_config(cfg: Any) -> list[str]:
    """What ``layerfreeze validate`` prints for ``engine: deepspeed``: the DeepSpeed config the
    run would use for ``WORLD_SIZE`` ranks (default 1), then one ``note:`` per value the run
    config replaces.

    Raises:
        ConfigError: a missing or malformed DeepSpeed JSON file.
    """
    import json

    from layerfreeze.engines.deepspeed_config import build_deepspeed_config

    world = get_world_size()
    ds, replaced = build_deepspeed_config(cfg, world)
    return [f"DeepSpeed config for {world} rank(s):\n{json.dumps(ds, indent=2)}"] + [
        f"note: {line}" for line in replaced
    ]


def runner_from_run_config(
    cfg: Any,
    *,
    schedule: Any,
    vocab_size: int,
    lr_scheduler: Callable | None = None,
    special_ids: dict[str, int] | None = None,
) -> DeepSpeedRunner:
    """Build the Hugging Face model of ``cfg.model``, apply every phase of ``schedule`` and
    return the :class:`DeepSpeedRunner` that trains it (what ``layerfreeze train`` calls).

    Args:
        cfg: the validated ``RunConfig``.
        schedule: the run's ``PlanSchedule`` (adapters of every phase installed up front).
        vocab_size: the tokenizer's size (a built model gets at least this vocabulary).
        lr_scheduler: callable ``optimizer -> scheduler``.
        special_ids: the tokenizer's pad / bos / eos ids for a model built from
            ``model.architecture`` (:func:`layerfreeze.modeling.special_token_ids`).
    """
    from layerfreeze.apply import apply_plan, enable_gradient_checkpointing
    from layerfreeze.engines.deepspeed_config import build_deepspeed_config
    from layerfreeze.modeling import build_model

    ds_config, _ = build_deepspeed_config(cfg, get_world_size())
    model = build_model(cfg.model, vocab_size, cfg.train.seed, special_ids)
    plans = schedule.plans
    applied = apply_plan(model, plans[0], install=plans[1:])
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model, applied.layout)
    return DeepSpeedRunner(
        model, ds_config, applied=applied, schedule=schedule, lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay, lr_scheduler=lr_scheduler,
    )


# --------------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------------


class DeepSpeedRunner:
    """Trains a model under a layer plan or plan schedule on DeepSpeed (what ``train.py`` drives).

    Usage::

        runner = DeepSpeedRunner(model, ds_config, schedule=schedule, lr=1e-4, weight_decay=0.1)
        for step in range(runner.global_step, total_steps):
            out = runner.train_step(next_window())        # list of GAS micro-batch dicts
            if out.step % save_every == 0:
                runner.save_checkpoint(ckpt_dir, client_state={"data": loader.state_dict()})

    Phase switches happen inside :meth:`train_step` when the global step crosses a phase boundary.

    Adapters (LoRA ``A``, prefixes, gates) draw their initial values from torch's global
    generator when the plan is applied, and torch seeds it from the OS in every new process: call
    ``torch.manual_seed`` before applying a plan for runs that repeat bit for bit (``layerfreeze
    train`` does, from ``train.seed``; two seeded 2-rank runs are tested bit-identical).

    Args:
        model: the model (adapters of every phase are installed here unless ``applied`` is given).
        config: DeepSpeed config (dict or JSON path); ``optimizer`` must be Adam/AdamW.
        plan: a plan spec (single phase), or
        schedule: a ``PlanSchedule`` spec (several phases), or
        applied: an ``AppliedPlan`` already applied to ``model`` (with ``schedule`` when it was
            applied with ``install=`` of the schedule's later phases).
        lr: base lr (default ``config.optimizer.params.lr``).
        weight_decay: default weight decay (default config's or 0).
        lr_scheduler: callable ``optimizer -> scheduler``; default: the config's ``scheduler``.
        loss_fn: ``(engine, micro_batch) -> loss tensor``; default calls ``engine(**micro_batch)``
            and reads ``.loss`` (Hugging Face causal LMs with ``labels`` in the batch).
    """

    def __init__(
        self,
        model: nn.Module,
        config: str | os.PathLike | Mapping[str, Any],
        *,
        plan: Any = None,
        schedule: Any = None,
        applied: Any = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        lr_scheduler: Callable | None = None,
        loss_fn: Callable[[Any, Mapping[str, Any]], torch.Tensor] | None = None,
    ):
        from layerfreeze.schedule import PlanSchedule

        self.config = load_config(config)
        self.lr = _check_config(self.config, lr)
        self.weight_decay = (
            float(self.config["optimizer"]["params"].get("weight_decay", 0.0))
            if weight_decay is None
            else float(weight_decay)
        )
        if plan is not None and schedule is not None:
            raise ValueError(
                "DeepSpeedRunner: pass plan= or schedule=, not both (a plan is a "
                "one-phase schedule)."
            )
        if schedule is None:
            if plan is None and applied is None:
                raise ValueError("DeepSpeedRunner: pass plan=, schedule= or applied=.")
            schedule = PlanSchedule.single(plan if plan is not None else applied.plan)
        self.schedule = PlanSchedule.parse(schedule)
        if applied is None:
            applied = _apply_plan(model, None, self.schedule)
        elif applied.plan.to_dict() != self.schedule.plans[0].to_dict():
            raise ValueError(
                f"DeepSpeedRunner: applied= trains {applied.plan} but the schedule starts with "
                f"{self.schedule.plans[0]}. Apply the schedule's first plan (install= the others)."
            )
        self.applied = applied
        self.model = model
        self.zero_stage = _zero_stage(self.config)
        self._lr_scheduler_fn = lr_scheduler
        self._loss_fn = loss_fn or default_loss
        self.phase = 0
        self.global_step = 0
        self.bad_micro_batches = 0
        self.skipped_steps = 0
        self.engine: Any = None
        self.lr_scheduler: ScaledLRScheduler | None = None
        #: fp32 bytes this rank held across the last phase switch (master + Adam moments)
        self.switch_carry_bytes = 0
        self._specs: list[GroupSpec] = []
        self._build_engine(group_specs(self.applied, self.weight_decay))

    # ---- engine construction ---------------------------------------------------------------

    def _build_engine(self, specs: list[GroupSpec]) -> None:
        assert_requires_grad_final(self.model, specs, "deepspeed.initialize")
        groups = torch_groups(self.model, specs, self.lr)
        engine, _opt, _loader, sched = _ds_initialize(
            self.model,
            json.loads(json.dumps(self.config)),
            groups,
            lr_scheduler=self._lr_scheduler_fn,
        )
        self.engine, self.lr_scheduler, self._specs = engine, sched, specs

    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro-batches per optimizer step (from the DeepSpeed config)."""
        return int(self.engine.gradient_accumulation_steps())

    @property
    def rank(self) -> int:
        """Global rank."""
        return get_rank()

    @property
    def world_size(self) -> int:
        """Number of data-parallel ranks."""
        return get_world_size()

    @property
    def data_parallel_rank(self) -> int:
        """Data-parallel rank (every rank is a data-parallel rank under DeepSpeed ZeRO)."""
        return get_rank()

    @property
    def device(self) -> torch.device:
        """Where micro-batches go (the engine's device)."""
        return self.engine.device

    def eval_model(self) -> nn.Module:
        """The model for scoring and diagnostics: the Hugging Face module itself (under ZeRO-3
        DeepSpeed's hooks gather each layer's parameters inside its forward, so every rank must
        run the same number of forwards)."""
        return self.model

    def export_merged(self, out_dir: str | os.PathLike, tokenizer: Any = None) -> Path | None:
        """Merged Hugging Face checkpoint from the whole parameters (collective).

        Under ZeRO-3 the export streams: one layer group at a time is gathered, merged and
        written by rank 0 as its own safetensors shard (see :func:`layerfreeze.export.export_merged`),
        so no rank ever holds the whole model. Other stages hold whole parameters already.

        Returns:
            The export directory on rank 0, None on other ranks.
        """
        from layerfreeze.export import export_merged

        out = None
        if self.zero_stage == 3:
            path = export_merged(
                self.applied, out_dir, tokenizer=tokenizer,
                gather=self.gathered_parameters, is_writer=get_rank() == 0,
            )
            out = Path(path) if get_rank() == 0 else None
        elif get_rank() == 0:
            out = Path(export_merged(self.applied, out_dir, tokenizer=tokenizer))
        barrier()
        return out

    @property
    def capabilities(self) -> EngineCapabilities:
        """Adapter export; every hook measure but ``grad_norm`` under ZeRO-3 (whose
        partitioned parameters the hooks gather layer by layer)."""
        from layerfreeze.diagnostics.hooks import HOOK_MEASURES
        from layerfreeze.diagnostics.measures import is_partitioned

        partitioned = is_partitioned(self.model)
        unsupported: tuple[tuple[str, str], ...] = ()
        if partitioned:
            unsupported = ((
                "grad_norm",
                "grad_norm needs whole parameters and ZeRO-3 partitions them; the engine's "
                "per-layer gradient norms (logging.per_layer_every) stand in",
            ),)
        skip = {m for m, _ in unsupported}
        return EngineCapabilities(
            export_adapter=True,
            sensitivity_measures=frozenset(m for m in HOOK_MEASURES if m not in skip),
            unsupported_measures=unsupported,
            partitioned_params=partitioned,
            model_parallel_params=False,
        )

    def sensitivity_hooks(self, probe_ids: torch.Tensor, measures: Sequence[str]) -> Any:
        """:class:`~layerfreeze.diagnostics.hooks.SensitivityHooks` on this model's layout
        (under ZeRO-3 pass ``gather=self.gathered_parameters`` to ``compute``)."""
        from layerfreeze.diagnostics.hooks import SensitivityHooks

        return SensitivityHooks(self.applied.layout, probe_ids, list(measures))

    def export_trainable(self, out_dir: str | os.PathLike) -> Path | None:
        """The trained tensors and the plan in layerfreeze's adapter format (collective).

        :func:`layerfreeze.export.save_trainable` on rank 0, with the trainable parameters
        gathered under ZeRO-3 (they are small for adapter plans); ``layerfreeze export
        --adapter-dir`` turns plain-LoRA ones into a PEFT / vLLM adapter.

        Returns:
            The directory on rank 0, None on other ranks.
        """
        from layerfreeze.export import save_trainable

        out = None
        with self.gathered_parameters([n for n, _ in self._named_trainable()]):
            if get_rank() == 0:
                out = Path(save_trainable(self.applied, out_dir))
        barrier()
        return out

    def close(self) -> None:
        """Destroy the DeepSpeed engine (idempotent)."""
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's groups (``name``, ``lr``, ``lr_scale``, ``weight_decay``, ...)."""
        return _torch_optimizer(self.engine.optimizer).param_groups

    def iter_layers(self) -> Iterator[tuple[int, nn.Module]]:
        """``(global layer index, block module)`` pairs of the model."""
        for layer in self.applied.layout.layers:
            yield layer.index, layer.module

    @staticmethod
    def linear_kinds() -> tuple[type, ...]:
        """Linear module types adapters wrap under this engine (plain ``nn.Linear``)."""
        return (nn.Linear,)

    # ---- optimizer state access (ZeRO-aware, collective under ZeRO) -------------------------

    def _named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        return _named_trainable(self.model, self._specs)

    def _full_fp32(self, p: nn.Parameter) -> torch.Tensor:
        return _full_fp32(self.engine, p)

    def _full_state(self, p: nn.Parameter, key: str) -> torch.Tensor:
        return _full_state(self.engine, p, key)

    def optimizer_state_numel(self) -> dict[str, int]:
        """See :func:`optimizer_state_numel` (collective under ZeRO)."""
        return optimizer_state_numel(self.engine)

    def _step_of_groups(self) -> list[int]:
        return _step_of_groups(self.engine)

    def _materialize_state(self, steps: Sequence[int]) -> None:
        _materialize_state(self.engine, steps)

    def _optimizer_state_snapshot(self) -> dict[int, tuple[torch.Tensor, dict[str, Any]]]:
        """This rank's Adam state (its own partitions only), to undo the lr-0 step of a window
        whose micro-batches were all bad: DeepSpeed must still run its step (collectives, grad
        reset), but the moments must not decay and the step count must not advance."""
        opt = _torch_optimizer(self.engine.optimizer)
        saved = {}
        for tensors in _state_tensors(self.engine.optimizer):
            for p in tensors:
                st = opt.state.get(p, {})
                saved[id(p)] = (p, {
                    k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                    for k, v in st.items()
                })
        return saved

    def _restore_optimizer_state(
        self, saved: Mapping[int, tuple[torch.Tensor, Mapping[str, Any]]]
    ) -> None:
        opt = _torch_optimizer(self.engine.optimizer)
        for p, before in saved.values():
            st = opt.state.get(p)
            if not st:
                continue
            for k, v in st.items():
                if k in before:
                    if isinstance(v, torch.Tensor):
                        v.copy_(before[k])
                    else:
                        st[k] = before[k]
                elif isinstance(v, torch.Tensor):
                    # no state before this step (the run's first window was all bad): zero
                    # moments at step 0 are exactly what Adam starts from
                    v.zero_()
                else:
                    st[k] = 0

    # ---- plan-schedule phases ---------------------------------------------------------------

    def maybe_switch_phase(self, global_step: int | None = None) -> bool:
        """Switch to the phase ``global_step`` falls in (default: the current step), if different.

        Returns:
            True when a switch happened.
        """
        step = self.global_step if global_step is None else global_step
        target = self.schedule.phase_at(step)
        if target == self.phase:
            return False
        self._switch_phase(target, carry=True)
        return True

    def _switch_phase(
        self, target: int, carry: bool, specs: list[GroupSpec] | None = None
    ) -> None:
        """Rebuild the engine for phase ``target``; carry master weights + Adam state when asked."""
        new_plan = self.schedule.plans[target]
        old_sched = self.lr_scheduler

        def build(new_specs: list[GroupSpec]) -> Any:
            self._build_engine(new_specs)
            self.lr_scheduler.carry_from(old_sched)
            return self.engine

        self.engine, self.applied, self._specs, self.switch_carry_bytes = switch_engine_plan(
            self.engine, self.applied, new_plan, self._specs,
            weight_decay=self.weight_decay, build=build, carry=carry, new_specs=specs,
        )
        self.phase = target
        log_rank0(
            logger,
            "plan-schedule phase %d: %s (%d trainable params)",
            target,
            new_plan,
            sum(
                p.numel() if not hasattr(p, "ds_numel") else p.ds_numel
                for _, p in self._named_trainable()
            ),
        )

    # ---- training ---------------------------------------------------------------------------

    def _agree(self, loss: torch.Tensor) -> tuple[bool, float]:
        return agree_finite(loss)

    def _zero_backward(self, micro_batch: Mapping[str, Any]) -> None:
        """Backward of an exact zero through the model (keeps DeepSpeed's per-micro-batch
        communication intact while adding nothing to the accumulated gradients)."""
        ids = micro_batch["input_ids"][:, :1]
        out = self.engine(input_ids=ids)
        logits = out.logits if hasattr(out, "logits") else out[0]
        self.engine.backward(logits.float().sum() * 0.0)

    def layer_grad_norms(self) -> dict[str, float]:
        """L2 norm of the averaged gradient per layer group (call at an accumulation boundary,
        after the last backward and before the step; collective under ZeRO)."""
        params = dict(self.model.named_parameters())
        out = {}
        for group, names in self.applied.layer_groups().items():
            sq = 0.0
            for n in names:
                g = safe_get_full_grad(params[n])
                if g is not None:
                    sq += float(g.detach().float().pow(2).sum())
            if names:
                out[group] = math.sqrt(sq)
        return out

    def train_step(
        self, micro_batches: Sequence[Mapping[str, Any]], grad_norms: bool = False
    ) -> StepOutput:
        """Run one optimizer step over ``gradient_accumulation_steps`` micro-batches.

        Switches plan-schedule phase first when the step crosses a boundary. A micro-batch whose
        loss is NaN/Inf on any rank is skipped on every rank (counted in ``bad_micro_batches``);
        when all are bad the step runs with lr 0, so no parameter moves (counted in
        ``skipped_steps``).

        Args:
            micro_batches: exactly ``gradient_accumulation_steps`` dicts for the model (e.g.
                ``input_ids`` and ``labels`` tensors on this rank's device).
            grad_norms: also return per-layer-group gradient norms (one all-gather per parameter).

        Returns:
            The :class:`StepOutput` of this step (same values on every rank).
        """
        gas = self.gradient_accumulation_steps
        if len(micro_batches) != gas:
            raise ValueError(
                f"train_step: got {len(micro_batches)} micro-batches, the DeepSpeed config's "
                f"gradient_accumulation_steps is {gas}. Pass exactly {gas}."
            )
        self.maybe_switch_phase()
        self.engine.train()
        losses, bad = [], 0
        norms: dict[str, float] = {}
        for i, mb in enumerate(micro_batches):
            loss = self._loss_fn(self.engine, mb)
            is_bad, mean_loss = self._agree(loss)
            if is_bad:
                bad += 1
                del loss
                self._zero_backward(mb)
            else:
                losses.append(mean_loss)
                self.engine.backward(loss)
            if i == gas - 1:
                if grad_norms:
                    norms = self.layer_grad_norms()
                skipped = bad == gas
                if skipped:
                    for g in self.param_groups:
                        g["lr"] = 0.0
            lr = self.lr_scheduler.base_lr
            saved = self._optimizer_state_snapshot() if i == gas - 1 and skipped else None
            self.engine.step()
            if saved is not None:
                self._restore_optimizer_state(saved)
        grad_norm = self.engine.get_global_grad_norm()
        self.global_step += 1
        self.bad_micro_batches += bad
        self.skipped_steps += int(skipped)
        return StepOutput(
            step=self.global_step,
            loss=float(np.mean(losses)) if losses else float("nan"),
            lr=lr,
            bad_micro_batches=bad,
            skipped=skipped,
            grad_norms=norms,
            phase=self.phase,
            grad_norm=None if grad_norm is None or skipped else float(grad_norm),
        )

    @torch.no_grad()
    def evaluate_loss(self, micro_batch: Mapping[str, Any]) -> float:
        """Loss of one batch without training (mean over ranks)."""
        self.engine.eval()
        loss = self._loss_fn(self.engine, micro_batch)
        self.engine.train()
        return self._agree(loss)[1]

    # ---- checkpoints ------------------------------------------------------------------------

    def _meta(self, trainable_only: bool, trained_before: list[str]) -> dict[str, Any]:
        return {
            "format": _META_FORMAT,
            "engine": "deepspeed",
            "step": self.global_step,
            "phase": self.phase,
            "schedule": self.schedule.to_dict(),
            "plan": self.schedule.plans[self.phase].to_dict(),
            "zero_stage": self.zero_stage,
            "world_size": get_world_size(),
            "trainable_only": trainable_only,
            "trained_frozen_params": trained_before,
            "groups": [s.to_dict() for s in self._specs],
            "bad_micro_batches": self.bad_micro_batches,
            "skipped_steps": self.skipped_steps,
        }

    def _trained_but_frozen(self) -> list[str]:
        return trained_then_frozen(self.applied, self.schedule, self.phase)

    @contextlib.contextmanager
    def gathered_parameters(
        self, names: Sequence[str] | None = None, modifier_rank: int | None = None
    ):
        """Context in which the named parameters (default: all) are whole on every rank.

        Under ZeRO-3 this gathers the partitions (``deepspeed.zero.GatheredParameters``); on
        exit, changes made on ``modifier_rank`` are re-partitioned. Other stages hold whole
        parameters already. Use it for the final export::

            with runner.gathered_parameters():
                if runner.rank == 0:
                    export_merged(runner.applied, out_dir)
        """
        with gathered_parameters(self.model, names, modifier_rank):
            yield

    def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Whole model state dict (CPU, module dtype) on rank 0; None on other ranks.

        Collective. Under ZeRO-3 the parameters are gathered one at a time (rank 0 builds the
        dict on CPU), never the whole model on a device at once."""
        if self.zero_stage != 3:
            if get_rank() == 0:
                return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            return None
        out: dict[str, torch.Tensor] = {}
        for key, t in self.model.state_dict(keep_vars=True).items():
            if isinstance(t, nn.Parameter) and hasattr(t, "ds_id"):
                with deepspeed.zero.GatheredParameters([t]):
                    if get_rank() == 0:
                        out[key] = t.detach().cpu().clone()
            elif get_rank() == 0:
                out[key] = t.detach().cpu().clone()
        return out if get_rank() == 0 else None

    def save_checkpoint(
        self,
        ckpt_dir: str | os.PathLike,
        step: int | None = None,
        client_state: Mapping[str, Any] | None = None,
        keep_last: int | None = None,
        trainable_only: bool = False,
        run_meta: Mapping[str, Any] | None = None,
    ) -> Path:
        """Save an atomic checkpoint (all ranks must call it).

        Besides DeepSpeed's own checkpoint (per-rank partitions: fastest to reload on the same
        layout) it holds a layout-independent part, ``elastic/``: each parameter's whole weight,
        fp32 master and Adam moments, written by one owner rank each (one parameter gathered at
        a time), from which :meth:`load_checkpoint` resumes on another world size or ZeRO stage.

        The DeepSpeed checkpoint (weights, optimizer, scheduler), this rank's ``client_state``
        (e.g. data position and RNG; JSON + safetensors, no pickle) and the layerfreeze state
        (plan, schedule, phase, optimizer groups) go into a staging directory that is renamed to
        ``<ckpt_dir>/step_<8-digit step>`` once complete; ``latest`` is updated after that.

        Args:
            ckpt_dir: checkpoint root.
            step: step to name the checkpoint by (default ``global_step``).
            client_state: per-rank picklable-free state (tensors, numpy arrays, numbers, strings,
                lists, tuples, str-keyed dicts) returned by :meth:`load_checkpoint`.
            keep_last: keep only this many newest checkpoints (None keeps all).
            trainable_only: store only parameters that are or were trainable (frozen base
                weights are excluded; loading needs the same base model).
            run_meta: engine-neutral run metadata stored beside the engine's (the recipe's
                tokenizer and model fingerprints, see :mod:`layerfreeze.resume`).

        Returns:
            The committed checkpoint directory.
        """
        root = Path(ckpt_dir)
        step = self.global_step if step is None else step
        trained_before = self._trained_but_frozen() if trainable_only else []
        staging = ckpt.prepare_staging(root, step) if get_rank() == 0 else None
        staging = Path(broadcast_object(str(staging) if staging else None))
        self.engine.save_checkpoint(
            str(staging),
            tag=_DS_TAG,
            client_state={_META_KEY: {"step": step, "phase": self.phase}},
            save_latest=False,
            exclude_frozen_parameters=trainable_only,
        )
        if trained_before:
            params = dict(self.model.named_parameters())
            tensors = {}
            for n in trained_before:  # one parameter gathered at a time
                with self.gathered_parameters([n]):
                    if get_rank() == 0:
                        tensors[n] = params[n].detach().cpu().clone().contiguous()
            if get_rank() == 0:
                save_file(tensors, str(staging / "trained_frozen.safetensors"))
            del tensors
        self._save_elastic(staging / _ELASTIC_DIR, trainable_only, trained_before)
        save_client_state(staging / "client", get_rank(), client_state or {})
        barrier()
        checksums = staged_checksums(staging)  # each rank hashes a share of the files
        committed = None
        if get_rank() == 0:
            info = ckpt.commit_checkpoint(
                root,
                staging,
                step,
                {
                    _META_KEY: self._meta(trainable_only, trained_before),
                    "run": dict(run_meta or {}),
                },
                keep_last=keep_last,
                checksums=checksums,
            )
            committed = str(info.path)
        committed = broadcast_object(committed)
        log_rank0(logger, "saved checkpoint %s", committed)
        return Path(committed)

    def load_checkpoint(
        self, ckpt_dir: str | os.PathLike, tag: str | None = None, verify: bool = True
    ) -> dict[str, Any]:
        """Resume from a checkpoint saved by :meth:`save_checkpoint` (all ranks must call it).

        Lands in the saved plan-schedule phase with the saved optimizer groups, weights,
        optimizer and scheduler state and counters.

        Args:
            ckpt_dir: checkpoint root (follows ``latest``) or one checkpoint directory.
            tag: checkpoint name under the root (``step_00000010``); default ``latest``.
            verify: check every file against the sha256 in the manifest first (the ranks share
                the reading; see :func:`layerfreeze.resume.verify_content`). The recipe passes
                False for a checkpoint it has just verified.

        Returns:
            This rank's ``client_state`` as given to :meth:`save_checkpoint`.

        Raises:
            CheckpointError: nothing loadable there, a damaged checkpoint, one from another
                plan/schedule, or one from another ZeRO stage or world size without the
                layout-independent part (the message says which).
        """
        info = ckpt.resolve_checkpoint(ckpt_dir, tag)
        if verify:
            check_content(info)
        meta = info.meta.get(_META_KEY)
        if not isinstance(meta, dict) or meta.get("format") != _META_FORMAT:
            raise ckpt.CheckpointError(
                f"{info.path}: not a layerfreeze DeepSpeed checkpoint (no layerfreeze metadata)."
            )
        problems = engine_problems(meta, engine="deepspeed", schedule=self.schedule.to_dict())
        if problems:
            raise ckpt.CheckpointError(
                f"{info.path}: cannot resume this run from it: " + "; ".join(problems) + "."
            )
        elastic = meta["world_size"] != get_world_size() or meta["zero_stage"] != self.zero_stage
        if elastic and not (info.path / _ELASTIC_DIR / _ELASTIC_INDEX).is_file():
            problems.append(
                f"saved with {meta['world_size']} ranks at ZeRO stage {meta['zero_stage']}, this "
                f"run has {get_world_size()} at stage {self.zero_stage}, and the checkpoint has no "
                f"layout-independent '{_ELASTIC_DIR}/' part (older layerfreeze); resume it on "
                "its own layout"
            )
        if problems:
            raise ckpt.CheckpointError(
                f"{info.path}: cannot resume this run from it: " + "; ".join(problems) + "."
            )
        specs = [GroupSpec(**g) for g in meta["groups"]]
        if meta["phase"] != self.phase or [s.to_dict() for s in specs] != [
            s.to_dict() for s in self._specs
        ]:
            self._switch_phase(int(meta["phase"]), carry=False, specs=specs)
        if elastic:
            log_rank0(
                logger,
                "elastic resume: checkpoint of %d ranks at ZeRO-%d onto %d ranks at ZeRO-%d",
                meta["world_size"], meta["zero_stage"], get_world_size(), self.zero_stage,
            )
            self._load_elastic(info.path / _ELASTIC_DIR, int(meta["step"]))
        else:
            self._load_ds(info.path, meta)
        self.global_step = int(meta["step"])
        self.bad_micro_batches = int(meta["bad_micro_batches"])
        self.skipped_steps = int(meta["skipped_steps"])
        client_dir = info.path / "client"
        rank = get_rank()
        if not (client_dir / f"rank_{rank:05d}.json").exists():
            rank = 0  # an elastic resume onto more ranks: the new ranks start from rank 0's
        state = load_client_state(client_dir, rank)
        barrier()
        log_rank0(
            logger, "resumed from %s (step %d, phase %d)", info.path, self.global_step, self.phase
        )
        return state

    def _load_ds(self, path: Path, meta: Mapping[str, Any]) -> None:
        """Load DeepSpeed's own checkpoint (same world size and ZeRO stage as saved)."""
        try:
            load_path, _ = self.engine.load_checkpoint(
                str(path),
                tag=_DS_TAG,
                load_module_strict=not meta["trainable_only"],
            )
        except Exception as e:
            # torch found a damaged file (a checkpoint without checksums, or one changed after
            # it was verified): name the file instead of a deep traceback. Anything else that
            # is not a file torch cannot read goes up unchanged.
            damaged = _unreadable_ds_file(path / _DS_TAG)
            if damaged is None:
                raise
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ckpt.CheckpointError(
                f"{path}: {damaged} cannot be loaded ({type(e).__name__}: {reason}): the "
                "checkpoint is damaged. Resume from an earlier checkpoint or delete this one."
            ) from None
        if load_path is None:
            raise ckpt.CheckpointError(
                f"{path}: DeepSpeed could not load the checkpoint in '{_DS_TAG}/'."
            )
        if meta["trained_frozen_params"]:
            tensors = load_file(str(path / "trained_frozen.safetensors"))
            params = dict(self.model.named_parameters())
            for n in meta["trained_frozen_params"]:  # one parameter gathered at a time
                with self.gathered_parameters([n], modifier_rank=0):
                    # ZeRO-3 re-partitions rank 0's values on exit; other stages hold whole copies
                    if get_rank() == 0 or self.zero_stage != 3:
                        with torch.no_grad():
                            params[n].copy_(tensors[n])

    def _save_elastic(
        self, directory: Path, trainable_only: bool, trained_before: Sequence[str]
    ) -> None:
        """Write the layout-independent part of a checkpoint (collective).

        Per parameter: its whole weight (module dtype) and, for a trainable one, its whole fp32
        master and Adam moments. Each parameter has one owner rank (balanced by size) that keeps
        and writes its tensors to ``rank_<r>.safetensors``; at most one parameter is gathered at
        a time, so a rank holds O(model / world) extra CPU bytes. ``index.json`` (rank 0) maps
        every name to its file and holds each group's Adam step and the lr scheduler's state.
        """
        _relink_optimizer_state(self.engine.optimizer)
        group_steps = self._step_of_groups()
        params = dict(self.model.named_parameters())
        step_of = {
            n: st for spec, st in zip(self._specs, group_steps, strict=True) for n in spec.params
        }
        keep = set(step_of) | set(trained_before)
        names = [n for n in params if not trainable_only or n in keep]
        owners = _balanced_owners(names, params)
        rank = get_rank()
        mine: dict[str, torch.Tensor] = {}
        for n in names:  # the same order on every rank: the gathers below are collective
            p, is_mine = params[n], owners[n] == rank
            with self.gathered_parameters([n]):
                if is_mine:
                    mine[f"weight:{n}"] = p.detach().cpu().clone()
            if n in step_of:
                keys = ("master", *(_ADAM_STATE_KEYS if step_of[n] > 0 else ()))
                for key in keys:
                    full = self._full_fp32(p) if key == "master" else self._full_state(p, key)
                    if is_mine:
                        mine[f"{key}:{n}"] = full.contiguous()
                    del full
        directory.mkdir(parents=True, exist_ok=True)
        save_file(mine, str(directory / f"rank_{rank:05d}.safetensors"))
        del mine
        if rank == 0:
            from layerfreeze.utils.io import atomic_write_json

            atomic_write_json(
                directory / _ELASTIC_INDEX,
                {
                    "format": _ELASTIC_FORMAT,
                    "files": {n: f"rank_{owners[n]:05d}.safetensors" for n in names},
                    "trainable": {n: step_of[n] for n in names if n in step_of},
                    "group_steps": group_steps,
                    "lr_scheduler": self.lr_scheduler.state_dict(),
                    "skipped_steps": int(self.engine.skipped_steps),
                },
            )

    def _load_elastic(self, directory: Path, step: int) -> None:
        """Load the layout-independent part written by :meth:`_save_elastic` (collective).

        Every rank reads each whole tensor from the shared checkpoint directory, one parameter
        at a time, and keeps what its layout needs (its partition under ZeRO)."""
        from safetensors import safe_open

        index = json.loads((directory / _ELASTIC_INDEX).read_text(encoding="utf-8"))
        if index.get("format") != _ELASTIC_FORMAT:
            raise ckpt.CheckpointError(
                f"{directory / _ELASTIC_INDEX}: unknown format {index.get('format')!r}, "
                f"expected {_ELASTIC_FORMAT!r}."
            )
        params = dict(self.model.named_parameters())
        unknown = sorted(set(index["files"]) - set(params))
        missing = sorted({n for n, _ in self._named_trainable()} - set(index["trainable"]))
        if unknown or missing:
            raise ckpt.CheckpointError(
                f"{directory}: does not match this model ("
                + "; ".join(
                    ([f"unknown parameters {unknown[:5]}"] if unknown else [])
                    + ([f"no optimizer state for trainable {missing[:5]}"] if missing else [])
                )
                + "). Resume with the model and plan the checkpoint was saved with."
            )
        handles = {
            f: safe_open(str(directory / f), framework="pt")
            for f in sorted(set(index["files"].values()))
        }

        def read(key: str, n: str) -> torch.Tensor | None:
            h = handles[index["files"][n]]
            return h.get_tensor(f"{key}:{n}") if f"{key}:{n}" in h.keys() else None

        for n in index["files"]:  # the same order on every rank
            with self.gathered_parameters([n], modifier_rank=0):
                # ZeRO-3 re-partitions rank 0's values on exit; other stages hold whole copies
                if get_rank() == 0 or self.zero_stage != 3:
                    with torch.no_grad():
                        params[n].copy_(read("weight", n))
        self._materialize_state(list(index["group_steps"]))
        opt = _torch_optimizer(self.engine.optimizer)
        for n, p in self._named_trainable():
            master = read("master", n)
            if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
                safe_set_full_fp32_param(p, master.to(p.device))
                for key in _ADAM_STATE_KEYS:
                    t = read(key, n)
                    if t is not None:
                        safe_set_full_optimizer_state(p, t.to(p.device), key)
            else:  # ZeRO-0: torch optimizer over the parameters or their fp32 copies
                hp = _plain_master(self.engine.optimizer, p)
                with torch.no_grad():
                    hp.copy_(master.to(hp.dtype))
                    for key in _ADAM_STATE_KEYS:
                        t = read(key, n)
                        if t is not None:
                            opt.state[hp][key].copy_(t)
        self.lr_scheduler.load_state_dict(index["lr_scheduler"])
        self.engine.global_steps = step
        self.engine.global_samples = step * int(self.engine.train_batch_size())
        self.engine.skipped_steps = int(index["skipped_steps"])
        barrier()


def _unreadable_ds_file(directory: Path) -> str | None:
    """The first file of a DeepSpeed checkpoint directory torch cannot load (relative to its
    parent), or None when all load; only called after a load failed."""
    for f in sorted(directory.glob("*.pt")):
        try:
            torch.load(str(f), map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - any failure marks the damaged file
            return f"{directory.name}/{f.name}"
    return None
