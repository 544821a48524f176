"""Saving what a plan trained, and exporting a merged Hugging Face checkpoint.

* ``save_trainable(applied, dir)`` writes ``adapter.safetensors`` (trainable parameters plus every
  installed adapter parameter) and ``plan.json``; ``load_trainable(model, dir)`` re-applies the
  plan on a fresh base model and loads them, reproducing the logits exactly.
* ``export_merged(applied, dir)`` folds mergeable LoRA into the base weights and writes a
  checkpoint with ``save_pretrained`` plus a sidecar (``layerfreeze_sidecar.safetensors`` +
  ``plan.json``) holding what cannot be merged (prefixes, gated LoRA, gates).

  - Nothing unmergeable (``full``, ``freeze``, ungated ``lora``): the checkpoint is plain and
    self-contained, with the original architecture; every Hugging Face consumer loads the
    trained model (the sidecar is empty).
  - Otherwise the checkpoint must not load without its adapters: config.json names
    ``model_type: layerfreeze`` (unknown to transformers) with an ``auto_map`` to the module
    :data:`MODELING_FILE` written into the export (transformers' custom-code mechanism). A plain
    ``AutoModelForCausalLM.from_pretrained(dir)`` refuses and asks for ``trust_remote_code=True``;
    with it, the module imports layerfreeze and returns :func:`load_export`'s model: the base
    architecture with the sidecar re-attached. ``layerfreeze`` commands call
    :func:`load_export` directly (``layerfreeze.modeling.load_causal_lm``).

Every directory is written atomically (a reader sees the old one or the new one, never half).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from layerfreeze.apply import AppliedPlan, adapter_param_names, apply_plan, base_state_dict
from layerfreeze.data.tokenizer import save_tokenizer
from layerfreeze.models import LayerInfo
from layerfreeze.plan import LayerPlan, LayerRange, LayerRule
from layerfreeze.policies.base import PolicySpec
from layerfreeze.policies.new_rows import merge_new_rows, unmerge_new_rows
from layerfreeze.registry import get_policy
from layerfreeze.utils.io import atomic_directory, atomic_write_json, grant_umask_mode
from layerfreeze.utils.logging import get_logger, log_rank0

__all__ = [
    "save_trainable",
    "load_trainable",
    "export_merged",
    "write_sidecar",
    "tensors_for_file",
    "write_safetensors_index",
    "fully_merged_policies",
    "sidecar_plan_json",
    "sidecar_info",
    "export_base_config",
    "load_export",
    "restack_sidecar_plan",
    "ADAPTER_FILE",
    "SIDECAR_FILE",
    "PLAN_FILE",
    "MODELING_FILE",
    "EXPORT_MODEL_TYPE",
]

logger = get_logger(__name__)

ADAPTER_FILE = "adapter.safetensors"
SIDECAR_FILE = "layerfreeze_sidecar.safetensors"
PLAN_FILE = "plan.json"
#: The module written into an export with a non-empty sidecar (transformers' ``auto_map``).
MODELING_FILE = "layerfreeze_modeling.py"
#: ``model_type`` of such an export's config.json: unknown to transformers, so nothing loads it
#: as the base architecture without the adapters.
EXPORT_MODEL_TYPE = "layerfreeze"
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


def tensors_for_file(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` ready for ``safetensors.torch.save_file``: every tensor detached and cloned to its
    own contiguous CPU copy (safetensors refuses shared storage). Every layerfreeze writer of
    weights (trainable state, sidecars, the megatron HF export) goes through it."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def write_safetensors_index(directory: Path, weight_map: Mapping[str, str], total_size: int) -> None:
    """Write Hugging Face's ``model.safetensors.index.json`` of a sharded checkpoint.

    Args:
        directory: the checkpoint (staging) directory holding the shards.
        weight_map: tensor name -> shard file name.
        total_size: bytes of all tensors together.
    """
    atomic_write_json(
        Path(directory) / "model.safetensors.index.json",
        {"metadata": {"total_size": int(total_size)}, "weight_map": dict(weight_map)},
    )


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
    sd = tensors_for_file(applied.trainable_state_dict())
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
    """Write a HF checkpoint with mergeable LoRA folded in, plus the sidecar (:func:`write_sidecar`).

    A plan whose every change folds into the weights gives a plain, self-contained checkpoint
    with the original architecture. Otherwise config.json is marked so that only
    :func:`load_export` (``trust_remote_code=True`` elsewhere) loads it, adapters re-attached.
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
                save_tokenizer(tokenizer, tmp)
            write_sidecar(tmp, sidecar, meta)
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
                # The group of non-layer parts holds the embeddings / head: fold new_rows there.
                merged = (applied.merge(layers=[layer.index]) if layer is not None
                          else merge_new_rows(model))
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
                    if layer is None:
                        unmerge_new_rows(model)
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
            write_safetensors_index(tmp, weight_map, total_size)
            config = copy.deepcopy(model.config)
            config.architectures = [type(model).__name__]
            config.save_pretrained(str(tmp))
            gen = getattr(model, "generation_config", None)
            if gen is not None and callable(getattr(model, "can_generate", None)) and model.can_generate():
                gen.save_pretrained(str(tmp))
            if tokenizer is not None:
                save_tokenizer(tokenizer, tmp)
            write_sidecar(tmp, sidecar, sidecar_plan_json(applied, merged_layers))
    log_rank0(
        logger, "exported merged checkpoint to %s, streamed in %d layer groups (%d modules merged, "
        "%d sidecar tensors)", directory, len(groups), n_merged, len(sidecar),
    )
    return directory


