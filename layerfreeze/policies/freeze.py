"""The ``freeze`` policy: the layer's parameters do not train (gradients may still pass through)."""

from __future__ import annotations

from dataclasses import dataclass

from layerfreeze.models import LayerInfo, ModelLayout
from layerfreeze.policies.base import PolicySpec
from layerfreeze.registry import register_policy


@dataclass(frozen=True)
class FreezeConfig:
    """``freeze`` takes no options."""


@register_policy("freeze")
class FreezePolicy:
    """Keep every parameter of the layer frozen; installs nothing."""

    config_cls = FreezeConfig
    param_prefix = ""

    def check(self, layer: LayerInfo, spec: PolicySpec, layout: ModelLayout) -> list[str]:
        """Any layer can be frozen."""
        return []

    def apply(self, layer: LayerInfo, spec: PolicySpec, layout: ModelLayout) -> set[str]:
        """Nothing to install; nothing trains."""
        return set()

    def optim_options(self, param_name: str, spec: PolicySpec) -> dict[str, float | None]:
        """Unused (a frozen layer has no trainable parameters)."""
        return {"lr_scale": 1.0, "weight_decay": None}
