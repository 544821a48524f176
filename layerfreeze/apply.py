"""Applying a layer plan to a model: install adapters, set ``requires_grad``, account for it.

This is the ONLY module that sets ``requires_grad``. ``apply_plan(model, plan, install=...)``
installs the adapters of ``plan`` and of every plan in ``install`` (a schedule installs all its
phases' adapters up front, before any engine partitions parameters), then makes exactly the
parameters ``plan`` trains trainable. The returned :class:`AppliedPlan` gives the per-layer
summary, optimizer parameter groups, the trainable state dict, merge / unmerge and
``switch_plan`` for the next schedule phase.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from layerfreeze.engines.partition import full_shape
from layerfreeze.errors import ConfigError
from layerfreeze.models import LayerInfo, ModelLayout, discover_layout, is_norm_module, param_numel
from layerfreeze.plan import NON_LAYER_PARTS, LayerPlan, ResolvedPlan
from layerfreeze.policies.base import PolicySpec
from layerfreeze.policies.new_rows import PARAM as NEW_ROWS_PARAM
from layerfreeze.policies.new_rows import check_plans as check_new_rows
from layerfreeze.policies.new_rows import install_for_plan as install_new_rows_for_plan
from layerfreeze.policies.new_rows import merge_new_rows, unmerge_new_rows
from layerfreeze.policies.new_rows import merged_param_names as merged_new_rows_param_names
from layerfreeze.registry import POLICIES, get_policy, load_builtin_policies
from layerfreeze.utils.logging import get_logger, log_rank0
from layerfreeze.utils.schema import to_dict

__all__ = [
    "AppliedPlan",
    "PlanSummary",
    "apply_plan",
    "check_plan",
    "refresh_base_tensors",
    "enable_gradient_checkpointing",
    "adapter_param_names",
    "ADAM_STATE_BYTES_PER_PARAM",
]

logger = get_logger(__name__)
load_builtin_policies()  # adapter prefixes must be known before any name is classified

#: AdamW keeps two fp32 moments (exp_avg, exp_avg_sq) per trainable parameter.
ADAM_STATE_BYTES_PER_PARAM = 8
_BASE_ATTR = "_layerfreeze_base_tensors"


def _spec_key(spec: PolicySpec) -> tuple[str, str]:
    opts = to_dict(spec.options) if spec.options is not None else {}
    return spec.name, json.dumps(opts, sort_keys=True, default=str)


def _adapter_prefixes() -> list[str]:
    return [p.param_prefix for p in POLICIES.values() if p.param_prefix]


def _is_adapter_name(name: str, prefixes: list[str]) -> bool:
    return any(part.startswith(pre) for part in name.split(".") for pre in prefixes)


def adapter_param_names(model: nn.Module) -> list[str]:
    """Names of every adapter parameter (a name component starts with a policy's prefix)."""
    prefixes = _adapter_prefixes()
    return [n for n, _ in model.named_parameters() if _is_adapter_name(n, prefixes)]


def _record_base_tensors(model: nn.Module) -> None:
    """Remember the base checkpoint's tensors (by state-dict name) before any adapter exists.

    Adapters keep the base modules (and their Parameter objects) in place, so after merging the
    base checkpoint can be written back under its original names.
    """
    if getattr(model, _BASE_ATTR, None) is None:
        tensors = dict(model.state_dict(keep_vars=True))
        prefixes = _adapter_prefixes()
        model.__dict__[_BASE_ATTR] = {k: v for k, v in tensors.items() if not _is_adapter_name(k, prefixes)}


def refresh_base_tensors(model: nn.Module) -> None:
    """Re-record the base tensors after base modules were replaced in place (e.g. 4-bit layers
    de-quantized back to ``nn.Linear`` by :func:`layerfreeze.quant.dequantize_model`): the record
    holds the old modules' tensors by reference. No-op when nothing was recorded yet."""
    if _BASE_ATTR in model.__dict__:
        del model.__dict__[_BASE_ATTR]
        _record_base_tensors(model)


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base checkpoint's tensors under their original names (adapters excluded)."""
    _record_base_tensors(model)
    return {k: v.detach() for k, v in model.__dict__[_BASE_ATTR].items()}


def _layer_specs(layout: ModelLayout, resolved: ResolvedPlan) -> list[tuple[LayerInfo, PolicySpec]]:
    """``(layer, its policy)`` for the layers this module holds, by *global* index."""
    return [(layer, resolved.layers[layer.index]) for layer in layout.layers]


def check_plan(resolved: ResolvedPlan, layout: ModelLayout, path: str = "plan") -> list[str]:
    """Every problem stopping ``resolved`` from applying to the model (``policy.check``)."""
    problems = []
    if resolved.num_layers != layout.num_layers:
        problems.append(
            f"{path}: resolved for {resolved.num_layers} layers but the model has {layout.num_layers}."
        )
        return problems
    for layer, spec in _layer_specs(layout, resolved):
        for p in get_policy(spec.name).check(layer, spec, layout):
            # Policies usually name the layer themselves; add it only when they do not.
            where = "" if p.startswith(f"layer {layer.index} ") else f"layer {layer.index}: "
            problems.append(f"{path}: {where}{spec.describe()}: {p}")
    # A pipeline stage holds a slice of the layers; its missing parts live on other stages.
    is_stage = layout.num_local_layers < layout.num_layers
    for part in NON_LAYER_PARTS:
        spec = resolved.non_layer(part)
        missing = getattr(layout, part) is None and not is_stage
        if spec.name != "freeze" and part != "embeddings" and missing:
            problems.append(
                f"{path}.{part}: the model has no {part.replace('_', ' ')}, got policy {spec.name!r}. "
                "Set it to freeze."
            )
    return problems


# --------------------------------------------------------------------------- summary


@dataclass
class PlanSummary:
    """Per-layer accounting of an applied plan.

    Attributes:
        rows: one dict per layer, then ``embeddings``, ``final_norm``, ``lm_head`` (and ``other``
            when the model has parameters outside all of them), each with ``name``, ``index``
            (None for non-layer rows), ``policy``, ``trainable_params``, ``total_params``,
            ``optimizer_state_bytes`` (AdamW: 8 bytes per trainable parameter).
    """

    rows: list[dict[str, Any]]

    @property
    def trainable_params(self) -> int:
        """Sum of trainable parameters."""
        return sum(r["trainable_params"] for r in self.rows)

    @property
    def total_params(self) -> int:
        """Sum of all parameters (adapters included, tied weights once)."""
        return sum(r["total_params"] for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: totals plus ``layers`` (layer rows) and one entry per non-layer part."""
        layers = [r for r in self.rows if r["index"] is not None]
        out: dict[str, Any] = {
            "num_layers": len(layers),
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "optimizer_state_bytes": sum(r["optimizer_state_bytes"] for r in self.rows),
            "layers": layers,
        }
        for r in self.rows:
            if r["index"] is None:
                out[r["name"]] = r
        return out

    def table(self) -> str:
        """Fixed-width table, one line per row plus a total line."""
        header = ("layer", "policy", "trainable", "total", "%", "AdamW state")
        lines = []
        for r in self.rows:
            pct = 100.0 * r["trainable_params"] / r["total_params"] if r["total_params"] else 0.0
            lines.append((
                str(r["index"]) if r["index"] is not None else r["name"], r["policy"],
                f"{r['trainable_params']:,}", f"{r['total_params']:,}", f"{pct:.1f}",
                _fmt_bytes(r["optimizer_state_bytes"]),
            ))
        t, n = self.trainable_params, self.total_params
        lines.append((
            "total", "", f"{t:,}", f"{n:,}", f"{100.0 * t / n if n else 0.0:.1f}",
            _fmt_bytes(sum(r["optimizer_state_bytes"] for r in self.rows)),
        ))
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        fmt = lambda cells: "  ".join(  # noqa: E731
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        sep = "  ".join("-" * w for w in widths)
        return "\n".join([fmt(header), sep, *(fmt(line) for line in lines[:-1]), sep, fmt(lines[-1])])


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# --------------------------------------------------------------------------- applied plan


@dataclass
class AppliedPlan:
    """A plan applied to a model (see :func:`apply_plan`).

    Attributes:
        model: the model (modified in place).
        layout: its discovered layout.
        plan: the plan that currently decides ``requires_grad``.
        resolved: ``plan`` resolved against the model.
        installed: every resolved plan whose adapters are installed (``plan`` and ``install``).
    """

    model: nn.Module
    layout: ModelLayout
    plan: LayerPlan
    resolved: ResolvedPlan
    installed: list[tuple[LayerPlan, ResolvedPlan]] = field(default_factory=list)
    _names: dict[tuple[int, tuple[str, str]], frozenset[str]] = field(default_factory=dict, repr=False)
    _trainable: list[str] = field(default_factory=list, repr=False)

    # ------------------------------------------------------------------ parts
    def _partition(self) -> dict[str, list[str]]:
        """Every parameter name (tied once) -> its part: ``layers.<i>``, a non-layer part or ``other``."""
        layout = self.layout
        parts: dict[str, list[str]] = {f"layers.{x.index}": [] for x in layout.layers}
        for p in (*NON_LAYER_PARTS, "other"):
            parts[p] = []
        emb_ids = set()
        for name in layout.embeddings:
            emb_ids.update(id(p) for p in self.model.get_submodule(name).parameters())
        prefixes = [(f"{x.name}.", f"layers.{x.index}") for x in layout.layers]
        if layout.final_norm:
            prefixes.append((f"{layout.final_norm}.", "final_norm"))
        if layout.lm_head:
            prefixes.append((f"{layout.lm_head}.", "lm_head"))
        prefixes += [(f"{e}.", "embeddings") for e in layout.embeddings]
        for name, p in self.model.named_parameters():
            if id(p) in emb_ids:
                parts["embeddings"].append(name)
                continue
            for pre, part in prefixes:
                if name.startswith(pre):
                    parts[part].append(name)
                    break
            else:
                parts["other"].append(name)
        return parts

    def _layer_names(self, layer: LayerInfo, spec: PolicySpec) -> frozenset[str]:
        key = (layer.index, _spec_key(spec))
        if key not in self._names:
            raise ConfigError(
                f"plan: layer {layer.index} ({layer.name}) uses {spec.describe()}, whose adapters "
                "were not installed. Pass every plan of the schedule to apply_plan(..., install=[...]) "
                "before the engine partitions the parameters."
            )
        return self._names[key]

    def _trainable_set(self, resolved: ResolvedPlan) -> set[str]:
        trainable: set[str] = set()
        for layer, spec in _layer_specs(self.layout, resolved):
            trainable.update(f"{layer.name}.{n}" for n in self._layer_names(layer, spec))
        parts = self._partition()
        for part in NON_LAYER_PARTS:
            name = resolved.non_layer(part).name
            if name == "full":
                trainable.update(n for n in parts[part] if not n.endswith(f".{NEW_ROWS_PARAM}"))
            elif name == "new_rows":  # only the separate new-rows parameter trains
                trainable.update(n for n in parts[part] if n.endswith(f".{NEW_ROWS_PARAM}"))
        return trainable

    def _resolve_installed(self, plan: LayerPlan | str | Mapping) -> tuple[LayerPlan, ResolvedPlan]:
        new = LayerPlan.parse(plan)
        resolved = new.resolve(self.layout.num_layers)
        for layer, spec in _layer_specs(self.layout, resolved):
            key = (layer.index, _spec_key(spec))
            if key not in self._names and not get_policy(spec.name).param_prefix:
                # freeze / full install nothing: their names can be computed now.
                self._names[key] = frozenset(get_policy(spec.name).apply(layer, spec, self.layout))
            self._layer_names(layer, spec)
        return new, resolved

    def trainable_names_for(self, plan: LayerPlan | str | Mapping) -> list[str]:
        """Names ``plan`` would train (its adapters must be installed), without changing
        ``requires_grad``; in ``named_parameters()`` order."""
        _new, resolved = self._resolve_installed(plan)
        trainable = self._trainable_set(resolved)
        return [n for n, _ in self.model.named_parameters() if n in trainable]

    def _set_requires_grad(self) -> None:
        trainable = self._trainable_set(self.resolved)
        names = []
        for name, p in self.model.named_parameters():
            want = name in trainable
            if p.requires_grad != want:
                p.requires_grad_(want)
            if want:
                names.append(name)
        missing = trainable - set(names)
        assert not missing, f"policies returned names that are not parameters: {sorted(missing)[:5]}"
        self._trainable = names

    def switch_plan(self, plan: LayerPlan | str | Mapping) -> AppliedPlan:
        """Make ``plan`` the trainable plan (its adapters must already be installed).

        Returns:
            ``self``, updated.

        Raises:
            ConfigError: ``plan`` does not resolve, or needs adapters that were not installed
                (the message names the layer).
        """
        new, resolved = self._resolve_installed(plan)
        self.plan, self.resolved = new, resolved
        self._set_requires_grad()
        log_rank0(logger, "plan switched: %s", str(new), level=logging.DEBUG)
        return self

    # ------------------------------------------------------------------ queries
    def trainable_names(self) -> list[str]:
        """Names of the trainable parameters, in ``model.named_parameters()`` order."""
        return list(self._trainable)

    def trains_adapters_only(self) -> bool:
        """True when the plan trains no layer and no non-layer part whole (``full``): every
        trainable tensor is an adapter's (LoRA, prefix, gate)."""
        layers = [spec.name for _, spec in _layer_specs(self.layout, self.resolved)]
        parts = [self.resolved.non_layer(part).name for part in NON_LAYER_PARTS]
        return "full" not in layers + parts

    def num_trainable_params(self) -> int:
        """Number of trainable parameter elements (full sizes under ZeRO-3)."""
        params = dict(self.model.named_parameters())
        return sum(param_numel(params[n]) for n in self._trainable)

    def num_total_params(self) -> int:
        """Number of parameter elements, adapters included and tied weights once."""
        return sum(param_numel(p) for p in self.model.parameters())

    def summary(self, master_weights: bool = False) -> PlanSummary:
        """Per-layer policy, trainable / total parameters and AdamW optimizer-state bytes.

        Args:
            master_weights: also count a 4-byte fp32 master copy per trainable parameter (what
                mixed-precision engines such as DeepSpeed keep besides the two moments).
        """
        per_param = ADAM_STATE_BYTES_PER_PARAM + (4 if master_weights else 0)
        params = dict(self.model.named_parameters())
        trainable = set(self._trainable)
        rows = []
        parts = self._partition()
        for part, names in parts.items():
            if part.startswith("layers."):
                i = int(part.split(".")[1])
                name, index, policy = part, i, self.resolved.layers[i].describe()
            else:
                if part == "other" and not names:
                    continue
                name, index = part, None
                policy = self.resolved.non_layer(part).describe() if part != "other" else "freeze"
                if part == "lm_head" and self.layout.tied_embeddings:
                    policy = f"tied to embeddings ({self.resolved.embeddings.name})"
            t = sum(param_numel(params[n]) for n in names if n in trainable)
            rows.append({
                "name": name, "index": index, "policy": policy, "trainable_params": t,
                "total_params": sum(param_numel(params[n]) for n in names),
                "optimizer_state_bytes": t * per_param,
            })
        rows.sort(key=lambda r: (r["index"] is None, r["index"] if r["index"] is not None else 0))
        return PlanSummary(rows)

    def layer_groups(self) -> dict[str, list[str]]:
        """``layers.<i>`` / ``embeddings`` / ``final_norm`` / ``lm_head`` -> trainable names."""
        trainable = set(self._trainable)
        return {part: [n for n in names if n in trainable] for part, names in self._partition().items()
                if part != "other" or names}

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups for the trainable parameters.

        Each group has ``params``, ``lr`` (= ``lr * lr_scale``), ``weight_decay``, ``name`` and
        ``lr_scale``. The lr scale and decay come from each policy's ``optim_options``
        (non-layer parts from their ``full`` options); norms, biases, 1-D tensors and gates get
        no weight decay. Groups appear in order of their first parameter in
        ``model.named_parameters()``; parameters keep that order inside a group.
        """
        params = dict(self.model.named_parameters())
        owner: dict[str, tuple[str, PolicySpec, str]] = {}
        parts = self._partition()
        for layer, spec in _layer_specs(self.layout, self.resolved):
            for n in parts[f"layers.{layer.index}"]:
                owner[n] = ("layers", spec, n[len(layer.name) + 1:])
        for part in NON_LAYER_PARTS:
            for n in parts[part]:
                owner[n] = (part, self.resolved.non_layer(part), n)
        norm_params = {
            id(p) for m in self.model.modules() if is_norm_module(m) for p in m.parameters(recurse=False)
        }
        groups: dict[tuple, dict[str, Any]] = {}
        for name in self._trainable:
            p = params[name]
            where, spec, rel = owner[name]
            opts = get_policy(spec.name).optim_options(rel, spec)
            scale = float(opts.get("lr_scale", 1.0) or 1.0)
            wd = opts.get("weight_decay")
            wd = weight_decay if wd is None else float(wd)
            no_decay = (
                id(p) in norm_params or name.endswith(".bias") or len(full_shape(p)) < 2
                or any("gate" in part for part in rel.split(".") if _is_adapter_name(part, _adapter_prefixes()))
            )
            if no_decay:
                wd = 0.0
            key = (spec.name, scale, wd)
            if key not in groups:
                gname = f"{spec.name}/lr_scale={scale:g}/wd={wd:g}"
                groups[key] = {"params": [], "lr": lr * scale, "weight_decay": wd, "name": gname,
                               "lr_scale": scale}
            groups[key]["params"].append(p)
        return list(groups.values())

    # ------------------------------------------------------------------ state
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable parameters plus every installed adapter parameter (adapters are not part of
        the base checkpoint), detached, in ``named_parameters()`` order."""
        keep = set(self._trainable) | set(adapter_param_names(self.model))
        return {n: p.detach() for n, p in self.model.named_parameters() if n in keep}

    def load_trainable_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Copy tensors into the model's parameters by name.

        Args:
            state_dict: name -> tensor (e.g. from :meth:`trainable_state_dict`).
            strict: require every installed adapter parameter to be present.

        Under ZeRO-3 call it inside the engine's gathered-parameters context (the copy needs
        whole tensors).

        Raises:
            ValueError: unknown names, shape mismatches, or (strict) missing adapter parameters.
        """
        params = dict(self.model.named_parameters())
        unknown = sorted(set(state_dict) - set(params))
        problems = []
        if unknown:
            problems.append(f"unknown parameter names {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        if strict:
            missing = sorted(set(adapter_param_names(self.model)) - set(state_dict))
            if missing:
                problems.append(f"missing adapter parameters {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        for n, t in state_dict.items():
            if n in params:
                want = tuple(full_shape(params[n]))
                if tuple(t.shape) != want:
                    problems.append(f"{n}: shape {tuple(t.shape)} does not match the model's {want}")
        if problems:
            raise ValueError(
                "load_trainable_state_dict: " + "; ".join(problems)
                + ". Load a state saved for this model and plan."
            )
        with torch.no_grad():
            for n, t in state_dict.items():
                params[n].copy_(t.to(device=params[n].device, dtype=params[n].dtype))

    # ------------------------------------------------------------------ merge
    def _installed_layer_specs(self) -> list[tuple[LayerInfo, PolicySpec]]:
        seen, out = set(), []
        for _plan, resolved in self.installed:
            for layer, spec in _layer_specs(self.layout, resolved):
                key = (layer.index, _spec_key(spec))
                if key not in seen:
                    seen.add(key)
                    out.append((layer, spec))
        return out

    def merge(self, layers: Iterable[int] | None = None) -> list[str]:
        """Fold every mergeable adapter (plain LoRA) into the base weights (idempotent).

        Policies may define ``merge(layer, spec, layout)``; otherwise any adapter child module
        with ``mergeable`` / ``merge(base)`` (the LoRA adapter protocol) is merged into its
        parent. Gated adapters and prefixes cannot be merged and stay active.

        Args:
            layers: global indices of the layers to merge (default all); a streaming export
                merges one gathered layer at a time.

        Returns:
            Qualified names of the base modules that now hold a merged update.
        """
        done = self._merge_or_unmerge(merge=True, layers=layers)
        return done + (merge_new_rows(self.model) if layers is None else [])

    def unmerge(self, layers: Iterable[int] | None = None) -> list[str]:
        """Undo :meth:`merge` (exact up to float rounding). Returns the unmerged module names."""
        done = self._merge_or_unmerge(merge=False, layers=layers)
        return done + (unmerge_new_rows(self.model) if layers is None else [])

    def _merge_or_unmerge(self, merge: bool, layers: Iterable[int] | None = None) -> list[str]:
        done: list[str] = []
        custom = set()
        only = None if layers is None else set(layers)
        for layer, spec in self._installed_layer_specs():
            if only is not None and layer.index not in only:
                continue
            policy = get_policy(spec.name)
            fn = getattr(policy, "merge" if merge else "unmerge", None)
            if callable(fn):
                custom.add(layer.index)
                done.extend(fn(layer, spec, self.layout) or [])
        prefixes = _adapter_prefixes()
        for layer in self.layout.layers:
            if layer.index in custom or (only is not None and layer.index not in only):
                continue
            for name, mod in layer.module.named_modules():
                for cname, child in mod._modules.items():
                    if child is None or not any(cname.startswith(p) for p in prefixes):
                        continue
                    if (merge and getattr(child, "mergeable", False) and not getattr(child, "merged", False)
                            and callable(getattr(child, "merge", None))):
                        child.merge(mod)
                        done.append(f"{layer.name}.{name}" if name else layer.name)
                    elif not merge and getattr(child, "merged", False) and callable(getattr(child, "unmerge", None)):
                        child.unmerge(mod)
                        done.append(f"{layer.name}.{name}" if name else layer.name)
        return done

    def merged_adapter_param_names(self) -> list[str]:
        """Adapter parameters whose update currently sits merged in the base weights."""
        out = []
        for name, mod in self.model.named_modules():
            if getattr(mod, "merged", False) is True and callable(getattr(mod, "unmerge", None)):
                out.extend(f"{name}.{n}" for n, _ in mod.named_parameters())
        return out + merged_new_rows_param_names(self.model)


# --------------------------------------------------------------------------- entry point


def apply_plan(
    model: nn.Module,
    plan: LayerPlan | str | Mapping,
    *,
    install: Iterable[LayerPlan | str | Mapping] = (),
    layout: ModelLayout | None = None,
    log: bool = True,
) -> AppliedPlan:
    """Install the adapters of ``plan`` and of every plan in ``install``, then set
    ``requires_grad`` from ``plan`` alone.

    Call it before an engine partitions or wraps the parameters (``deepspeed.initialize``, the
    Megatron optimizer build): they build their parameter groups from ``requires_grad``.

    Args:
        model: a decoder-only causal LM, modified in place.
        plan: the plan that trains now (any form :meth:`LayerPlan.parse` accepts).
        install: further plans whose adapters must exist (later schedule phases).
        layout: the model's layout when already discovered.
        log: log the ``plan applied`` line with this rank's counts (the Megatron adapter logs
            model-wide totals over the pipeline / tensor-parallel ranks instead).

    Returns:
        The :class:`AppliedPlan`.

    Raises:
        ConfigError: every plan problem at once (ranges, overlaps, policies that cannot apply
            to this architecture), before anything is installed.
        ValueError: the model's structure cannot be discovered.
    """
    layout = layout or discover_layout(model)
    # The same plan object listed again (a rotating schedule's phases share plans) installs once.
    unique: dict[int, tuple[int, Any]] = {}
    for i, p in enumerate(install):
        unique.setdefault(id(p), (i, p))
    paths = ["plan"] + [f"install[{i}]" for i, _ in unique.values()]
    plans = [LayerPlan.parse(plan)] + [LayerPlan.parse(p, path=f"install[{i}]") for i, p in unique.values()]
    problems: list[str] = []
    resolved: list[ResolvedPlan | None] = []
    for i, p in enumerate(plans):
        path = paths[i]
        try:
            r = p.resolve(layout.num_layers, path=path)
        except ConfigError as e:
            problems.extend(e.problems)
            resolved.append(None)
            continue
        problems.extend(check_plan(r, layout, path=path))
        resolved.append(r)
    paths = ["plan"] + [f"install[{i}]" for i in range(len(plans) - 1)]
    named = [(q, r) for q, r in zip(paths, resolved, strict=True) if r is not None]
    problems.extend(check_new_rows(model, layout, named))
    if problems:
        raise ConfigError(problems)
    for i, r in enumerate(resolved):
        if layout.tied_embeddings and r.lm_head.name != r.embeddings.name:
            log_rank0(
                logger,
                f"{paths[i]}: the LM head is tied to the token "
                f"embeddings, so the shared weight follows embeddings ({r.embeddings.name}), not "
                f"lm_head ({r.lm_head.name}).",
                level=logging.WARNING,
            )
    _record_base_tensors(model)
    applied = AppliedPlan(model, layout, plans[0], resolved[0])  # type: ignore[arg-type]
    # Install later phases first so that the trainable plan's apply() runs last.
    for p, r in reversed(list(zip(plans, resolved, strict=True))):
        assert r is not None
        applied.installed.insert(0, (p, r))
        for layer, spec in _layer_specs(layout, r):
            names = get_policy(spec.name).apply(layer, spec, layout)
            applied._names[(layer.index, _spec_key(spec))] = frozenset(names)
        install_new_rows_for_plan(model, layout, r, "plan" if p is plans[0] else "install")
    applied._set_requires_grad()
    if log:
        log_rank0(
            logger, "plan applied: %s (%d of %d parameters trainable)", str(plans[0]),
            applied.num_trainable_params(), applied.num_total_params(),
        )
    return applied


# --------------------------------------------------------------------------- checkpointing


def _checkpointed_forward(block: nn.Module, orig, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint

    if block.training and torch.is_grad_enabled():
        for k in ("cache", "past_key_values", "past_key_value", "layer_past"):
            if kwargs.get(k) is not None:
                kwargs[k] = None
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        return checkpoint(orig, *args, use_reentrant=False, **kwargs)
    return orig(*args, **kwargs)


def enable_gradient_checkpointing(model: nn.Module, layout: ModelLayout | None = None) -> None:
    """Checkpoint every decoder block (frozen ones included) with non-reentrant checkpointing.

    transformers models go through their public API with ``{"use_reentrant": False}``:
    ``activation_checkpointing_enable`` (transformers >= 5.x, where ``gradient_checkpointing_enable``
    is its deprecated alias) or ``gradient_checkpointing_enable`` (older releases). That API also
    installs ``enable_input_require_grads`` (a hook making the embedding output require grad, which
    only *reentrant* checkpointing needs). Non-reentrant checkpointing needs no input that requires
    grad, so the hook is removed again when this call installed it: frozen embeddings do not hit
    "element 0 of tensors does not require grad", and no gradient is forced through frozen bottom
    layers that nothing below needs (``freeze_shallow`` would otherwise run backward through its
    whole frozen bottom). Every block is checkpointed, including frozen blocks that gradients pass
    through (the deep layers of ``freeze_deep``), so their activations are recomputed instead of
    kept. Models without transformers' mechanism get each block's ``forward`` wrapped. Only active
    in training mode.
    """
    layout = layout or discover_layout(model)
    if getattr(model, "supports_gradient_checkpointing", False):
        had_hook = getattr(model, "_require_grads_hook", None) is not None
        kwargs = {"use_reentrant": False}
        if callable(getattr(model, "activation_checkpointing_enable", None)):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif callable(getattr(model, "gradient_checkpointing_enable", None)):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if not had_hook and getattr(model, "_require_grads_hook", None) is not None:
            model.disable_input_require_grads()
    for layer in layout.layers:
        block = layer.module
        if getattr(block, "gradient_checkpointing", False) is True:
            continue
        if getattr(block, "_layerfreeze_checkpointed", False):
            continue
        orig = block.forward
        block.forward = functools.partial(_checkpointed_forward, block, orig)
        block._layerfreeze_checkpointed = True