# --------------------------------------------------------------------------------------------
# the sidecar: writing it, marking config.json, loading the export with it
# --------------------------------------------------------------------------------------------

_MODELING_TEXT = '''"""Written by layerfreeze: loads this export with its trained adapters re-attached.

The plan this model was trained with has adapters that cannot be folded into the base weights
(gated LoRA, prefixes, their gates). They are in layerfreeze_sidecar.safetensors (plan.json
says where), so config.json names model_type "layerfreeze": transformers alone refuses it
instead of loading the base model without its training. With trust_remote_code=True,
``AutoModelForCausalLM.from_pretrained(dir)`` runs this module, which calls layerfreeze to load
the base architecture and re-attach the adapters. layerfreeze's own commands (eval, trace,
prune, compose) load it natively.
"""

try:
    from layerfreeze.export import remote_code_classes
except ImportError as e:  # pragma: no cover - only without layerfreeze
    raise ImportError(
        "This checkpoint is a layerfreeze export whose trained adapters (gated LoRA / prefixes, "
        "in layerfreeze_sidecar.safetensors) are not part of the base weights; loading it needs "
        "the layerfreeze package, which is not importable here (" + str(e) + "). Install "
        "layerfreeze in this environment, or the model would be the base model without them."
    ) from e

LayerfreezeConfig, LayerfreezeForCausalLM = remote_code_classes()
'''


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path}: not valid JSON ({e}).") from None


