"""The ``lora`` policy: low-rank adapters on a layer's linears, optionally with the HLPT token gate.

For every targeted linear ``W`` (``nn.Linear``, transformers' GPT-2 ``Conv1D``, fused
projections such as GPT-2 ``c_attn`` or GPT-NeoX ``query_key_value`` included) the layer computes

    y = x W^T + b + g(h) * (alpha / r) * dropout(x) A^T B^T

with ``A`` (r x in, Kaiming-uniform) and ``B`` (out x r, zeros), so at initialisation the model's
outputs equal the base model's exactly. Without ``gated`` the gate is the constant 1. With
``gated`` it is the HLPT input-dependent gate ``g(h) = sigmoid(w . h + b)``, one value per
token, computed in fp32 from ``h`` = the input of the targeted sub-block (the attention input
for attention targets, the FFN input for MLP targets) and shared by every adapter in that
sub-block. ``w = 0, b = 0`` at init gives ``g = 0.5``: a zero gate times the zero ``B`` would
give zero gradients to both forever (the dead start), a half-open gate does not.

Installation keeps the base modules in place (their parameter names and classes do not
change): the adapter is a child module ``lora_adapter`` of the base linear and a forward hook
adds its update to the base output; the gate is a child module ``lora_gate`` of the sub-block
whose forward pre-hook computes ``g`` for that forward pass. Which adapter class wraps which
base module is decided by :data:`LORA_DISPATCHERS`, an ordered list where the first match wins
and plain ``nn.Linear`` comes last (peft ``tuners/lora/model.py::_create_new_module``).

Around this module: :mod:`~layerfreeze.policies.lora_math` holds the arithmetic every adapter
uses (here, fused experts, megatron), :mod:`~layerfreeze.policies.lora_experts` the adapter of
fused MoE experts, :mod:`~layerfreeze.policies.gate` the token gate and hook helpers shared with
the ``prefix`` policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from layerfreeze.errors import ConfigError
from layerfreeze.models import LayerInfo, ModelLayout
from layerfreeze.policies.base import PolicySpec
from layerfreeze.policies.gate import TokenGate, block_input, has_hook
from layerfreeze.policies.lora_experts import (
    ADAPTER_ATTR,
    EXPERTS_WRAPPER_PREFIX,  # noqa: F401 (importable from here as before the split)
    ExpertsLoRAAdapter,
    build_experts,
    experts_check,
    is_fused_experts,
)
from layerfreeze.policies.lora_math import (
    add_low_rank,
    delta_weight,
    merge_delta,
    scale_low_rank,
    unmerge_delta,
    weight_shape,
)
from layerfreeze.registry import register_policy

__all__ = [
    "LoRAConfig",
    "LoRAAdapter",
    "TokenGate",
    "LoRAPolicy",
    "LORA_DISPATCHERS",
    "LoRADispatcher",
    "register_lora_dispatcher",
    "register_gate_source",
    "resolve_lora_targets",
    "iter_lora_adapters",
    "merge_lora",
    "unmerge_lora",
    "ExpertsLoRAAdapter",
]

_TARGET_KEYWORDS = ("mlp", "attn", "all", "down")
_GATE_ATTR = "lora_gate"
# On the first MLP linear of a block whose MLP has no submodule: a plain reference to the gate.
_ENTRY_GATE_KEY = "_lora_entry_gate"


@dataclass(frozen=True)
class LoRAConfig:
    """Options of ``lora``."""

    r: int = 8
    """Rank of the update ``B A`` (>= 1)."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input (0 <= dropout < 1); the base path is untouched."""
    target: str | list[str] = "all"
    """Which linears get an adapter: ``mlp``, ``attn``, ``all`` (both), ``down`` (the MLP's
    output projection only: its linears that map another width back to the model width, e.g.
    ``down_proj``, ``fc2``, ``c_proj``), or a list of module names inside the block, each either a
    path (``self_attn.q_proj``) or a last name (``q_proj``)."""
    gated: bool = False
    """Add the HLPT gate ``sigmoid(w . h + b)`` per token on the update (h: sub-block input)."""
    lr_scale: float = 1.0
    """Multiplier on the run's learning rate for ``lora_a`` / ``lora_b``."""
    weight_decay: float | None = None
    """Weight decay for ``lora_a`` / ``lora_b`` (None: the run's default)."""
    gate_lr_scale: float = 1.0
    """Multiplier on the run's learning rate for the gate's ``w`` and ``b`` (never decayed)."""

    def __post_init__(self):
        problems = []
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            problems.append(f"r: must be an integer >= 1, got {self.r!r}. Use e.g. r=16.")
        if not self.alpha > 0:
            problems.append(f"alpha: must be > 0, got {self.alpha!r}. Use e.g. alpha=2*r.")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout: must be in [0, 1), got {self.dropout!r}.")
        target = self.target
        if isinstance(target, str):
            if target not in _TARGET_KEYWORDS:
                problems.append(
                    f"target: must be one of {', '.join(_TARGET_KEYWORDS)} or a list of module "
                    f"names, got {target!r}. For one named module write a list, e.g. [q_proj]."
                )
        elif isinstance(target, (list, tuple)):
            bad = [t for t in target if not isinstance(t, str) or not t or t.strip(".") != t]
            if not target:
                problems.append("target: the list of module names is empty. Name at least one.")
            elif bad:
                problems.append(
                    f"target: module names must be non-empty dotted names, got {bad!r}."
                )
            elif len(set(target)) != len(target):
                problems.append(f"target: duplicate module names in {list(target)!r}.")
            else:
                object.__setattr__(self, "target", tuple(target))  # hashable, like the spec
        else:
            problems.append(f"target: expected a string or a list of names, got {target!r}.")
        if not self.lr_scale > 0:
            problems.append(f"lr_scale: must be > 0, got {self.lr_scale!r}. Use e.g. lr_scale=1.0.")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            problems.append(f"weight_decay: must be >= 0, got {self.weight_decay!r}.")
        if not self.gate_lr_scale > 0:
            problems.append(f"gate_lr_scale: must be > 0, got {self.gate_lr_scale!r}.")
        if problems:
            raise ConfigError(problems)

    @property
    def scaling(self) -> float:
        """The update's scale ``alpha / r``."""
        return self.alpha / self.r


