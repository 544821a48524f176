"""The runner's checkpoint payload in megatron-core distributed checkpointing (``checkpoint.format:
dist``): weights and Adam state that reshard to another TP / PP / virtual-pipeline layout.

What is written (``dist/`` of the checkpoint directory, ``dist_checkpointing.save``, torch_dist):

* **weights**: every module's ``sharded_state_dict(metadata={"non_homogeneous_layers": True})``
  (per-layer keys with the global layer index, adapters included through
  :mod:`~layerfreeze.engines.megatron.sharded`), or with ``trainable_only`` only what the plan
  trains, trained in an earlier phase, or installed as an adapter (NeMo's PEFT checkpoints);
* **optimizer state** of the plain (non-distributed) Megatron optimizer: each trainable
  parameter's Adam moments (and its fp32 master when the model is bf16/fp16) as tensors with the
  parameter's own sharding (``optimizer.state.<exp_avg|exp_avg_sq|fp32_param>.<key>``, the keys
  megatron-core's ``optimizer.sharded_state_dict`` gives them), so they reshard with it. The
  optimizer's param groups are not stored: the runner rebuilds them from the plan (megatron-core's
  group matching fails when a pipeline stage of the saving layout lacks a group another layout
  needs). Adam steps differ per parameter after a plan-schedule switch, so they are stored per
  key in ``optim_steps.json``.

The lr schedule, counters, client state (data cursor) and the manifest (sha256, atomic commit)
are the same as the safetensors format's (:mod:`~layerfreeze.engines.megatron.checkpoint`).

Refused with one line: Megatron's distributed optimizer (its sharded state in megatron-core
0.16.1 does not reshard on CPU / gloo: ``flattened_range is not supported``, and its
``dp_reshardable`` format asserts one optimizer step for all parameters).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from layerfreeze import checkpoint as ckpt
from layerfreeze.engines.megatron.optim_state import ADAM_KEYS, inner_optimizers
from layerfreeze.utils.io import atomic_write_json

if TYPE_CHECKING:
    from layerfreeze.engines.megatron.runner import MegatronRunner

__all__ = [
    "FORMATS",
    "DIST_DIR",
    "STEPS_FILE",
    "check_supported",
    "save_dist",
    "load_dist",
]

#: ``checkpoint.format`` values: per-rank safetensors tied to the layout, or megatron-core's
#: distributed checkpoint.
FORMATS = ("safetensors", "dist")
DIST_DIR = "dist"
STEPS_FILE = "optim_steps.json"
#: fp32 master copies of bf16 / fp16 parameters (megatron-core's own prefix for them).
_MASTER = "fp32_param"


def check_supported(runner: MegatronRunner) -> None:
    """Raise ``ValueError`` (one line) when the runner's setup cannot use ``format: dist``."""
    if runner._opt_kwargs["use_distributed_optimizer"]:
        raise ValueError(
            "checkpoint.format: dist does not support megatron.use_distributed_optimizer: true "
            "(megatron-core 0.16.1 cannot reshard the distributed optimizer's state). Use the "
            "plain optimizer (use_distributed_optimizer: false) or checkpoint.format: safetensors."
        )


def _flatten(d: dict, path: tuple = ()) -> dict[tuple, Any]:
    out: dict[tuple, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, path + (k,)))
        else:
            out[path + (k,)] = v
    return out


def _is_sharded(v: Any) -> bool:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return isinstance(v, (ShardedTensor, ShardedTensorFactory))


def model_sharded_state_dict(runner: MegatronRunner, names: set[str] | None) -> dict:
    """``{"model<i>": sharded state dict of chunk i}``; with ``names`` (runner parameter names)
    only those parameters' tensors."""
    from layerfreeze.engines.common import unwrap_module

    out: dict = {}
    multi = len(runner.chunks) > 1
    for i, chunk in enumerate(runner.chunks):
        module = unwrap_module(chunk, stop_at="decoder")
        sd = module.sharded_state_dict(metadata={"non_homogeneous_layers": True})
        if names is not None:
            pre = f"{i}." if multi else ""
            keep = {id(p) for n, p in chunk.named_parameters() if pre + n in names}
            flat = {p: v for p, v in _flatten(sd).items() if id(getattr(v, "data", None)) in keep}
            sd = {".".join(map(str, p)): v for p, v in flat.items()}
        out[f"model{i}"] = sd
    return out