def write_sidecar(
    directory: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Write the sidecar into a checkpoint directory whose config.json is already there.

    ``layerfreeze_sidecar.safetensors`` (``tensors``) and ``plan.json`` (``meta``) are always
    written. With any tensor, config.json is marked (``model_type: layerfreeze``, the original
    ``model_type`` / ``architectures`` under ``layerfreeze``, an ``auto_map`` to
    :data:`MODELING_FILE`) and that module is written: no Hugging Face consumer loads the base
    model without the adapters. Without tensors the checkpoint stays plain and self-contained.

    Args:
        directory: the checkpoint directory (a staging directory: the caller makes it atomic).
        tensors: adapter parameters that are not merged, by model parameter name.
        meta: the ``plan.json`` content (``format``, ``kind: merged_sidecar``, ``plan``, ...).
    """
    directory = Path(directory)
    save_file(tensors_for_file(tensors), str(directory / SIDECAR_FILE), metadata={"format": _FORMAT})
    grant_umask_mode(directory / SIDECAR_FILE)  # safetensors writes 0600; Megatron writes in place
    atomic_write_json(directory / PLAN_FILE, dict(meta))
    if not tensors:
        return
    config_path = directory / "config.json"
    config = _read_json(config_path, "config.json")
    if config.get("model_type") != EXPORT_MODEL_TYPE:
        config["layerfreeze"] = {
            "format": "layerfreeze.export/1",
            "base_model_type": config.get("model_type"),
            "base_architectures": config.get("architectures"),
            "sidecar": SIDECAR_FILE,
            "plan": PLAN_FILE,
        }
        config["model_type"] = EXPORT_MODEL_TYPE
        config["architectures"] = ["LayerfreezeForCausalLM"]
        stem = MODELING_FILE[: -len(".py")]
        config["auto_map"] = {
            "AutoConfig": f"{stem}.LayerfreezeConfig",
            "AutoModelForCausalLM": f"{stem}.LayerfreezeForCausalLM",
        }
        atomic_write_json(config_path, config)
    (directory / MODELING_FILE).write_text(_MODELING_TEXT, encoding="utf-8")


def sidecar_info(path: str | os.PathLike, key: str = "--model") -> tuple[int, dict[str, Any] | None]:
    """``(number of sidecar tensors, plan.json content)`` of checkpoint directory ``path``.

    ``(0, None)`` for a checkpoint without a sidecar (or with an empty one: a self-contained
    export). Reads only the safetensors header.

    Raises:
        ValueError: config.json marks a layerfreeze export but the sidecar or plan.json is
            missing, unreadable or empty (named with ``key``).
    """
    from safetensors import safe_open

    path = Path(path)
    marked = False
    if (path / "config.json").is_file():
        config = _read_json(path / "config.json", f"{key}")
        marked = isinstance(config, dict) and config.get("model_type") == EXPORT_MODEL_TYPE
    plan_path, side_path = path / PLAN_FILE, path / SIDECAR_FILE
    meta = _read_json(plan_path, key) if plan_path.is_file() else None
    is_export = isinstance(meta, dict) and meta.get("kind") == "merged_sidecar"
    n = 0
    if is_export and side_path.is_file():
        try:
            with safe_open(str(side_path), framework="pt") as f:
                n = len(list(f.keys()))
        except (SafetensorError, OSError) as e:
            raise ValueError(
                f"{key} {path}: {SIDECAR_FILE} is not a readable safetensors file "
                f"({str(e).splitlines()[0]}); it is truncated or corrupt. Copy the whole export "
                "directory again."
            ) from None
    if is_export and n == 0:  # an older (unmarked) export whose plan still names adapters
        plans = [meta.get("plan"), *meta.get("install", [])]
        names = set().union(*(LayerPlan.parse(p).policy_names() for p in plans if p))
        # part-only policies (new_rows) are merged into the full matrices by every merged
        # export: an empty sidecar is all they leave
        marked = marked or any(
            get_policy(name).param_prefix and not getattr(get_policy(name), "part_only", None)
            for name in names
        )
    if marked and n == 0:
        raise ValueError(
            f"{key} {path}: config.json marks a layerfreeze export whose trained adapters are in "
            f"{SIDECAR_FILE} (+ {PLAN_FILE}), but they are missing or empty there. Copy the whole "
            "export directory; without them the model would be the base model."
        )
    return (n, meta) if n else (0, None)


def export_base_config(path: str | os.PathLike, key: str = "--model") -> Any:
    """The transformers config of checkpoint ``path``: for a marked export (see
    :func:`write_sidecar`), the original architecture's config; else ``AutoConfig``'s.

    Raises:
        OSError, ValueError: config.json is unreadable or names an unknown model type
            (transformers' own message).
    """
    from transformers import AutoConfig

    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None  # AutoConfig says what is wrong with it
    if not isinstance(config, dict) or config.get("model_type") != EXPORT_MODEL_TYPE:
        return AutoConfig.from_pretrained(str(path))
    return _base_config(config, f"{key} {path}")


def _base_config(config: dict[str, Any], where: str) -> Any:
    """The original architecture's transformers config from a marked config.json's content."""
    from transformers import CONFIG_MAPPING

    config = dict(config)
    info = config.pop("layerfreeze", None) or {}
    config.pop("auto_map", None)
    base = info.get("base_model_type")
    if base not in CONFIG_MAPPING:
        raise ValueError(
            f"{where}: config.json is a layerfreeze export of model type {base!r}, which this "
            "transformers version does not know."
        )
    config["model_type"] = base
    config["architectures"] = info.get("base_architectures")
    return CONFIG_MAPPING[base].from_dict(config)


def load_export(path: str | os.PathLike, key: str = "--model", **kwargs: Any) -> nn.Module:
    """Load a checkpoint directory as the model it was trained to be: the shared loader.

    ``from_pretrained`` of the base architecture (``kwargs``: ``dtype``, ``attn_implementation``,
    ..., ``config``: the base architecture's config to use instead of the saved one), then, for an export with a non-empty sidecar, :func:`load_trainable` re-attaches the
    adapters that could not be merged (gated LoRA, prefixes, gates). A plain checkpoint loads as
    ``AutoModelForCausalLM.from_pretrained`` would.

    Raises:
        ValueError: a marked export without its sidecar, or a sidecar that does not fit.
        OSError: transformers cannot load the weights.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    n, _meta = sidecar_info(path, key)
    config = kwargs.pop("config", None) or export_base_config(path, key)
    model = AutoModelForCausalLM.from_pretrained(str(path), config=config, **kwargs)
    if n:
        try:
            load_trainable(model, path)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"{key} {path}: the sidecar does not fit the model: {e}") from None
        log_rank0(logger, "%s: re-attached %d sidecar adapter tensors (%s)", path, n, SIDECAR_FILE)
    return model


def restack_sidecar_plan(
    origins: list[tuple[dict[str, Any] | None, int]], base_meta: dict[str, Any] | None, model_type: str
) -> dict[str, Any] | None:
    """``plan.json`` content of the sidecar of a new stack of layers (prune, compose).

    Output layer ``j`` takes every plan's (``plan`` and each ``install``) spec of layer
    ``origins[j][1]`` in the export whose ``plan.json`` content is ``origins[j][0]`` (None: no
    sidecar there, the layer is frozen). A removed layer's entries are gone, the others are
    renumbered. Embeddings, final norm and LM head specs come from ``base_meta``.

    Returns:
        The content, or None when no origin has a sidecar.
    """
    if not any(meta for meta, _ in origins):
        return None
    cache: dict[int, list[Any]] = {}

    def resolved(meta: dict[str, Any]) -> list[Any]:
        if id(meta) not in cache:
            plans = [meta["plan"], *meta.get("install", [])]
            cache[id(meta)] = [LayerPlan.parse(p).resolve(meta["num_layers"]) for p in plans]
        return cache[id(meta)]

    depth = max(len(resolved(m)) for m, _ in origins if m)
    base_plans = [LayerPlan.parse(p) for p in [base_meta["plan"], *base_meta.get("install", [])]] if base_meta else []
    freeze = LayerPlan().default
    plans = []
    for k in range(depth):
        rules = []
        for j, (meta, i) in enumerate(origins):
            rs = resolved(meta) if meta else []
            rules.append(LayerRule(LayerRange(j, j), rs[k].layers[i] if k < len(rs) else freeze))
        template = base_plans[k] if k < len(base_plans) else LayerPlan()
        plans.append(dataclasses.replace(template, rules=tuple(rules), default=freeze))
    return {
        "format": _FORMAT,
        "kind": "merged_sidecar",
        "model_type": model_type,
        "num_layers": len(origins),
        "plan": plans[0].to_dict(),
        "install": [p.to_dict() for p in plans[1:]],
    }


_REMOTE: tuple[type, type] | None = None


def remote_code_classes() -> tuple[type, type]:
    """``(LayerfreezeConfig, LayerfreezeForCausalLM)``: what :data:`MODELING_FILE` exports.

    ``LayerfreezeConfig`` holds a marked config.json as it is. ``LayerfreezeForCausalLM`` is
    built only through ``from_pretrained``, which returns :func:`load_export`'s model (the base
    architecture with the sidecar re-attached); constructing it directly (``from_config``, a
    serving engine building an empty model to fill with the weights) raises, since that would
    be the base model without the adapters.
    """
    global _REMOTE
    if _REMOTE is not None:
        return _REMOTE
    from transformers import PreTrainedConfig, PreTrainedModel

    class LayerfreezeConfig(PreTrainedConfig):
        """A layerfreeze export's config.json (the base architecture's fields plus ``layerfreeze``)."""

        model_type = EXPORT_MODEL_TYPE

    class LayerfreezeForCausalLM(PreTrainedModel):
        """Loads a layerfreeze export with its adapters re-attached (``from_pretrained`` only)."""

        config_class = LayerfreezeConfig

        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            raise TypeError(
                "LayerfreezeForCausalLM: a layerfreeze export is built only by from_pretrained(dir), "
                f"which re-attaches the adapters in {SIDECAR_FILE}; a model built from the config "
                "alone would be the base model without them."
            )

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any):
            if model_args:
                raise TypeError("LayerfreezeForCausalLM.from_pretrained: takes no positional model args.")
            config = kwargs.pop("config", None)
            for k in ("trust_remote_code", "adapter_kwargs", "code_revision", "_from_auto"):
                kwargs.pop(k, None)
            if isinstance(config, LayerfreezeConfig):
                # transformers built it from config.json plus the caller's overrides
                # (attn_implementation, use_cache, ...): the same, as the base architecture's.
                base = _base_config(config.to_dict(), str(pretrained_model_name_or_path))
                base._attn_implementation = config._attn_implementation
                kwargs["config"] = base
            path = Path(pretrained_model_name_or_path)
            if not path.is_dir():  # a hub repository: fetch the whole export, sidecar included
                from huggingface_hub import snapshot_download

                hub = {k: kwargs.pop(k) for k in ("revision", "token", "cache_dir") if k in kwargs}
                path = Path(snapshot_download(str(pretrained_model_name_or_path), **hub))
            for k in ("revision", "token", "cache_dir", "force_download", "local_files_only", "proxies"):
                kwargs.pop(k, None)
            if kwargs.get("subfolder"):
                path = path / kwargs.pop("subfolder")
            kwargs.pop("subfolder", None)
            return load_export(path, str(pretrained_model_name_or_path), **kwargs)

    _REMOTE = (LayerfreezeConfig, LayerfreezeForCausalLM)
    return _REMOTE
