"""State carry at a plan-schedule phase switch: a new DeepSpeed engine, the old one's state kept.

Owns :func:`switch_engine_plan` (used by :class:`DeepSpeedRunner` and ``hf_trainer``) and
``_Carry``, which holds the fp32 masters and Adam moments of the parameters that stay trainable
across the rebuild (on one owner rank each when the optimizer is partitioned).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
from torch import nn

from layerfreeze.engines.deepspeed.zero_state import (
    _ADAM_STATE_KEYS,
    _balanced_owners,
    _full_fp32,
    _full_state,
    _materialize_state,
    _named_trainable,
    _plain_master,
    _relink_optimizer_state,
    _step_of_groups,
    _torch_optimizer,
)
from layerfreeze.optim import GroupSpec, group_specs
from layerfreeze.utils.dist import get_rank, get_world_size


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


def destroy_engine(engine: Any) -> None:
    """``engine.destroy()``, then remove the forward hooks the engine put on its module.

    DeepSpeed's ``destroy`` leaves the module's forward pre/post hooks in place; they close over
    the engine, so a module that outlives its engine (every phase switch) would keep each old
    engine and its optimizer state (fp32 master partitions, Adam moments) alive, and run the old
    engines' forward prologues, for the rest of the run.
    """
    engine.destroy()
    for attr in ("module_forward_pre_hook", "module_forward_post_hook"):
        handle = getattr(engine, attr, None)
        if handle is not None:
            handle.remove()
            setattr(engine, attr, None)


def release_flat_buffers(model: nn.Module) -> int:
    """Give every parameter that views a larger storage its own copy; return the bytes copied.

    ZeRO-1/2 moves the trainable parameters into one flat buffer per group and points each
    ``param.data`` at a view of it. When the engine is destroyed, the parameters that stop
    training keep those views, so every old engine's flat buffer stayed alive for the rest of
    the run (a LISA run grew by one buffer per switch). ZeRO-3 parameters (partitioned, their
    data a placeholder) are left alone.
    """
    copied = 0
    for p in model.parameters():
        if hasattr(p, "ds_id") or p.numel() == 0:
            continue
        if p.data.untyped_storage().nbytes() > p.numel() * p.element_size():
            p.data = p.data.clone()
            copied += p.numel() * p.element_size()
    return copied


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
        engine: the current engine, built over ``specs`` (destroyed here; pass the only
            reference to free its optimizer state before the new engine is built).
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
    destroy_engine(engine)
    del engine  # the caller passed its only reference: the old optimizer state is freed here
    release_flat_buffers(applied.model)  # ... and the old flat parameter buffers
    gc.collect()  # a DeepSpeed engine sits in reference cycles: free it before building the next
    applied = applied.switch_plan(new_plan)
    if new_specs is None:
        new_specs = group_specs(applied, weight_decay, state.steps)
    engine = build(new_specs)
    state.restore(engine, applied.model, new_specs)
    return engine, applied, new_specs, nbytes
