"""LoRA on transformers' fused MoE experts (``@use_experts_implementation`` modules: Mixtral,
Qwen2-MoE, DeepSeek-V3, ... in transformers 5), whose expert weights are 3-D tensors.

One dispatcher of :data:`layerfreeze.policies.lora.LORA_DISPATCHERS` (first in the built-in
list): :func:`is_fused_experts` matches, :func:`build_experts` builds an
:class:`ExpertsLoRAAdapter` and points the module's experts implementation at a wrapper. The
arithmetic is :mod:`layerfreeze.policies.lora_math`'s, batched over the expert dimension.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from layerfreeze.policies.gate import TokenGate
from layerfreeze.policies.lora_math import (
    add_low_rank,
    delta_weight,
    merge_delta,
    scale_low_rank,
    unmerge_delta,
    weight_shape,
)

__all__ = [
    "ADAPTER_ATTR",
    "EXPERTS_WRAPPER_PREFIX",
    "ExpertsLoRAAdapter",
    "is_fused_experts",
    "experts_check",
    "build_experts",
]

#: Child name of a LoRA adapter on its base module (``layerfreeze.policies.lora`` installs
#: every adapter under it; the experts wrapper finds the adapter there).
ADAPTER_ATTR = "lora_adapter"

#: Name prefix of the wrapper experts implementations registered for adapted experts modules.
EXPERTS_WRAPPER_PREFIX = "layerfreeze_lora:"
_EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")


def _expert_weights(module: nn.Module) -> list[str]:
    return [
        n for n in _EXPERT_WEIGHTS
        if isinstance(module._parameters.get(n), torch.Tensor)
        and len(weight_shape(module._parameters[n])) == 3
    ]


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers ``@use_experts_implementation`` experts module: 3-D expert weights and a
    forward that dispatches through ``ALL_EXPERTS_FUNCTIONS`` on ``config._experts_implementation``."""
    return (
        getattr(type(module).forward, "__wrapped__", None) is not None
        and hasattr(module, "is_transposed")
        and hasattr(module, "config")
        and hasattr(module.config, "_experts_implementation")
        and bool(_expert_weights(module))
    )


def experts_check(module: nn.Module) -> str | None:
    if getattr(module, "_is_expert_parallel", False):
        return "expert-parallel experts are not supported (their weights are sharded by expert)"
    return None


class _ExpertsView:
    """``module`` seen with some weights replaced, for one call of an experts implementation."""

    __slots__ = ("_module", "_weights")

    def __init__(self, module: nn.Module, weights: dict[str, torch.Tensor]):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_weights", weights)

    def __getattr__(self, name: str):
        weights = object.__getattribute__(self, "_weights")
        if name in weights:
            return weights[name]
        return getattr(object.__getattribute__(self, "_module"), name)


