"""Adapters in megatron-core distributed checkpoints (``dist_checkpointing``).

megatron-core saves a model through ``model.sharded_state_dict()``: every module describes its
tensors as ``ShardedTensor`` s (a key, the local data, the global shape and this rank's offset
in it, a ``replica_id`` saying which copy of a replicated tensor is written). Three conventions
of megatron-core 0.16.1 matter for layerfreeze's adapters:

* **Tensor-parallel splits.** A tensor split over the TP ranks is declared with its *global*
  shape and this rank's offset along the split axis; a replicated one with ``replica_id`` =
  ``(0, tp_rank, dp_rank)`` so only TP rank 0 of DP rank 0 writes it. The base linears declare
  only their ``weight`` / ``bias`` as split: without the methods here they would declare their
  ``lora_adapter`` child's shards as replicated tensors of the local shape (ranks overwrite
  each other on save; a TP=1 load sees a shape mismatch). Strided splits (SwiGLU ``linear_fc1``
  interleaves gate and up rows per rank) are declared as ``stride`` pieces, the way
  megatron's ``apply_swiglu_sharded_factory`` does for the weight, so a load at another TP size
  reassembles them.
* **Layer stacking.** ``TransformerBlock`` gives every layer of a stage the same keys
  (``decoder.layers.mlp.linear_fc1.weight``) plus a leading offset ``(0, layer, num_layers)``:
  one tensor of shape ``(num_layers, ...)`` per key. A plan puts adapters on *some* layers, and
  a stacked tensor with missing layers is an invalid access pattern. Adapter tensors therefore
  get per-layer keys with the global layer index (``decoder.layers.2.mlp.linear_fc1.
  lora_adapter.lora_b``) and no stacking offset, whichever way the block stacks its own layers
  (``metadata["non_homogeneous_layers"]`` gives the base weights per-layer keys too; the
  adapter keys are the same in both modes).
* **Transformer Engine linears.** megatron-core's TE wrappers (``TELayerNormColumnParallelLinear``,
  ``TEColumnParallelLinear``, ``TERowParallelLinear``) also build their view from
  ``self.state_dict(keep_vars=True)``, child modules included, with ``{"weight": 0, "bias": 0}``
  / ``{"weight": 1}`` as the only split tensors: ``lora_a`` / ``lora_b`` would be declared
  replicated like the layer-norm weight. :func:`linear_sharded_state_dict` (installed by
  ``layerfreeze.engines.megatron.te.build_te_adapter``) replaces exactly the ``lora_adapter.``
  entries and keeps the rest, TE's ``_extra_state`` (a ``ShardedObject``) included, as the
  class writes it.
* **Gates.** ``MLP.sharded_state_dict`` calls ``sharded_state_dict`` on every child, so the HLPT
  gate (``lora_gate``, a :class:`~layerfreeze.policies.gate.TokenGate`) has one; its tensors are
  replicated over TP.

Besides the per-module methods (:func:`adapter_sharded_state_dict`, used by
:class:`~layerfreeze.engines.megatron.lora.ParallelLoRAAdapter`,
:class:`~layerfreeze.engines.megatron.prefix.MegatronPrefix` and ``TokenGate``, and
:func:`linear_sharded_state_dict`, installed on every wrapped linear), this module builds the
adapter-only checkpoint of a plan: :func:`trained_sharded_state_dict` (what the plan trains:
adapters and fully trained layers), :func:`base_sharded_state_dict` (the model without its
adapters, with megatron's own keys: a pretrained checkpoint loads into a model that already
carries a plan), and :func:`save_trained` / :func:`load_trained`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from layerfreeze.engines.common import unwrap_module

__all__ = [
    "adapter_sharded_state_dict",
    "linear_sharded_state_dict",
    "install_linear_sharded_state_dict",
    "trained_sharded_state_dict",
    "base_sharded_state_dict",
    "save_trained",
    "load_trained",
    "load_sharded_into",
]

_LORA_ATTR = "lora_adapter"
_LAYER = re.compile(r"(?:^|\.)layers\.\d+\.")


def _groups(tp_group, metadata: dict | None):
    from megatron.core import parallel_state
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    metadata = ensure_metadata_has_dp_cp_group(metadata)
    if tp_group is None:
        tp_group = parallel_state.get_tensor_model_parallel_group()
    return tp_group, metadata["dp_cp_group"]


def _rank_size(group) -> tuple[int, int]:
    from megatron.core.utils import get_pg_rank, get_pg_size

    return get_pg_rank(group), get_pg_size(group)


def _per_layer_key(prefix: str, name: str, sharded_offsets: Iterable) -> str:
    """The checkpoint key of an adapter tensor: per layer, with the global layer index.

    ``TransformerBlock`` calls a layer with the prefix ``...layers.<local>.`` and, in its stacked
    mode, the offset ``(0, <global>, num_layers)``, then rewrites every key's
    ``...layers.<local>.`` to ``...layers.``. Writing the key as ``...layers.<local>.<global>.rest``
    makes that rewrite produce ``...layers.<global>.rest``. Without an offset (per-layer mode)
    the block rewrites the prefix to the global index itself.

    Raises:
        ValueError: offsets other than the single layer-stacking one, or no ``layers.<n>.`` in
            the prefix while there is one.
    """
    offsets = tuple(sharded_offsets)
    if not offsets:
        return f"{prefix}{name}"
    if len(offsets) != 1 or offsets[0][0] != 0:
        raise ValueError(
            f"{prefix}{name}: layerfreeze adapters expect only megatron's layer-stacking offset "
            f"(0, layer, num_layers) from the transformer block, got sharded_offsets={offsets}. "
            "Call sharded_state_dict on the model (or pass "
            "metadata={'non_homogeneous_layers': True})."
        )
    matches = list(_LAYER.finditer(prefix))
    if not matches:
        raise ValueError(
            f"{prefix}{name}: got the layer-stacking offset {offsets[0]} but the prefix has no "
            "'layers.<index>.' part to put the global layer index into. Call sharded_state_dict "
            "on the model or its TransformerBlock."
        )
    cut = matches[-1].end()
    return f"{prefix[:cut]}{offsets[0][1]}.{prefix[cut:]}{name}"


def _replicated(t: torch.Tensor, key: str, tp_rank: int, dp_rank: int):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return ShardedTensor.from_rank_offsets(key, t, replica_id=(0, tp_rank, dp_rank))


def _tp_split(t: torch.Tensor, key: str, axis: int, stride: int, tp: tuple[int, int], dp_rank):
    """``t`` is this rank's part of a tensor split along ``axis`` the way megatron splits
    weights: ``stride`` chunks of ``local / stride`` rows dealt round-robin to the ``tp`` ranks
    (global chunk ``j * tp_size + tp_rank`` is this rank's piece ``j``)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    tp_rank, tp_size = tp
    replica_id = (0, 0, dp_rank)
    if stride == 1:
        return ShardedTensor.from_rank_offsets(
            key, t, (axis, tp_rank, tp_size), replica_id=replica_id
        )
    if t.shape[axis] % stride:
        raise ValueError(
            f"{key}: local size {t.shape[axis]} along axis {axis} is not a multiple of the "
            f"partition stride {stride}."
        )

    @torch.no_grad()
    def build(key, data, replica_id, flattened_range):
        pieces = torch.chunk(data, stride, dim=axis)
        return [
            ShardedTensor.from_rank_offsets(
                key, piece, (axis, j * tp_size + tp_rank, stride * tp_size), replica_id=replica_id
            )
            for j, piece in enumerate(pieces)
        ]

    def merge(pieces):
        with torch.no_grad():
            return torch.cat(pieces, dim=axis)

    return ShardedTensorFactory(key, t, build, merge, replica_id)


def adapter_sharded_state_dict(
    module: nn.Module,
    prefix: str = "",
    sharded_offsets: tuple = (),
    metadata: dict | None = None,
    tp_group=None,
) -> dict:
    """``sharded_state_dict`` of an adapter module (its parameters and its children's).

    A parameter with megatron's ``tensor_model_parallel`` attribute is declared split along its
    ``partition_dim`` (with ``partition_stride``) with its global shape; every other tensor is
    replicated over TP (``replica_id = (0, tp_rank, dp_rank)``). Keys are per layer with the
    global layer index (:func:`_per_layer_key`); the dict keys are the module's ordinary
    state-dict keys, so ``model.load_state_dict(dist_checkpointing.load(...))`` works.

    Args:
        module: the adapter (LoRA adapter, prefix adapter, gate).
        prefix: state-dict prefix of ``module``.
        sharded_offsets: offsets from the enclosing modules (the transformer block's layer
            stacking offset, if any).
        metadata: megatron's sharded-state-dict metadata (``dp_cp_group``).
        tp_group: the tensor-parallel group (default: megatron's global one).

    Returns:
        ``{state-dict key: ShardedTensor or ShardedTensorFactory}``.
    """
    tp_group, dp_group = _groups(tp_group, metadata)
    tp = _rank_size(tp_group)
    dp_rank = _rank_size(dp_group)[0]
    out = {}
    for name, t in module.state_dict(prefix="", keep_vars=True).items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{prefix}{name}: adapter state must be tensors, got {type(t).__name__}."
            )
        key = _per_layer_key(prefix, name, sharded_offsets)
        if getattr(t, "tensor_model_parallel", False) and tp[1] > 1:
            axis = int(t.partition_dim)
            out[f"{prefix}{name}"] = _tp_split(
                t, key, axis, int(getattr(t, "partition_stride", 1)), tp, dp_rank
            )
        else:
            out[f"{prefix}{name}"] = _replicated(t, key, tp[0], dp_rank)
    return out


