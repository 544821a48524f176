"""The ``full`` policy: every base parameter of the layer trains, with its own lr scale / decay."""

from __future__ import annotations

from dataclasses import dataclass

from layerfreeze.errors import ConfigError
from layerfreeze.models import LayerInfo, ModelLayout
from layerfreeze.policies.base import PolicySpec
from layerfreeze.registry import POLICIES, register_policy


@dataclass(frozen=True)
class FullConfig:
    """Options of ``full``."""

    lr_scale: float = 1.0
    """Multiplier on the run's learning rate for this layer's parameters."""
    weight_decay: float | None = None
    """Weight decay for this layer's matrices (None: the run's default). Norms/biases get none."""

    def __post_init__(self):
        problems = []
        if not self.lr_scale > 0:
            problems.append(f"lr_scale: must be > 0, got {self.lr_scale}. Use e.g. lr_scale=0.1.")
        if self.weight_decay is not None and self.weight_decay < 0:
            problems.append(f"weight_decay: must be >= 0, got {self.weight_decay}.")
        if problems:
            raise ConfigError(problems)


def is_adapter_param(name: str) -> bool:
    """True when a dotted parameter name contains a component owned by an adapter policy."""
    prefixes = [p.param_prefix for p in POLICIES.values() if p.param_prefix]
    return any(part.startswith(pre) for part in name.split(".") for pre in prefixes)


@register_policy("full")
class FullPolicy:
    """Train all of the layer's own (base) parameters; adapters installed by other plans stay out."""

    config_cls = FullConfig
    param_prefix = ""

    def check(self, layer: LayerInfo, spec: PolicySpec, layout: ModelLayout) -> list[str]:
        """Any layer can be trained in full."""
        return []

    def apply(self, layer: LayerInfo, spec: PolicySpec, layout: ModelLayout) -> set[str]:
        """Nothing to install; every non-adapter parameter of the block trains."""
        return {n for n, _ in layer.module.named_parameters() if not is_adapter_param(n)}

    def optim_options(self, param_name: str, spec: PolicySpec) -> dict[str, float | None]:
        """The configured lr scale and weight decay."""
        opts = spec.options if spec.options is not None else FullConfig()
        return {"lr_scale": opts.lr_scale, "weight_decay": opts.weight_decay}