class _ExpertWeightLoRA(nn.Module):
    """Per-expert update ``(alpha / r) B_e A_e`` of one fused expert weight."""

    def __init__(self, experts: int, fan_in: int, fan_out: int, r: int, scaling: float,
                 transposed: bool, device=None, dtype=None):
        super().__init__()
        self.scaling, self.transposed = scaling, transposed
        self.lora_a = nn.Parameter(torch.empty(experts, r, fan_in, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(experts, fan_out, r, device=device, dtype=dtype))
        with torch.no_grad():
            for e in range(experts):  # each expert as one (r, in) LoRA A: fan_in = in
                nn.init.kaiming_uniform_(self.lora_a[e], a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        """``(alpha / r) B A`` per expert, laid out like the fused weight."""
        return delta_weight(  # (E, out, in), differentiable: used in the forward
            self.lora_a, self.lora_b, self.scaling, transposed=self.transposed, fp32=False
        )


class ExpertsLoRAAdapter(nn.Module):
    """LoRA on every fused expert weight of an MoE experts module (``gate_up_proj`` /
    ``up_proj``, ``down_proj``): expert ``e`` computes with ``W_e + (alpha / r) B_e A_e``.

    Installing the adapter points ``config._experts_implementation`` at a wrapper
    ``layerfreeze_lora:<original>`` (not serialised by ``save_pretrained``) that delegates
    untouched for modules without an adapter. Ungated, the experts' own implementation
    (``eager``, ``grouped_mm``, ...) runs on the updated weights: a weight-space update (as
    PEFT's ``target_parameters``) costing one ``(experts, out, in)`` temporary per weight and
    forward, exact at init (``B = 0``: ``W + 0`` is ``W``). Gated (HLPT), the update is per token,
    so it cannot live in the weights: the adapted layer then runs transformers' eager expert
    loop with ``g_t * (alpha / r) * (x A_e^T) B_e^T`` added after each projection (exactly the
    base model at init when the original implementation is ``eager``; within float rounding of
    ``grouped_mm`` / ``batched_mm``, which order their sums differently). Input dropout is
    refused for experts.

    Args:
        base: the experts module.
        r: rank.
        alpha: scale numerator (update scale ``alpha / r``).
        gate: the MLP sub-block's :class:`TokenGate` when gated, else None.
    """

    runs_inside_base = True  # the update enters through the experts implementation, no hook

    def __init__(self, base: nn.Module, r: int, alpha: float, gate: TokenGate | None = None):
        super().__init__()
        self.__dict__["_gate"] = gate  # owned by the sub-block (see LoRAAdapter)
        self.r, self.alpha, self.scaling = r, float(alpha), float(alpha) / r
        self.transposed = bool(base.is_transposed)
        self.lora_dropout = nn.Identity()
        self.merged = False
        for name in _expert_weights(base):
            w = base._parameters[name]
            experts, d1, d2 = weight_shape(w)
            fan_in, fan_out = (d1, d2) if self.transposed else (d2, d1)
            self.add_module(name, _ExpertWeightLoRA(
                experts, fan_in, fan_out, r, self.scaling, self.transposed,
                device=w.device, dtype=w.dtype,
            ))

    @property
    def gate(self) -> TokenGate | None:
        """The sub-block's gate (None when ungated)."""
        return self.__dict__["_gate"]

    @property
    def mergeable(self) -> bool:
        """True when ungated (a per-token gate cannot be folded into the weights)."""
        return self.gate is None

    def weights(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """The adapted fused weights ``W + delta`` (differentiable in ``A`` and ``B``)."""
        out = {}
        for name, lora in self.named_children():
            if isinstance(lora, _ExpertWeightLoRA):
                w = getattr(base, name)
                out[name] = w + lora.delta().to(w.dtype)
        return out

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "ExpertsLoRAAdapter is applied inside the experts implementation, not as a hook."
        )

    def gated_forward(self, base: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                      top_k_weights: torch.Tensor) -> torch.Tensor:
        """transformers' eager expert loop with the gated low-rank update after each projection."""
        g = self.gate.current(hidden)  # (tokens, 1) fp32, also when the block flattened tokens
        num_experts = base.num_experts
        out = torch.zeros_like(hidden)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        first = "gate_up_proj" if base.has_gate else "up_proj"
        for e in hit:
            e = e[0]
            if e == num_experts:
                continue
            pos, token = torch.where(mask[e])
            gt = g[token]
            h = self._project(base, first, e, hidden[token], gt)
            h = base._apply_gate(h) if base.has_gate else base.act_fn(h)
            h = self._project(base, "down_proj", e, h, gt)
            if getattr(base, "has_post_expert_norm", False):
                h = base.post_expert_norm(h)
            h = h * top_k_weights[token, pos, None]
            out.index_add_(0, token, h.to(out.dtype))
        return out

    def _project(self, base: nn.Module, name: str, e: torch.Tensor, x: torch.Tensor,
                 g: torch.Tensor) -> torch.Tensor:
        w = getattr(base, name)[e]
        y = x @ w if self.transposed else F.linear(x, w)
        if getattr(base, "has_bias", False):
            y = y + getattr(base, f"{name}_bias")[e]
        lora = getattr(self, name)
        h = F.linear(x.to(lora.lora_a.dtype), lora.lora_a[e])
        h, scale = scale_low_rank(h, self.scaling, g)
        return add_low_rank(y, h, lora.lora_b[e], scale)

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        """Fold the update into the fused weights (idempotent).

        Raises:
            ValueError: the adapter is gated (input-dependent, cannot be folded exactly).
        """
        if not self.mergeable:
            raise ValueError(
                f"{self.gate.where}: a gated LoRA update of the experts depends on the input and "
                "cannot be merged into their weights; export keeps it in the sidecar instead."
            )
        if not self.merged:
            for name, lora in self.named_children():
                if isinstance(lora, _ExpertWeightLoRA):
                    merge_delta(getattr(base, name), lora.delta())
            self.merged = True

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        """Take a merged update back out (idempotent)."""
        if self.merged:
            for name, lora in self.named_children():
                if isinstance(lora, _ExpertWeightLoRA):
                    unmerge_delta(getattr(base, name), lora.delta())
            self.merged = False

    def extra_repr(self) -> str:
        names = [n for n, m in self.named_children() if isinstance(m, _ExpertWeightLoRA)]
        gated = self.gate is not None
        return f"experts weights={names}, r={self.r}, alpha={self.alpha}, gated={gated}"


def _wrapped_experts_implementation(base: str | None) -> str:
    """The wrapper experts implementation for ``base`` (registering it on first use)."""
    base = base or "eager"
    if base.startswith(EXPERTS_WRAPPER_PREFIX):
        return base
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    name = EXPERTS_WRAPPER_PREFIX + base
    if name not in ALL_EXPERTS_FUNCTIONS._global_mapping:
        ALL_EXPERTS_FUNCTIONS.register(name, _make_experts_wrapper(base))
    return name


def _make_experts_wrapper(base: str) -> Callable:
    def experts(module, *args, **kwargs):
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        original = type(module).forward.__wrapped__
        fn = original if base == "eager" else ALL_EXPERTS_FUNCTIONS.get_interface(base, original)
        adapter = module._modules.get(ADAPTER_ATTR)
        if adapter is None or adapter.merged:
            return fn(module, *args, **kwargs)
        if adapter.gate is not None:
            return adapter.gated_forward(module, *args, **kwargs)
        return fn(_ExpertsView(module, adapter.weights(module)), *args, **kwargs)

    experts.__name__ = f"layerfreeze_lora_{base}"
    return experts


def build_experts(base: nn.Module, *, r: int, alpha: float, dropout: float = 0.0,
                   gate: TokenGate | None = None) -> ExpertsLoRAAdapter:
    if dropout:
        raise ValueError("LoRA on fused experts takes no dropout")
    base.config._experts_implementation = _wrapped_experts_implementation(
        base.config._experts_implementation
    )
    return ExpertsLoRAAdapter(base, r, alpha, gate=gate)