def linear_sharded_state_dict(
    base: nn.Module, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
) -> dict:
    """``sharded_state_dict`` of a megatron parallel linear that carries a LoRA adapter.

    The linear's own method (its class's) declares its weight/bias; it would also declare the
    adapter's tensors as replicated ones of their local shape, so those entries are replaced by
    the adapter's own :meth:`sharded_state_dict`. The same holds for megatron-core's Transformer
    Engine linears; every other entry (TE's ``_extra_state`` too) is the class's own.
    """
    sd = type(base).sharded_state_dict(base, prefix, sharded_offsets, metadata)
    adapter = base._modules.get(_LORA_ATTR)
    if adapter is None:
        return sd
    sub = f"{prefix}{_LORA_ATTR}."
    sd = {k: v for k, v in sd.items() if not k.startswith(sub)}
    sd.update(adapter.sharded_state_dict(sub, sharded_offsets, metadata))
    return sd


def _bound_linear_sharded_state_dict(base, *args, **kwargs):
    return linear_sharded_state_dict(base, *args, **kwargs)


def install_linear_sharded_state_dict(base: nn.Module) -> None:
    """Give ``base`` (a wrapped megatron linear) :func:`linear_sharded_state_dict` as its
    ``sharded_state_dict`` (an instance attribute; idempotent; without an adapter it is the
    class's method)."""
    import functools

    current = base.__dict__.get("sharded_state_dict")
    if isinstance(current, functools.partial) and current.func is _bound_linear_sharded_state_dict:
        return
    base.__dict__["sharded_state_dict"] = functools.partial(_bound_linear_sharded_state_dict, base)


