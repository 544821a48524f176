"""DeepSpeed optimizer internals: where ZeRO keeps master weights and Adam state, read and written.

Owns the access to the torch optimizer inside DeepSpeed's wrapper (per-group state tensors,
the fp32 masters of ZeRO-0 mixed precision, the re-link of ZeRO-1/2 state fragments), the whole
fp32 master / Adam moment of a parameter (collective under ZeRO), zero-initialised Adam state,
:func:`optimizer_state_numel` and :func:`gathered_parameters` (ZeRO-3 gathers). What a phase
switch and a checkpoint move through these functions lives in ``switch.py`` / ``checkpoint.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import (
    lazy_init_hp_params_optimizer_state,
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
)
from torch import nn

from layerfreeze.models import param_numel
from layerfreeze.optim import GroupSpec
from layerfreeze.utils.dist import get_world_size, is_dist

#: Optimizer-state tensors carried over at a phase switch (Adam / AdamW).
_ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


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