def _optimizer_entries(runner: MegatronRunner, model_sd: dict, keys: set[str] | None) -> tuple:
    """``(sharded optimizer tensors, {key: Adam step})`` of this rank's trainable parameters.

    ``keys``: when loading, the parameter keys whose Adam state the checkpoint holds (their
    state is created here to be loaded into); None when saving.
    """
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    by_id = {id(v.data): v for v in _flatten(model_sd).values() if _is_sharded(v)}
    params = dict(runner._root.named_parameters())
    tensors: dict[str, Any] = {}
    steps: dict[str, int] = {}
    for n in runner.applied.trainable_names():
        p = params[n]
        sh = by_id.get(id(p))
        local, _ = runner._local_state(p)
        if sh is None or not local:
            continue
        main = local["master"]
        state: dict[str, torch.Tensor] = {}
        if keys is None:
            if "step" in local:
                steps[sh.key] = int(local["step"])
                state.update({k: local[k] for k in ADAM_KEYS})
        elif sh.key in keys:
            st = runner._owner(p).optimizer.state[main]
            for k in ADAM_KEYS:
                if not isinstance(st.get(k), torch.Tensor):
                    st[k] = torch.zeros_like(main)
            state.update({k: st[k] for k in ADAM_KEYS})
        if main is not p:
            state[_MASTER] = main
        for k, t in state.items():
            tensors[f"{k}/{n}"] = make_sharded_optimizer_tensor(
                sh, t, prefix=f"optimizer.state.{k}"
            )
    return tensors, steps


def save_dist(runner: MegatronRunner, staging: Path, names: list[str] | None) -> None:
    """Write the weights (``names``, or all) and the optimizer state into ``staging``
    (collective; every rank calls it)."""
    from megatron.core import dist_checkpointing

    check_supported(runner)
    model_sd = model_sharded_state_dict(runner, None if names is None else set(names))
    optim, steps = _optimizer_entries(runner, model_sd, None)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, steps)
    target = staging / DIST_DIR
    if runner.rank == 0:
        target.mkdir()
        merged = {k: v for part in gathered for k, v in part.items()}
        atomic_write_json(staging / STEPS_FILE, dict(sorted(merged.items())))
    dist.barrier()
    dist_checkpointing.save({"model": model_sd, "optimizer": optim}, str(target))
    dist.barrier()


@torch.no_grad()
def load_dist(runner: MegatronRunner, path: Path, names: list[str] | None) -> None:
    """Load weights (``names``, or all) and optimizer state from checkpoint directory ``path``
    into this rank's layout (any TP / PP / virtual chunks; collective).

    Raises:
        CheckpointError: the checkpoint lacks a tensor this model needs (another plan).
    """
    from layerfreeze.engines.megatron.sharded import load_sharded_into

    check_supported(runner)
    steps_path = path / STEPS_FILE
    try:
        steps = json.loads(steps_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ckpt.CheckpointError(f"{steps_path}: unreadable ({e}).") from None
    model_sd = model_sharded_state_dict(runner, None if names is None else set(names))
    # the keys before loading: dist_checkpointing.load replaces factories in place
    by_id = {id(v.data): v.key for v in _flatten(model_sd).values() if _is_sharded(v)}
    optim, _ = _optimizer_entries(runner, model_sd, set(steps))
    try:
        load_sharded_into(
            runner._root, {"model": model_sd, "optimizer": optim}, str(path / DIST_DIR)
        )
    except ValueError as e:
        raise ckpt.CheckpointError(str(e)) from None
    params = dict(runner._root.named_parameters())
    for n in runner.applied.trainable_names():
        key = by_id.get(id(params[n]))
        local, _ = runner._local_state(params[n])
        if key is None or not local or key not in steps:
            continue
        st = runner._owner(params[n]).optimizer.state[local["master"]]
        st["step"] = torch.tensor(float(steps[key]), dtype=torch.float32)
    for opt in inner_optimizers(runner.optimizer):  # fp32 masters -> bf16 / fp16 params
        if hasattr(opt, "_copy_main_params_to_model_params"):
            opt._copy_main_params_to_model_params()


@torch.no_grad()
def load_weights_dist(runner: MegatronRunner, path: Path, required: list[str]) -> list[str]:
    """Copy every weight this rank holds that checkpoint ``path`` stores (any layout); optimizer
    state untouched. Returns the runner parameter names loaded.

    Raises:
        CheckpointError: a name in ``required`` has no tensor in the checkpoint (another plan).
    """
    from megatron.core import dist_checkpointing

    from layerfreeze.engines.megatron.sharded import load_sharded_into

    saved = set(dist_checkpointing.load_tensors_metadata(str(path / DIST_DIR)))
    model_sd = model_sharded_state_dict(runner, None)
    key_of = {id(v.data): v.key for v in _flatten(model_sd).values() if _is_sharded(v)}
    params = dict(runner._root.named_parameters())
    names = [n for n, p in params.items() if key_of.get(id(p)) in saved]
    missing = sorted(set(required) - set(names))
    if missing:
        raise ckpt.CheckpointError(
            f"{path / DIST_DIR}: no tensor for {[key_of.get(id(params[n]), n) for n in missing][:5]}"
            f"{' ...' if len(missing) > 5 else ''}. The checkpoint was saved for another plan."
        )
    sharded = model_sharded_state_dict(runner, set(names))
    try:
        load_sharded_into(runner._root, sharded, str(path / DIST_DIR))
    except ValueError as e:
        raise ckpt.CheckpointError(str(e)) from None
    return names