# ---------------------------------------------------------------------------------------------
# Adapter-only checkpoints


def _flatten(d: dict, out: dict | None = None, path: tuple = ()) -> dict:
    out = {} if out is None else out
    for k, v in d.items():
        if isinstance(v, dict):
            _flatten(v, out, path + (k,))
        else:
            out[path + (k,)] = v
    return out


def trained_sharded_state_dict(model: nn.Module, trained: Iterable[str] | None = None) -> dict:
    """The sharded state dict of only what a plan trains (adapters and fully trained layers).

    Built from ``model.sharded_state_dict(metadata={"non_homogeneous_layers": True})`` (per-layer
    keys for every layer tensor, so a fully trained layer among frozen ones is a valid
    checkpoint) and filtered to the trainable parameters.

    Args:
        model: the megatron model with the plan applied (a DDP / Float16 wrapper is unwrapped).
        trained: parameter names to keep (e.g. ``AppliedPlan.trainable_names()``); default:
            every parameter with ``requires_grad``.

    Returns:
        A (nested) sharded state dict for ``dist_checkpointing.save`` / ``load``.

    Raises:
        ValueError: a name in ``trained`` is not a parameter of ``model``, or nothing is trained.
    """
    model = unwrap_module(model, stop_at="decoder")
    named = dict(model.named_parameters())
    if trained is None:
        keep = {id(p) for p in named.values() if p.requires_grad}
    else:
        names = list(trained)
        unknown = sorted(n for n in names if n not in named)
        if unknown:
            raise ValueError(
                f"trained: {unknown[:3]} are not parameters of this model stage. Pass names from "
                "AppliedPlan.trainable_names() on the same model."
            )
        keep = {id(named[n]) for n in names}
    sd = model.sharded_state_dict(metadata={"non_homogeneous_layers": True})
    out: dict = {}
    for path, v in _flatten(sd).items():
        if id(getattr(v, "data", None)) not in keep:
            continue
        target = out
        for k in path[:-1]:
            target = target.setdefault(k, {})
        target[path[-1]] = v
    return out