# ---------------------------------------------------------------------------------------------
# Modules


class LoRAAdapter(nn.Module):
    """Low-rank update of one linear map ``in_features -> out_features``.

    ``forward(x, base_out)`` returns ``base_out + g * (alpha / r) * dropout(x) A^T B^T``.
    ``A`` is Kaiming-uniform (peft/torchtune), ``B`` is zero, so the update starts at exactly 0.

    Args:
        in_features: input width of the base map.
        out_features: output width of the base map.
        r: rank.
        alpha: scale numerator (update scale ``alpha / r``).
        dropout: dropout probability on the adapter input.
        transposed: the base weight is stored ``(in, out)`` (GPT-2 ``Conv1D``) rather than
            ``(out, in)`` (``nn.Linear``); only merging needs to know.
        gate: the sub-block's :class:`TokenGate` when gated, else None.
        device: device of ``A`` and ``B`` (the base weight's).
        dtype: dtype of ``A`` and ``B`` (the base weight's).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        transposed: bool = False,
        gate: TokenGate | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.scaling = r, float(alpha), float(alpha) / r
        self.transposed = transposed
        self.lora_a = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        # The gate is owned (registered) by the sub-block; keep a plain reference so its
        # parameters are not registered twice. deepcopy of the whole model keeps the link.
        self.__dict__["_gate"] = gate

    @property
    def gate(self) -> TokenGate | None:
        """The sub-block's gate (None when ungated)."""
        return self.__dict__["_gate"]

    @property
    def mergeable(self) -> bool:
        """True when the update can be folded exactly into the base weight (ungated only)."""
        return self.gate is None

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """Return ``base_out + g * (alpha / r) * dropout(x) A^T B^T`` (a new tensor).

        Every elementwise step runs on the rank-r intermediate ``h = dropout(x) A^T``, never on
        a full-size ``(tokens, out_features)`` tensor: the scale ``alpha / r`` is the ``alpha``
        of one ``addmm`` that adds ``h B^T`` to the base output (no separate full-size multiply
        and add, forward or backward), and the gate multiplies ``h`` per token in fp32 (no
        full-size fp32 upcast, and only ``h`` is kept for the gate's gradient). ``B`` is zero at
        init, so ``base_out + 0`` keeps the base model's outputs bit-exact.
        """
        if self.merged:
            return base_out
        if isinstance(self.lora_dropout, nn.Dropout):  # p = 0 is nn.Identity: skip the call
            x = self.lora_dropout(x)
        if x.dtype != self.lora_a.dtype:
            x = x.to(self.lora_a.dtype)
        gate = self.gate
        h, scale = scale_low_rank(
            F.linear(x, self.lora_a), self.scaling, gate.current(x) if gate is not None else None
        )
        return add_low_rank(base_out, h, self.lora_b, scale)

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / r) B A`` laid out like the base weight (transposed for ``Conv1D``)."""
        return delta_weight(self.lora_a, self.lora_b, self.scaling, transposed=self.transposed)

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        """Fold the update into ``base.weight`` (idempotent).

        Raises:
            ValueError: the adapter is gated (input-dependent, cannot be folded exactly).
        """
        if not self.mergeable:
            raise ValueError(
                f"{self.gate.where}: a gated LoRA update depends on the input and cannot be merged "
                "into the base weight; export keeps it in the sidecar instead."
            )
        if not self.merged:
            merge_delta(base.weight, self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        """Take a merged update back out of ``base.weight`` (idempotent)."""
        if self.merged:
            unmerge_delta(base.weight, self.delta_weight())
            self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
            f"gated={self.gate is not None}, transposed={self.transposed}"
        )


# ---------------------------------------------------------------------------------------------
# Dispatch: which adapter wraps which base module (first match wins, nn.Linear last)

@dataclass(frozen=True)
class LoRADispatcher:
    """How to put a LoRA adapter on one kind of base module.

    Attributes:
        name: short label (for errors and docs).
        matches: ``matches(base) -> bool``; True when this dispatcher handles ``base``.
        build: ``build(base, *, r, alpha, dropout, gate) -> nn.Module`` returning the adapter
            (a module with ``forward(x, base_out)``, ``merge(base)``, ``unmerge(base)``,
            ``merged`` and ``mergeable``), created on the base weight's device and dtype.
        check: optional ``check(base) -> str | None``: why this matched module cannot carry an
            adapter (e.g. an unsupported parallel mode); the policy's ``check`` reports it with
            the layer and module named. None when it can.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    build: Callable[..., nn.Module]
    check: Callable[[nn.Module], str | None] | None = None


