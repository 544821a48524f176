"""The ``new_rows`` part policy: train only the token rows from a given id on.

``embeddings: new_rows(from_id=32000)`` / ``lm_head: new_rows(from_id=32000)`` (plan parts
only, never a layer). As PEFT's ``trainable_token_indices`` does, the rows ``>= from_id`` live in
a separate trainable parameter ``new_rows_weight`` registered on the embedding / head module
(initialised from the current rows), and a forward hook puts them into the module's output:
the full weight stays frozen, so the optimizer holds state (and applies weight decay) for the
new rows only, and the old rows stay bit-identical. A tied head shares the embedding's
``new_rows_weight`` (one parameter). :func:`merge_new_rows` copies the trained rows into the
full weight for a merged export; the hook's output is the same before and after a merge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layerfreeze.errors import ConfigError
from layerfreeze.models import LayerInfo, ModelLayout
from layerfreeze.policies.base import PolicySpec
from layerfreeze.registry import register_policy

PARAM = "new_rows_weight"
AUTO = "auto"
_AUTO_IN_TEXT = re.compile(r"(\bfrom_id\s*=\s*)auto\b")
_STATE = "_layerfreeze_new_rows"
#: Engine handlers for models without transformers' embedding accessors (e.g. megatron's
#: vocabulary-parallel ``GPTModel``): objects with ``owns(model) -> bool``,
#: ``check(model, layout, part, from_id, where) -> list[str]`` and
#: ``install(model, layout, resolved, path) -> None``. Registered by the engine package.
_ENGINE_HANDLERS: list[Any] = []


def register_new_rows_engine(handler: Any) -> None:
    """Register an engine's ``new_rows`` handler (idempotent; see ``_ENGINE_HANDLERS``)."""
    if handler not in _ENGINE_HANDLERS:
        _ENGINE_HANDLERS.append(handler)


def _engine_handler(model: nn.Module) -> Any:
    return next((h for h in _ENGINE_HANDLERS if h.owns(model)), None)


@dataclass(frozen=True)
class NewRowsConfig:
    """Options of ``new_rows``."""

    from_id: int | str
    """First token id whose row trains (required; rows below it stay frozen). ``auto``: the
    first id ``tokenizer.extend_from`` adds (``layerfreeze train`` replaces it before the plan
    resolves, see :func:`substitute_auto_from_id`)."""
    lr_scale: float = 1.0
    """Multiplier on the run's learning rate for the new rows."""
    weight_decay: float | None = None
    """Weight decay for the new rows (None: the run's default); old rows get none (not trained)."""

    def __post_init__(self):
        problems = []
        fid = self.from_id
        if fid != AUTO and (isinstance(fid, bool) or not isinstance(fid, int) or fid < 0):
            problems.append(
                f"from_id: must be the first new token id (an integer >= 0), got "
                f"{self.from_id!r}. Write e.g. new_rows(from_id=32000), or from_id=auto with "
                "tokenizer.extend_from."
            )
        if not self.lr_scale > 0:
            problems.append(f"lr_scale: must be > 0, got {self.lr_scale}. Use e.g. lr_scale=0.1.")
        if self.weight_decay is not None and self.weight_decay < 0:
            problems.append(f"weight_decay: must be >= 0, got {self.weight_decay}.")
        if problems:
            raise ConfigError(problems)


@register_policy("new_rows")
class NewRowsPolicy:
    """Part-only policy (``embeddings`` / ``lm_head``); the plan refuses it on layers."""

    config_cls = NewRowsConfig
    param_prefix = "new_rows_"
    part_only = ("embeddings", "lm_head")
    """Plan parts that accept the policy (``plan._PART_ONLY_POLICIES`` mirrors this)."""

    def check(self, layer: LayerInfo, spec: PolicySpec, layout: ModelLayout) -> list[str]:
        """A layer cannot use ``new_rows`` (the plan already refuses it)."""
        return [f"layer {layer.index}: new_rows applies to embeddings / lm_head only"]

    def apply(self, layer: LayerInfo, spec: PolicySpec, layout: ModelLayout) -> set[str]:
        """Never called for layers (see :meth:`check`)."""
        raise ConfigError(f"layer {layer.index}: new_rows applies to embeddings / lm_head only.")

    def optim_options(self, param_name: str, spec: PolicySpec) -> dict[str, float | None]:
        """The configured lr scale and weight decay."""
        opts = spec.options
        return {"lr_scale": opts.lr_scale, "weight_decay": opts.weight_decay}


def _embedding_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    start = module.__dict__[_STATE]["from_id"]
    ids = args[0]
    new = getattr(module, PARAM)
    mask = ids >= start
    rows = F.embedding((ids - start).clamp(min=0), new)
    scale = getattr(module, "embed_scale", None)  # scaled embeddings (Gemma3) scale in forward
    if scale is not None:
        rows = rows * scale.to(new.dtype)
    return torch.where(mask.unsqueeze(-1), rows.to(output.dtype), output)


