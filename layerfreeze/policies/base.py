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
        """Compact form as used in plan strings, e.g. ``lora(r=16,target=mlp,gated)``.

        Only options that differ from the config's defaults are shown; a true bool is a bare
        flag, a false one ``key=false``. ``LayerPlan.parse`` reads the form back exactly.
        """
        import dataclasses

        from layerfreeze.utils.schema import to_dict

        if self.options is None:
            return self.name
        defaults = {}
        for f in dataclasses.fields(self.options):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                defaults[f.name] = f.default_factory()  # type: ignore[misc]
        parts = []
        for k, v in to_dict(self.options).items():
            if k in defaults and to_dict(defaults[k]) == v:
                continue
            parts.append(k if v is True else f"{k}={format_option_value(v)}")
        return f"{self.name}({','.join(parts)})" if parts else self.name


def format_option_value(value: Any) -> str:
    """Render one option value so that a YAML flow scalar parse gives it back."""
    import json

    import yaml

    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_option_value(v) for v in value) + "]"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    try:
        same = yaml.safe_load(text) == text and not any(c in text for c in ",()[]=:")
    except yaml.YAMLError:
        same = False
    return text if same else json.dumps(text)


@runtime_checkable
class Policy(Protocol):
    """A per-layer training policy.

    Attributes:
        name: lowercase registry key used as-is in YAML (``freeze``, ``full``, ``lora``, ``prefix``).
        config_cls: dataclass holding the policy's options (validated strictly).
        param_prefix: unique prefix of every parameter the policy creates (``lora_``,
            ``prefix_``); empty for policies that create none.

    Optional: ``merge(layer, spec, layout) -> list[str]`` / ``unmerge(...)`` to fold an adapter
    into the base weights. Without them ``AppliedPlan.merge`` merges every adapter child module
    (a child whose name starts with ``param_prefix``) that has ``mergeable``, ``merged``,
    ``merge(base)`` and ``unmerge(base)`` into its parent module.
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
