"""Megatron optimizer state per parameter: where a parameter's fp32 master weight and Adam moments
live, and reading / writing them whole.

Megatron wraps torch's Adam in a ``ChainedOptimizer`` of per-buffer optimizers: the plain
``FP32Optimizer`` (the parameter itself is the master), ``Float16OptimizerWithFloat16Params``
(``float16_groups`` / ``fp32_from_float16_groups`` pair each bf16/fp16 parameter with its fp32
master) and the ``DistributedOptimizer`` (each data-parallel rank holds a flat range of each
master). The runner's phase switch carries state through :func:`full_state` / :func:`set_state`;
its checkpoints read :func:`local_state`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import nn

__all__ = [
    "ADAM_KEYS",
    "inner_optimizers",
    "float16_pairs",
    "owner",
    "local_state",
    "full_state",
    "set_state",
    "optimizer_state_numel",
]

#: Adam moment keys of torch's optimizer state.
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def inner_optimizers(optimizer: Any) -> list[Any]:
    """The per-buffer Megatron optimizers inside a ``ChainedOptimizer`` (or itself)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def float16_pairs(opt: Any) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """``(bf16/fp16 parameters, their fp32 masters)`` per group of a Megatron float16 optimizer
    (empty for any other optimizer)."""
    lp, hp = getattr(opt, "float16_groups", None), getattr(opt, "fp32_from_float16_groups", None)
    if lp is None or hp is None:
        return []
    return list(zip(lp, hp, strict=True))


def owner(optimizer: Any, param: nn.Parameter) -> Any:
    """The inner optimizer that updates ``param`` (None: no optimizer holds it, e.g. frozen)."""
    for opt in inner_optimizers(optimizer):
        if hasattr(opt, "model_param_group_index_map"):  # distributed optimizer
            if param in getattr(opt, "model_param_gbuf_map", {}):
                return opt
        elif getattr(opt, "optimizer", None) is not None:
            if any(param is q for g in float16_pairs(opt) for q in g[0]) or any(
                param is q for g in opt.optimizer.param_groups for q in g["params"]
            ):
                return opt
    return None


def local_state(
    optimizer: Any, param: nn.Parameter
) -> tuple[dict[str, torch.Tensor], slice | None]:
    """This rank's (master, Adam moments, step) of ``param`` and the flat range it covers
    (None: the whole parameter; an empty dict: this rank holds none of it)."""
    opt = owner(optimizer, param)
    if opt is None:
        return {}, None
    if hasattr(opt, "model_param_group_index_map"):
        if param not in opt.model_param_group_index_map:
            return {}, slice(0, 0)
        rng = opt._get_model_param_range_map(param)["param"]
        gi, go = opt.model_param_group_index_map[param]
        main = opt.optimizer.param_groups[gi]["params"][go]
        state = opt.optimizer.state.get(main, {})
        return {"master": main, **state}, slice(rng.start, rng.end)
    main = param
    for lp_group, hp_group in float16_pairs(opt):
        for lp, hp in zip(lp_group, hp_group, strict=True):
            if lp is param:
                main = hp
    return {"master": main, **opt.optimizer.state.get(main, {})}, None


def full_state(optimizer: Any, param: nn.Parameter, distributed: bool) -> dict[str, torch.Tensor]:
    """Whole fp32 master, Adam moments and step of ``param`` on this rank (collective over the
    data-parallel group when ``distributed``: Megatron's distributed optimizer)."""
    local, rng = local_state(optimizer, param)
    if not distributed:
        out = {k: v.detach().float().clone() for k, v in local.items()}
        if "step" in out:
            out["step"] = out["step"].reshape(())
        return out
    n = param.numel()
    flat = torch.zeros(3, n, dtype=torch.float32, device=param.device)
    step = torch.zeros(1, dtype=torch.float64, device=param.device)
    if local and rng is not None and rng.stop > rng.start:
        for row, key in enumerate(("master", *ADAM_KEYS)):
            if key in local:
                flat[row, rng] = local[key].detach().float().view(-1)
        if "step" in local:
            step[0] = float(local["step"])
    group = ps.get_data_parallel_group()
    dist.all_reduce(flat, group=group)
    dist.all_reduce(step, op=dist.ReduceOp.MAX, group=group)
    out = {"master": flat[0].view_as(param)}
    if step[0] > 0:
        out.update({k: flat[i + 1].view_as(param) for i, k in enumerate(ADAM_KEYS)})
        out["step"] = torch.tensor(float(step[0]))
    return out


def set_state(optimizer: Any, param: nn.Parameter, full: Mapping[str, torch.Tensor]) -> None:
    """Write whole master / moments / step into this rank's optimizer (its range of them)."""
    local, rng = local_state(optimizer, param)
    if not local or (rng is not None and rng.stop <= rng.start):
        return
    opt = owner(optimizer, param)
    main = local["master"]

    def piece(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device=main.device, dtype=torch.float32)
        return t.reshape(-1)[rng].view_as(main) if rng is not None else t.view_as(main)

    with torch.no_grad():
        main.copy_(piece(full["master"]).to(main.dtype))
        if main is not param and rng is None:
            param.copy_(full["master"].to(device=param.device, dtype=param.dtype))
        if "step" in full:
            st = opt.optimizer.state[main]
            st["step"] = torch.tensor(float(full["step"]), dtype=torch.float32)
            for k in ADAM_KEYS:
                st[k] = piece(full[k]).clone().to(main.dtype)


def optimizer_state_numel(optimizer: Any) -> dict[str, int]:
    """Elements held in optimizer state summed over all ranks, per key (``master`` counts the
    tensors the torch optimizer updates; Adam moments once materialised). Collective.

    A frozen parameter adds nothing: gradient buffers, master copies and moments exist only
    for parameters with ``requires_grad`` when Megatron built them.
    """
    counts = {"master": 0, "exp_avg": 0, "exp_avg_sq": 0}
    for opt in inner_optimizers(optimizer):
        torch_opt = getattr(opt, "optimizer", None)
        if torch_opt is None:
            continue
        for g in torch_opt.param_groups:
            for p in g["params"]:
                counts["master"] += p.numel()
                for k in ADAM_KEYS:
                    v = torch_opt.state.get(p, {}).get(k)
                    if isinstance(v, torch.Tensor):
                        counts[k] += v.numel()
    keys = sorted(counts)
    t = torch.tensor([counts[k] for k in keys], dtype=torch.float64)
    if dist.is_initialized():
        # replicas hold identical copies without the distributed optimizer: count one replica
        if not any(hasattr(o, "model_param_group_index_map") for o in inner_optimizers(optimizer)):
            if ps.get_data_parallel_rank() != 0:
                t.zero_()
        dist.all_reduce(t)
    return {k: int(v) for k, v in zip(keys, t.tolist(), strict=True)}