def _head_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    start = module.__dict__[_STATE]["from_id"]
    new = getattr(module, PARAM)
    bias = module.bias[start:] if getattr(module, "bias", None) is not None else None
    tail = F.linear(args[0], new.to(args[0].dtype), bias).to(output.dtype)
    return torch.cat([output[..., :start], tail], dim=-1)


def install_new_rows(module: nn.Module, from_id: int, kind: str, path: str,
                     shared: nn.Parameter | None = None) -> nn.Parameter:
    """Register ``new_rows_weight`` (rows ``from_id:`` of ``module.weight``) and the hook.

    Idempotent for the same ``from_id``.

    Args:
        module: the token embedding (``kind="embedding"``) or the output head (``"head"``).
        from_id: first trained row.
        kind: ``"embedding"`` or ``"head"``.
        path: config path for errors (``plan.embeddings``).
        shared: an existing ``new_rows_weight`` to reuse (a tied head).

    Returns:
        The trainable parameter.

    Raises:
        ConfigError: ``from_id`` is not below the row count, or differs from an earlier install.
    """
    _check_not_auto(from_id, path)
    state = module.__dict__.get(_STATE)
    if state is not None:
        if state["from_id"] != from_id:
            raise ConfigError(
                f"{path}: new_rows(from_id={from_id}) differs from the installed "
                f"from_id={state['from_id']}. Use one from_id in every plan of a schedule."
            )
        return getattr(module, PARAM)
    rows = module.weight.shape[0]
    if not 0 <= from_id < rows:
        raise ConfigError(
            f"{path}: new_rows from_id={from_id} is out of range for {rows} rows "
            f"(valid 0-{rows - 1}). Set from_id to len(old tokenizer) after resizing."
        )
    if shared is None:
        shared = nn.Parameter(module.weight.detach()[from_id:].clone())
    module.register_parameter(PARAM, shared)
    hook = module.register_forward_hook(_embedding_hook if kind == "embedding" else _head_hook)
    module.__dict__[_STATE] = {"from_id": from_id, "hook": hook, "orig": None,
                               "rows": (slice(from_id, None), slice(None))}
    return shared


def new_rows_from_id(module: nn.Module) -> int | None:
    """The ``from_id`` of the ``new_rows_weight`` installed on ``module`` (None: not installed)."""
    state = module.__dict__.get(_STATE)
    return None if state is None else state["from_id"]


def _auto_message(path: str) -> str:
    return (
        f"{path}: new_rows(from_id=auto) is the first id tokenizer.extend_from adds, got "
        "from_id=auto and no tokenizer.extend_from. Set tokenizer.extend_from, or write "
        "from_id=<len(old tokenizer)>."
    )


def _check_not_auto(from_id: Any, path: str) -> None:
    if from_id == AUTO:
        raise ConfigError(_auto_message(path))


def substitute_auto_from_id(spec: Any, first_id: int) -> Any:
    """``spec`` (a plan or schedule: string, mapping or list of them) with every
    ``from_id=auto`` / ``from_id: auto`` replaced by ``first_id``; other values unchanged."""
    if isinstance(spec, str):
        return _AUTO_IN_TEXT.sub(lambda m: f"{m.group(1)}{first_id}", spec)
    if isinstance(spec, dict):
        return {
            k: first_id if k == "from_id" and v == AUTO else substitute_auto_from_id(v, first_id)
            for k, v in spec.items()
        }
    if isinstance(spec, list):
        return [substitute_auto_from_id(v, first_id) for v in spec]
    return spec


def new_rows_modules(model: nn.Module) -> list[nn.Module]:
    """Modules of ``model`` carrying ``new_rows_weight`` (each once)."""
    return [m for m in model.modules() if _STATE in m.__dict__]


def merge_new_rows(model: nn.Module) -> list[str]:
    """Write each ``new_rows_weight`` into rows ``from_id:`` of its module's full weight.

    Idempotent; the forward output does not change. Returns the merged module names.
    """
    done, seen = [], set()
    with torch.no_grad():
        for name, m in model.named_modules():
            state: dict[str, Any] | None = m.__dict__.get(_STATE)
            if state is None or id(m.weight) in seen:  # a tied head shares the weight
                continue
            seen.add(id(m.weight))
            # (rows of the full weight, rows of new_rows_weight): a vocabulary-parallel shard
            # holds only the intersection of its rows with the new ones.
            w_rows, p_rows = state["rows"]
            if state["orig"] is None:
                state["orig"] = m.weight.detach()[w_rows].clone()
            m.weight[w_rows] = getattr(m, PARAM).detach()[p_rows].to(m.weight.dtype)
            done.append(name)
    return done