def _is_conv1d(base: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(base, Conv1D)


def _build_conv1d(base: nn.Module, **kwargs) -> LoRAAdapter:
    fan_in, fan_out = weight_shape(base.weight)  # Conv1D stores (in, out): y = x W + b
    return LoRAAdapter(fan_in, fan_out, transposed=True, device=base.weight.device,
                       dtype=base.weight.dtype, **kwargs)


def _build_linear(base: nn.Module, **kwargs) -> LoRAAdapter:
    fan_out, fan_in = weight_shape(base.weight)
    return LoRAAdapter(fan_in, fan_out, transposed=False, device=base.weight.device,
                       dtype=base.weight.dtype, **kwargs)


#: Ordered dispatchers; the first whose ``matches`` accepts the base module builds its adapter.
#: Plain ``nn.Linear`` is last so subclasses with special layouts (tensor-parallel linears, ...)
#: can be matched before it. A fused projection (GPT-2 ``c_attn``, GPT-NeoX
#: ``query_key_value``) is one linear map to LoRA: one rank-r update over its whole output.
LORA_DISPATCHERS: list[LoRADispatcher] = [
    LoRADispatcher("transformers.experts", is_fused_experts, build_experts, experts_check),
    LoRADispatcher("transformers.Conv1D", _is_conv1d, _build_conv1d),
    LoRADispatcher("nn.Linear", lambda m: isinstance(m, nn.Linear), _build_linear),
]


#: ``fn(sub_block, gate)`` called on every gate a sub-block gets: an engine whose layers fuse the
#: norm into the sub-block's first linear (megatron's Transformer Engine spec) makes the gate
#: read that norm's output there (:func:`register_gate_source`).
_GATE_SOURCES: list[Callable[[nn.Module, TokenGate], None]] = []


def register_gate_source(fn: Callable[[nn.Module, TokenGate], None]) -> None:
    """Call ``fn(sub_block, gate)`` whenever a sub-block gets its gate (idempotent per ``fn``)."""
    if all(f is not fn for f in _GATE_SOURCES):
        _GATE_SOURCES.append(fn)


def register_lora_dispatcher(dispatcher: LoRADispatcher, *, index: int = 0) -> None:
    """Insert ``dispatcher`` (by default first, before the built-ins) unless its name exists."""
    if all(d.name != dispatcher.name for d in LORA_DISPATCHERS):
        LORA_DISPATCHERS.insert(index, dispatcher)


def _find_dispatcher(module: nn.Module) -> LoRADispatcher | None:
    return next((d for d in LORA_DISPATCHERS if d.matches(module)), None)


def _build_adapter(base: nn.Module, where: str, **kwargs) -> nn.Module:
    dispatcher = _find_dispatcher(base)
    if dispatcher is None:
        raise ValueError(
            f"{where}: no LoRA dispatcher handles {type(base).__name__}; supported: "
            f"{', '.join(d.name for d in LORA_DISPATCHERS)} "
            "(add one with register_lora_dispatcher)."
        )
    return dispatcher.build(base, **kwargs)


# ---------------------------------------------------------------------------------------------
# Hooks (module-level functions, no closures: deepcopy / pickling of the model stay correct)


def _lora_forward_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return module._modules[ADAPTER_ATTR](args[0], output)


def _gate_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    gate = module._modules[_GATE_ATTR]
    if not gate.reads_block_input:  # an engine computes it elsewhere (TokenGate)
        return
    gate(block_input(module, args, kwargs, gate.where))


def _gate_post_hook(module: nn.Module, args: tuple, output) -> None:
    module._modules[_GATE_ATTR].clear()


def _entry_gate_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    # The MLP's first linear when the MLP has no submodule: its input is the FFN input h. The
    # gate is owned by the block, whose forward hook clears it after the block's forward.
    gate = module.__dict__[_ENTRY_GATE_KEY]
    gate(block_input(module, args, kwargs, gate.where))


# ---------------------------------------------------------------------------------------------
# Targets


def _is_adapter_path(path: str) -> bool:
    from layerfreeze.policies.full import is_adapter_param

    return is_adapter_param(path)


def _candidates(layer: LayerInfo, root: str) -> list[tuple[str, nn.Module]]:
    """Dispatchable base modules at or inside ``layer.module.<root>``: (path-in-block, module)."""
    out = []
    for name, mod in layer.module.get_submodule(root).named_modules():
        path = f"{root}.{name}" if name else root
        if not _is_adapter_path(path) and _find_dispatcher(mod) is not None:
            out.append((path, mod))
    return out


def _in_out(base: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` widths of a linear LoRA can wrap (None when unknown)."""
    w = getattr(base, "weight", None)
    if _is_conv1d(base) and w is not None:
        return weight_shape(w)[0], weight_shape(w)[1]
    if isinstance(base, nn.Linear) and not hasattr(w, "quant_state"):
        return weight_shape(w)[1], weight_shape(w)[0]
    # Everything else (a 4-bit bitsandbytes Linear4bit stores its weight packed as uint8 with a
    # ``quant_state``; Megatron / custom linears) reports its logical widths as attributes.
    i, o = getattr(base, "in_features", None), getattr(base, "out_features", None)
    return (i, o) if isinstance(i, int) and isinstance(o, int) else None


def _fused_expert_params(layer: LayerInfo) -> list[str]:
    """MLP parameters of 3 or more dimensions (MoE experts stored as one fused tensor) that no
    dispatcher handles."""
    out = []
    for root, mod in layer.mlp_modules():
        covered = {
            f"{root}.{n}." if n else f"{root}."
            for n, m in mod.named_modules() if is_fused_experts(m)
        }
        for n, p in mod.named_parameters():
            path = f"{root}.{n}"
            if len(weight_shape(p)) >= 3 and not _is_adapter_path(path) and not any(
                path.startswith(c) for c in covered
            ):
                out.append(path)
    return out


def resolve_lora_targets(
    layer: LayerInfo, target: str | Sequence[str], hidden_size: int | None = None
) -> tuple[list[tuple[str, str]], list[str]]:
    """The linears ``target`` selects in ``layer``.

    Args:
        layer: the block.
        target: ``mlp`` / ``attn`` / ``all`` / ``down`` or module names (paths inside the block
            or last names).
        hidden_size: the model width, for ``down`` (default: the input width of the MLP's
            first linear, which takes the FFN input).

    Returns:
        ``(targets, problems)``: ``targets`` lists ``(path inside the block, sub-block name)``
        where the sub-block is ``layer.attn_name`` or ``layer.mlp_name`` (``""`` when the MLP's
        linears sit directly on the block); ``problems`` is empty when every requested module
        was found and is supported. The fused experts of transformers' MoE blocks (Mixtral,
        Qwen2-MoE, DeepSeek-V3) are one target (:class:`ExpertsLoRAAdapter`); ``down`` cannot
        select their down projection alone, and 3-D MLP tensors no dispatcher handles are a
        problem (adapting only the router or a shared expert would leave them untouched).
    """
    where = f"layer {layer.index} ({layer.name})"
    mlp_roots = [p for p, _ in layer.mlp_modules()]
    sub_of = {layer.attn_name: layer.attn_name, **{r: layer.mlp_name for r in mlp_roots}}
    attn_c = _candidates(layer, layer.attn_name)
    mlp_c = [c for r in mlp_roots for c in _candidates(layer, r)]
    mlp_label = layer.mlp_name or f"the MLP linears {', '.join(mlp_roots)} on the block"
    problems: list[str] = []
    if isinstance(target, str):
        chosen: list[tuple[str, nn.Module]] = []
        if target in ("attn", "all"):
            chosen += attn_c
        if target in ("mlp", "all", "down"):
            fused = _fused_expert_params(layer)
            if fused:
                problems.append(
                    f"{where}: lora target={target} cannot adapt the MoE experts of "
                    f"{type(layer.mlp).__name__}: they are fused 3-D parameters "
                    f"({', '.join(fused)}), and LoRA wraps nn.Linear / Conv1D modules "
                    "only. Use target=attn, name the linears to adapt (e.g. a shared expert), "
                    "or train this layer with full / prefix."
                )
                return [], problems
            experts = [p for p, m in mlp_c if is_fused_experts(m)]
            if target == "down" and experts:
                problems.append(
                    f"{where}: lora target=down cannot select the down projection alone of the "
                    f"fused MoE experts {', '.join(experts)}: their LoRA adapts every expert "
                    "weight. Use target=mlp, or name the linears to adapt."
                )
                return [], problems
            if target == "down":
                widths = [(p, m, _in_out(m)) for p, m in mlp_c]
                hidden = hidden_size or next((io[0] for _, _, io in widths if io), None)
                chosen += [(p, m) for p, m, io in widths if io and io[1] == hidden != io[0]]
                if not chosen:
                    shapes = ", ".join(f"{p} {io[0]}->{io[1]}" for p, _, io in widths if io)
                    problems.append(
                        f"{where}: lora target=down found no MLP linear mapping another width "
                        f"back to the model width {hidden} (MLP linears: {shapes or 'none'}); "
                        "name the down projection explicitly, e.g. target=[down_proj]."
                    )
                    return [], problems
            else:
                chosen += mlp_c
        targets = [(p, sub_of[p.split(".", 1)[0]]) for p, _ in chosen]
        if not targets:
            subs = {"attn": layer.attn_name, "mlp": mlp_label}.get(
                target, f"{layer.attn_name} or {mlp_label}"
            )
            problems.append(
                f"{where}: lora target={target} found no nn.Linear / Conv1D inside "
                f"{subs}; use explicit module names or another policy."
            )
        return targets, problems
    modules = dict(layer.module.named_modules())
    available = [p for p, _ in attn_c + mlp_c]
    targets = []
    for name in target:
        hits = [p for p in modules if p and (p == name or p.endswith("." + name))]
        hits = [p for p in hits if not _is_adapter_path(p)]
        if not hits:
            problems.append(
                f"{where}: lora target {name!r} matches no module in the block. "
                f"Available linears: {', '.join(available) or 'none'}."
            )
            continue
        for p in hits:
            root = p.split(".", 1)[0]
            if root not in sub_of:
                problems.append(
                    f"{where}: lora target {name!r} resolves to {p!r}, which is outside the "
                    f"attention ({layer.attn_name}) and MLP ({mlp_label}) submodules. "
                    f"Available linears: {', '.join(available) or 'none'}."
                )
            elif _find_dispatcher(modules[p]) is None:
                problems.append(
                    f"{where}: lora target {name!r} resolves to {p!r} "
                    f"({type(modules[p]).__name__}), "
                    "which is not a linear LoRA can wrap (nn.Linear, transformers Conv1D). "
                    f"Available linears: {', '.join(available) or 'none'}."
                )
            elif (p, sub_of[root]) not in targets:
                targets.append((p, sub_of[root]))
    return targets, problems


def iter_lora_adapters(root: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """Yield ``(qualified base-module name, base module, adapter)`` for each LoRA under ``root``."""
    for name, mod in root.named_modules():
        adapter = mod._modules.get(ADAPTER_ATTR)
        if isinstance(adapter, nn.Module) and hasattr(adapter, "merge"):
            yield name, mod, adapter


def merge_lora(root: nn.Module) -> list[str]:
    """Fold every mergeable (ungated) LoRA update under ``root`` into its base weight.

    Gated adapters cannot be folded (their update depends on the input): they stay active and
    unmerged. Idempotent.

    Returns:
        Qualified names of the base modules whose weight now holds the update.
    """
    merged = []
    for name, base, adapter in iter_lora_adapters(root):
        if getattr(adapter, "mergeable", False):
            adapter.merge(base)
            merged.append(name)
    return merged


def unmerge_lora(root: nn.Module) -> list[str]:
    """Undo :func:`merge_lora` (exact up to float rounding). Returns the unmerged names."""
    out = []
    for name, base, adapter in iter_lora_adapters(root):
        if getattr(adapter, "merged", False):
            adapter.unmerge(base)
            out.append(name)
    return out


# ---------------------------------------------------------------------------------------------
# The policy


def _options(spec: PolicySpec) -> LoRAConfig:
    return spec.options if spec.options is not None else LoRAConfig()


def _same_adapter(adapter: nn.Module, opts: LoRAConfig) -> bool:
    return (
        getattr(adapter, "r", None) == opts.r
        and getattr(adapter, "alpha", None) == float(opts.alpha)
        and (getattr(adapter, "gate", None) is not None) == opts.gated
        and float(getattr(adapter.lora_dropout, "p", 0.0)) == opts.dropout
    )


@register_policy("lora")
class LoRAPolicy:
    """Low-rank adapters (optionally HLPT-gated) on the targeted linears of a layer."""

    config_cls = LoRAConfig
    param_prefix = "lora_"

    def check(self, layer: LayerInfo, spec: PolicySpec, layout: ModelLayout) -> list[str]:
        """Problems: unknown / unsupported targets, or an adapter of other options already there."""
        opts = _options(spec)
        targets, problems = resolve_lora_targets(layer, opts.target, layout.hidden_size)
        where = f"layer {layer.index} ({layer.name})"
        for path, _ in targets:
            base = layer.module.get_submodule(path)
            dispatcher = _find_dispatcher(base)
            reason = dispatcher.check(base) if dispatcher and dispatcher.check else None
            if reason:
                problems.append(f"{where}: lora cannot wrap {path}: {reason}.")
            if is_fused_experts(base) and opts.dropout:
                problems.append(
                    f"{where}: lora on the fused MoE experts {path} takes no input dropout "
                    f"(got dropout={opts.dropout}); use dropout=0 on this layer, or "
                    "target=attn / named linears."
                )
            existing = base._modules.get(ADAPTER_ATTR)
            if existing is not None and not _same_adapter(existing, opts):
                problems.append(
                    f"{where}: {path} already carries a LoRA adapter ({existing.extra_repr()}) "
                    f"that differs from {spec.describe()}; one layer holds one LoRA per linear, "
                    "so use the same lora options in every plan that covers this layer."
                )
        return problems

    def apply(self, layer: LayerInfo, spec: PolicySpec, layout: ModelLayout) -> set[str]:
        """Install the adapters (and gates) once; return their parameter names in the block."""
        problems = self.check(layer, spec, layout)
        if problems:
            raise ValueError("\n".join(problems))
        opts = _options(spec)
        targets, _ = resolve_lora_targets(layer, opts.target, layout.hidden_size)
        names: set[str] = set()
        for path, sub in targets:
            gate = self._gate(layer, sub, layout) if opts.gated else None
            if gate is not None:
                owner = f"{sub}." if sub else ""
                names.update(f"{owner}{_GATE_ATTR}.{n}" for n, _ in gate.named_parameters())
            base = layer.module.get_submodule(path)
            adapter = base._modules.get(ADAPTER_ATTR)
            if adapter is None:
                adapter = _build_adapter(
                    base, f"layer {layer.index} ({layer.name}).{path}",
                    r=opts.r, alpha=opts.alpha, dropout=opts.dropout, gate=gate,
                )
                base.add_module(ADAPTER_ATTR, adapter)
            if not getattr(adapter, "runs_inside_base", False) and not has_hook(
                base._forward_hooks, _lora_forward_hook
            ):
                base.register_forward_hook(_lora_forward_hook)
            names.update(f"{path}.{ADAPTER_ATTR}.{n}" for n, _ in adapter.named_parameters())
        return names

    @staticmethod
    def _gate(layer: LayerInfo, sub: str, layout: ModelLayout) -> TokenGate:
        """The sub-block's gate, installed once: a child ``lora_gate`` of the sub-block whose
        pre-hook reads its input. When the MLP's linears sit on the block (``sub == ""``), the
        gate is a child of the block, computed from the input of the MLP's first linear (the
        FFN input) and cleared when the block's forward ends."""
        module = getattr(layer.module, sub) if sub else layer.module
        gate = module._modules.get(_GATE_ATTR)
        if gate is None:
            w = next(module.parameters())
            gate = TokenGate(layout.hidden_size, device=w.device)
            gate.where = f"layer {layer.index} ({layer.name}).{sub or 'mlp'}"
            module.add_module(_GATE_ATTR, gate)
        entry = layer.module.get_submodule(layer.mlp_linears[0]) if not sub else module
        pre_hook = _gate_pre_hook if sub else _entry_gate_pre_hook
        if not sub:
            entry.__dict__[_ENTRY_GATE_KEY] = gate
        if not has_hook(entry._forward_pre_hooks, pre_hook):
            entry.register_forward_pre_hook(pre_hook, with_kwargs=True)
        if not has_hook(module._forward_hooks, _gate_post_hook):
            module.register_forward_hook(_gate_post_hook)
        if sub:
            for source in _GATE_SOURCES:
                source(module, gate)
        return gate

    def optim_options(self, param_name: str, spec: PolicySpec) -> dict[str, float | None]:
        """Gate ``w``/``b``: ``gate_lr_scale``, no decay; ``lora_a``/``lora_b``: lr_scale, decay."""
        opts = _options(spec)
        if _GATE_ATTR in param_name.split("."):
            return {"lr_scale": opts.gate_lr_scale, "weight_decay": 0.0}
        return {"lr_scale": opts.lr_scale, "weight_decay": opts.weight_decay}
