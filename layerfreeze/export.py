"""Saving what a plan trained, and exporting a merged Hugging Face checkpoint.

* ``save_trainable(applied, dir)`` writes ``adapter.safetensors`` (trainable parameters plus every
  installed adapter parameter) and ``plan.json``; ``load_trainable(model, dir)`` re-applies the
  plan on a fresh base model and loads them, reproducing the logits exactly.
* ``export_merged(applied, dir)`` folds mergeable LoRA into the base weights and writes a
  standard checkpoint with ``save_pretrained`` (loads with ``AutoModelForCausalLM.from_pretrained``)
  plus a sidecar (``layerfreeze_sidecar.safetensors`` + ``plan.json``) holding what cannot be
  merged (prefixes, gated LoRA, gates); ``load_trainable(model, dir)`` on the loaded checkpoint
  restores them.

Every directory is written atomically (a reader sees the old one or the new one, never half).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Collection, Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from layerfreeze.apply import AppliedPlan, adapter_param_names, apply_plan, base_state_dict
from layerfreeze.models import LayerInfo
from layerfreeze.plan import LayerPlan, LayerRange, LayerRule
from layerfreeze.policies.base import PolicySpec
from layerfreeze.registry import get_policy
from layerfreeze.utils.io import atomic_directory, atomic_write_json
from layerfreeze.utils.logging import get_logger, log_rank0

__all__ = [
    "save_trainable",
    "load_trainable",
    "export_merged",
    "ADAPTER_FILE",
    "SIDECAR_FILE",
    "PLAN_FILE",
]

logger = get_logger(__name__)

ADAPTER_FILE = "adapter.safetensors"
SIDECAR_FILE = "layerfreeze_sidecar.safetensors"
PLAN_FILE = "plan.json"
_FORMAT = "layerfreeze.trainable/1"


def _plan_json(applied: AppliedPlan, plan: LayerPlan, install: list[LayerPlan], kind: str) -> dict[str, Any]:
    return {
        "format": _FORMAT,
        "kind": kind,
        "model_type": applied.layout.model_type,
        "num_layers": applied.layout.num_layers,
        "plan": plan.to_dict(),
        "install": [p.to_dict() for p in install],
    }


def _tensors_for_file(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; every tensor is cloned to its own contiguous CPU copy.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def save_trainable(applied: AppliedPlan, directory: str | os.PathLike) -> Path:
    """Write the trainable-only state and the plan to ``directory`` (atomically).

    Args:
        applied: the applied plan.
        directory: output directory (replaced if it exists).

    Returns:
        The directory path.
    """
    directory = Path(directory)
    # Every installed plan (the schedule's phases), so reloading recreates every adapter.
    install = [p for p, _ in applied.installed if p != applied.plan]
    sd = _tensors_for_file(applied.trainable_state_dict())
    with atomic_directory(directory) as tmp:
        save_file(sd, str(tmp / ADAPTER_FILE), metadata={"format": _FORMAT})
        atomic_write_json(tmp / PLAN_FILE, _plan_json(applied, applied.plan, install, "trainable"))
    log_rank0(logger, "saved %d trainable tensors to %s", len(sd), directory)
    return directory


def load_trainable(model: nn.Module, directory: str | os.PathLike) -> AppliedPlan:
    """Re-apply the saved plan to ``model`` and load the saved tensors into it.

    Works on a directory written by :func:`save_trainable` (``adapter.safetensors``) and on one
    written by :func:`export_merged` (``layerfreeze_sidecar.safetensors``, loaded onto the
    merged checkpoint).

    Raises:
        FileNotFoundError: no ``plan.json`` or tensor file in ``directory``.
        ValueError: the files do not match the model (layer count, names, shapes).
    """
    directory = Path(directory)
    plan_path = directory / PLAN_FILE
    if not plan_path.is_file():
        raise FileNotFoundError(
            f"{plan_path}: not found. Point load_trainable at a directory written by "
            "save_trainable or export_merged."
        )
    try:
        meta = json.loads(plan_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{plan_path}: not valid JSON ({e}). Re-save it with save_trainable."
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{plan_path}: unknown format {got!r}, expected {_FORMAT!r}.")
    tensor_path = next((directory / f for f in (ADAPTER_FILE, SIDECAR_FILE) if (directory / f).is_file()), None)
    if tensor_path is None:
        raise FileNotFoundError(f"{directory}: neither {ADAPTER_FILE} nor {SIDECAR_FILE} found.")
    applied = apply_plan(model, meta["plan"], install=meta.get("install", []))
    if applied.layout.num_layers != meta["num_layers"]:
        raise ValueError(
            f"{plan_path}: saved for a {meta['num_layers']}-layer model, got "
            f"{applied.layout.num_layers} layers. Load onto the same base architecture."
        )
    try:
        state = load_file(str(tensor_path))
    except SafetensorError as e:
        raise ValueError(
            f"{tensor_path}: not a readable safetensors file ({e}); it is truncated or corrupt. "
            "Re-save it with save_trainable."
        ) from None
    try:
        applied.load_trainable_state_dict(state)
    except ValueError as e:
        raise ValueError(f"{tensor_path}: {e}") from None
    return applied


def _sidecar_plan(plan: LayerPlan, resolved, merged_layers: dict[int, set[str]]) -> LayerPlan:
    """``plan`` with every fully merged adapter spec replaced by ``freeze`` (one rule per layer)."""
    freeze = LayerPlan().default
    rules = []
    for i, spec in enumerate(resolved.layers):
        if spec.name in merged_layers.get(i, set()):
            spec = freeze
        rules.append(LayerRule(LayerRange(i, i), spec))
    return dataclasses.replace(plan, rules=tuple(rules), default=freeze)


def fully_merged_policies(
    applied: AppliedPlan,
    layers: Iterable[LayerInfo],
    adapter_names: Iterable[str],
    merged_params: Collection[str],
) -> dict[int, set[str]]:
    """Which (layer, policy) pairs are fully merged: every adapter parameter of that policy in
    the layer sits in the base weights now (the rule of every merged export: HF, streamed,
    megatron).

    Args:
        applied: the applied plan whose installed plans name each layer's policies.
        layers: the layers to look at (``applied.layout.layers`` or one streamed layer).
        adapter_names: qualified adapter parameter names of the model.
        merged_params: those whose update is merged (``AppliedPlan.merged_adapter_param_names``).

    Returns:
        ``{layer index: {policy name, ...}}`` for the layers with a fully merged policy.
    """
    names = list(adapter_names)
    out: dict[int, set[str]] = {}
    for layer in layers:
        head = layer.name + "."
        for _plan, resolved in applied.installed:
            spec: PolicySpec = resolved.layers[layer.index]
            prefix = get_policy(spec.name).param_prefix
            if not prefix:
                continue
            mine = [
                n for n in names if n.startswith(head)
                and any(part.startswith(prefix) for part in n[len(head):].split("."))
            ]
            if mine and all(n in merged_params for n in mine):
                out.setdefault(layer.index, set()).add(spec.name)
    return out


def sidecar_plan_json(applied: AppliedPlan, merged_layers: dict[int, set[str]]) -> dict[str, Any]:
    """The ``plan.json`` of a merged export's sidecar: ``applied``'s plan and installed plans
    with every fully merged spec (:func:`fully_merged_policies`) replaced by ``freeze``."""
    plan = _sidecar_plan(applied.plan, applied.resolved, merged_layers)
    install = [_sidecar_plan(p, r, merged_layers) for p, r in applied.installed if p != applied.plan]
    return _plan_json(applied, plan, install, "merged_sidecar")


def export_merged(
    applied: AppliedPlan,
    directory: str | os.PathLike,
    tokenizer: Any = None,
    *,
    gather: Callable[[list[str]], AbstractContextManager] | None = None,
    is_writer: bool = True,
) -> Path:
    """Write a standard HF checkpoint with mergeable LoRA folded in, plus the sidecar.

    The applied model is left as it was (its base weights are restored bit-exactly).

    With ``gather`` (partitioned parameters, e.g. ZeRO-3) the export *streams*: one layer group
    at a time (each decoder layer, then the embeddings, final norm and head together) is
    gathered, merged, copied to CPU, written as its own safetensors shard and released, so no
    rank ever holds more than one layer group whole; the shards are listed in
    ``model.safetensors.index.json`` (Hugging Face's sharded layout). Every rank must call it
    then (the gathers are collective); only ``is_writer`` writes.

    Args:
        applied: the applied plan (its model must have ``save_pretrained``).
        directory: output directory (replaced if it exists).
        tokenizer: optional tokenizer saved alongside (``save_pretrained``).
        gather: ``gather(param_names)`` -> context in which those parameters are whole (e.g.
            ``DeepSpeedRunner.gathered_parameters``); None exports the whole model at once.
        is_writer: whether this process writes the files (rank 0).

    Returns:
        The directory path.
    """
    directory = Path(directory)
    model = applied.model
    if not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(f"export_merged: {type(model).__name__} has no save_pretrained; use save_trainable.")
    if gather is not None:
        return _export_streaming(applied, directory, tokenizer, gather, is_writer)
    base = base_state_dict(model)
    # Merging touches only base weights of layers carrying adapters: snapshot those to restore.
    adapter_layers = tuple(
        f"{layer.name}." for layer in applied.layout.layers
        if any(get_policy(r.layers[layer.index].name).param_prefix for _p, r in applied.installed)
    )
    snapshot = {k: v.clone() for k, v in base.items() if adapter_layers and k.startswith(adapter_layers)}
    merged_modules = applied.merge()
    try:
        merged_params = set(applied.merged_adapter_param_names())
        sidecar = {
            n: p for n, p in applied.trainable_state_dict().items()
            if n in set(adapter_param_names(model)) and n not in merged_params
        }
        merged_layers = fully_merged_policies(
            applied, applied.layout.layers, adapter_param_names(model), merged_params
        )
        meta = sidecar_plan_json(applied, merged_layers)
        state = {k: v.detach() for k, v in base_state_dict(model).items()}
        with atomic_directory(directory) as tmp:
            model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            save_file(_tensors_for_file(sidecar), str(tmp / SIDECAR_FILE), metadata={"format": _FORMAT})
            atomic_write_json(tmp / PLAN_FILE, meta)
    finally:
        applied.unmerge()
        with torch.no_grad():
            for k, v in snapshot.items():
                base[k].copy_(v)
    log_rank0(
        logger, "exported merged checkpoint to %s (%d modules merged, %d sidecar tensors)",
        directory, len(merged_modules), len(sidecar),
    )
    return directory


def _layer_group_names(applied: AppliedPlan, names: list[str]) -> list[tuple[Any, list[str]]]:
    """``(layer or None, names)`` per decoder layer, then one group for everything else
    (embeddings, final norm, head), in the model's order."""
    layers = list(applied.layout.layers)
    groups: list[tuple[Any, list[str]]] = [(layer, []) for layer in layers]
    rest: list[str] = []
    for n in names:
        for i, layer in enumerate(layers):
            if n.startswith(layer.name + "."):
                groups[i][1].append(n)
                break
        else:
            rest.append(n)
    return groups + [(None, rest)]


def _export_streaming(
    applied: AppliedPlan,
    directory: Path,
    tokenizer: Any,
    gather: Callable[[list[str]], AbstractContextManager],
    is_writer: bool,
) -> Path:
    """:func:`export_merged` one layer group at a time (see there)."""
    import copy

    model = applied.model
    params = [n for n, _ in model.named_parameters()]
    base_keys = list(base_state_dict(model))
    groups = _layer_group_names(applied, params)
    key_groups = {id(layer): names for layer, names in _layer_group_names(applied, base_keys)}
    all_adapters = set(adapter_param_names(model))
    merged_layers: dict[int, set[str]] = {}
    sidecar: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    total_size, n_merged = 0, 0
    with atomic_directory(directory) if is_writer else nullcontext(None) as tmp:
        for gi, (layer, names) in enumerate(groups):
            keys = key_groups[id(layer)]
            shard: dict[str, torch.Tensor] = {}
            with gather(names):
                base = base_state_dict(model)  # inside the gather: the whole tensors
                snapshot = {k: base[k].clone() for k in keys} if layer is not None else {}
                merged = applied.merge(layers=[layer.index]) if layer is not None else []
                try:
                    merged_params = set(applied.merged_adapter_param_names())
                    if is_writer:
                        shard = {k: base[k].detach().to("cpu").contiguous().clone() for k in keys}
                        sidecar.update(
                            (n, p.detach().to("cpu").contiguous().clone())
                            for n, p in model.named_parameters()
                            if n in set(names) and n in all_adapters and n not in merged_params
                        )
                    if layer is not None:
                        n_merged += len(merged)
                        merged_layers.update(
                            fully_merged_policies(applied, [layer], all_adapters, merged_params)
                        )
                finally:
                    if layer is not None:
                        applied.unmerge(layers=[layer.index])
                        with torch.no_grad():
                            for k, v in snapshot.items():
                                base[k].copy_(v)
                    del snapshot
            if is_writer and shard:
                fname = f"model-{gi + 1:05d}-of-{len(groups):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                for k, v in shard.items():
                    weight_map[k] = fname
                    total_size += v.numel() * v.element_size()
            del shard
        if is_writer:
            atomic_write_json(
                tmp / "model.safetensors.index.json",
                {"metadata": {"total_size": total_size}, "weight_map": weight_map},
            )
            config = copy.deepcopy(model.config)
            config.architectures = [type(model).__name__]
            config.save_pretrained(str(tmp))
            gen = getattr(model, "generation_config", None)
            if gen is not None and callable(getattr(model, "can_generate", None)) and model.can_generate():
                gen.save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            save_file(sidecar, str(tmp / SIDECAR_FILE), metadata={"format": _FORMAT})
            atomic_write_json(tmp / PLAN_FILE, sidecar_plan_json(applied, merged_layers))
    log_rank0(
        logger, "exported merged checkpoint to %s, streamed in %d layer groups (%d modules merged, "
        "%d sidecar tensors)", directory, len(groups), n_merged, len(sidecar),
    )
    return directory