def unmerge_new_rows(model: nn.Module) -> list[str]:
    """Undo :func:`merge_new_rows` (restores the rows exactly). Returns the module names."""
    done, seen = [], set()
    with torch.no_grad():
        for name, m in model.named_modules():
            state = m.__dict__.get(_STATE)
            if state is None or state["orig"] is None or id(m.weight) in seen:
                continue
            seen.add(id(m.weight))
            m.weight[state["rows"][0]] = state["orig"]
            state["orig"] = None
            done.append(name)
    return done


def install_for_plan(model: nn.Module, layout: ModelLayout, resolved: Any, path: str) -> None:
    """Install ``new_rows_weight`` where ``resolved`` gives ``embeddings`` / ``lm_head``
    ``new_rows`` (a tied head shares the embedding's; its own ``lm_head`` entry is ignored,
    as for every policy on a tied head).

    Raises:
        ConfigError: the model has no transformers ``get_input_embeddings`` /
            ``get_output_embeddings`` (e.g. a Megatron model), or a bad ``from_id``.
    """
    emb_spec, head_spec = resolved.embeddings, resolved.lm_head
    wanted = [p for p, s in (("embeddings", emb_spec), ("lm_head", head_spec)) if s.name == "new_rows"]
    if not wanted:
        return
    handler = _engine_handler(model)
    if handler is not None:
        handler.install(model, layout, resolved, path)
        return
    if not callable(getattr(model, "get_input_embeddings", None)):
        raise ConfigError(
            f"{path}.{wanted[0]}: new_rows needs a transformers model (get_input_embeddings), got "
            f"{type(model).__name__}. Use freeze / full for this part on this engine."
        )
    head = model.get_output_embeddings()
    if emb_spec.name == "new_rows":
        start = emb_spec.options.from_id
        shared = install_new_rows(model.get_input_embeddings(), start, "embedding",
                                  f"{path}.embeddings")
        if layout.tied_embeddings and head is not None:
            install_new_rows(head, start, "head", f"{path}.embeddings", shared=shared)
    if head_spec.name == "new_rows" and not layout.tied_embeddings:
        if head is None:
            raise ConfigError(f"{path}.lm_head: the model has no output head for new_rows.")
        install_new_rows(head, head_spec.options.from_id, "head", f"{path}.lm_head")


def check_plans(model: nn.Module, layout: ModelLayout, plans: list[tuple[str, Any]]) -> list[str]:
    """Problems of the ``new_rows`` parts of ``plans`` (``(path, resolved)`` pairs), found before
    anything is installed: a ``from_id`` out of range, or two different ``from_id`` values for one
    module across the plans of a schedule."""
    problems: list[str] = []
    seen: dict[str, tuple[int, str]] = {}
    full = {part: next((p for p, r in plans if r.non_layer(part).name == "full"), None)
            for part in ("embeddings", "lm_head")}
    for path, resolved in plans:
        for part in ("embeddings", "lm_head"):
            spec = resolved.non_layer(part)
            if spec.name != "new_rows":
                continue
            if full[part] is not None:
                # The hook would keep overriding rows >= from_id with the (then frozen) new-rows
                # parameter, so `full` would silently not train them.
                problems.append(
                    f"{path}.{part}: new_rows cannot share a schedule with {part}: full (in "
                    f"{full[part]}). Use new_rows or freeze for {part} in every phase."
                )
            where = f"{path}.{part}"
            start = spec.options.from_id
            if start == AUTO:
                problems.append(_auto_message(where))
                continue
            key = "embeddings" if part == "embeddings" or layout.tied_embeddings else part
            if key in seen and seen[key][0] != start:
                problems.append(
                    f"{where}: new_rows(from_id={start}) differs from from_id={seen[key][0]} in "
                    f"{seen[key][1]}. Use one from_id in every plan of a schedule."
                )
            seen.setdefault(key, (start, where))
            handler = _engine_handler(model)
            if handler is not None:
                problems.extend(handler.check(model, layout, part, start, where))
                continue
            get = "get_input_embeddings" if part == "embeddings" else "get_output_embeddings"
            if not callable(getattr(model, get, None)) or getattr(model, get)() is None:
                problems.append(
                    f"{where}: new_rows needs a transformers model with {get}(), got "
                    f"{type(model).__name__}. Use freeze / full for this part on this engine."
                )
                continue
            rows = getattr(model, get)().weight.shape[0]
            if start >= rows:
                problems.append(
                    f"{where}: new_rows from_id={start} is out of range for {rows} rows "
                    f"(valid 0-{rows - 1}). Set from_id to len(old tokenizer) after resizing."
                )
    return problems


def merged_param_names(model: nn.Module) -> list[str]:
    """Qualified names of the ``new_rows_weight`` parameters currently merged into their full
    weight (each once; a tied head's shared parameter under its first name)."""
    merged = {id(getattr(m, PARAM)) for m in model.modules()
              if _STATE in m.__dict__ and m.__dict__[_STATE]["orig"] is not None}
    return [n for n, p in model.named_parameters() if id(p) in merged]