def base_sharded_state_dict(model: nn.Module, metadata: dict | None = None) -> dict:
    """``model.sharded_state_dict(metadata=...)`` without the adapters' tensors: megatron's own
    keys, so a checkpoint of the model without a plan (a pretrained one) loads into a model that
    already carries one (:func:`load_sharded_into`)."""
    from layerfreeze.apply import adapter_param_names

    model = unwrap_module(model, stop_at="decoder")
    adapters = {id(p) for n, p in model.named_parameters() if n in set(adapter_param_names(model))}
    sd = model.sharded_state_dict(metadata=metadata)
    return {
        k: v
        for k, v in sd.items()
        if isinstance(v, dict) or id(getattr(v, "data", None)) not in adapters
    }


@torch.no_grad()
def load_sharded_into(model: nn.Module, sharded: dict, directory: str) -> list[str]:
    """``dist_checkpointing.load(sharded, directory)`` and copy every loaded tensor into the
    parameter / buffer it was declared from.

    Returns:
        The state-dict keys that were loaded.

    Raises:
        ValueError: the checkpoint lacks a tensor the model declares (another plan), or a
            loaded tensor's shape differs from its parameter's. Nothing is copied then.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    saved = set(dist_checkpointing.load_tensors_metadata(directory))  # tensors, not objects
    wanted = {
        v.key
        for v in _flatten(sharded).values()
        if isinstance(v, (ShardedTensor, ShardedTensorFactory))
    }
    missing = sorted(wanted - saved)
    if missing:
        raise ValueError(
            f"{directory}: the checkpoint has no {missing[0]}"
            + (f" (and {len(missing) - 1} more tensors)" if len(missing) > 1 else "")
            + f"; it holds {len(saved)} tensors such as {sorted(saved)[:2]}. Load it into a "
            "model with the plan (and layer count) it was saved from."
        )
    targets = {}
    for path, v in _flatten(sharded).items():
        data = getattr(v, "data", None)
        if isinstance(data, torch.Tensor):
            targets[path] = data
    loaded = _flatten(dist_checkpointing.load(sharded, directory))
    done = []
    for path, t in loaded.items():
        dest = targets.get(path)
        if dest is None or not isinstance(t, torch.Tensor):
            continue
        if tuple(t.shape) != tuple(dest.shape):
            raise ValueError(
                f"{directory}: {'.'.join(map(str, path))} has shape {tuple(t.shape)} in the "
                f"checkpoint but {tuple(dest.shape)} in the model."
            )
        if t.data_ptr() != dest.data_ptr():
            dest.copy_(t)
        done.append(".".join(map(str, path)))
    return done


def save_trained(model: nn.Module, directory: str, trained: Iterable[str] | None = None) -> None:
    """Save what the plan trains (:func:`trained_sharded_state_dict`) with
    ``dist_checkpointing.save`` to ``directory`` (an existing empty folder; every rank calls
    it)."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(trained_sharded_state_dict(model, trained), directory)


def load_trained(
    model: nn.Module, directory: str, trained: Iterable[str] | None = None
) -> list[str]:
    """Load a :func:`save_trained` checkpoint into ``model`` (same plan applied; any TP/PP
    layout). Returns the state-dict keys loaded."""
    return load_sharded_into(model, trained_sharded_state_dict(model, trained), directory)
