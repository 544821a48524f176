"""The ``Policy`` Protocol: what every per-layer training policy provides (no base class)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from layerfreeze.models import LayerInfo, ModelLayout


@dataclass(frozen=True)
class PolicySpec:
    """A policy name plus its validated options (an instance of the policy's ``config_cls``)."""

    name: str
    options: Any

    def describe(self) -> str:
        """Compact form as used in plan strings, e.g. ``lora(r=16,target=mlp,gated)``."""
        from layerfreeze.utils.schema import to_dict

        opts = to_dict(self.options) if self.options is not None else {}
        parts = []
        for k, v in opts.items():
            if isinstance(v, bool):
                if v:
                    parts.append(k)
            elif v is not None:
                parts.append(f"{k}={v}")
        return f"{self.name}({','.join(parts)})" if parts else self.name


@runtime_checkable
class Policy(Protocol):
    """A per-layer training policy.

    Attributes:
        name: lowercase registry key used as-is in YAML (``freeze``, ``full``, ``lora``, ``prefix``).
        config_cls: dataclass holding the policy's options (validated strictly).
        param_prefix: unique prefix of every parameter the policy creates (``lora_``,
            ``prefix_``); empty for policies that create none.
    """

    name: str
    config_cls: type
    param_prefix: str

    def check(self, layer: LayerInfo, spec: PolicySpec, layout: ModelLayout) -> list[str]:
        """Problems that stop ``spec`` from applying to ``layer`` (empty when it can)."""
        ...

    def apply(self, layer: LayerInfo, spec: PolicySpec, layout: ModelLayout) -> set[str]:
        """Install what the policy needs on ``layer`` (idempotent) and return the names,
        relative to ``layer.module``, of the parameters it makes trainable."""
        ...

    def optim_options(self, param_name: str, spec: PolicySpec) -> dict[str, float | None]:
        """Optimizer options for one trainable parameter: ``{"lr_scale": float,
        "weight_decay": float | None}`` (None = the run's default weight decay)."""
        ...
