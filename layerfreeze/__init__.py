"""layerfreeze: per-layer training plans for continued pre-training (public API only).

Names are imported lazily (PEP 562), so ``import layerfreeze.config`` stays torch-free; the
built-in policies register when :mod:`layerfreeze.registry` is first used::

    from layerfreeze import LayerPlan, apply_plan
    applied = apply_plan(model, LayerPlan.from_preset("hlpt", r=8))
    print(applied.summary().table())
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "ConfigError": "layerfreeze.errors",
    "LayerPlan": "layerfreeze.plan",
    "ResolvedPlan": "layerfreeze.plan",
    "PRESETS": "layerfreeze.plan",
    "PlanSchedule": "layerfreeze.schedule",
    "PolicySpec": "layerfreeze.policies.base",
    "Policy": "layerfreeze.policies.base",
    "POLICIES": "layerfreeze.registry",
    "register_policy": "layerfreeze.registry",
    "get_policy": "layerfreeze.registry",
    "discover_layout": "layerfreeze.models",
    "ModelLayout": "layerfreeze.models",
    "LayerInfo": "layerfreeze.models",
    "apply_plan": "layerfreeze.apply",
    "AppliedPlan": "layerfreeze.apply",
    "PlanSummary": "layerfreeze.apply",
    "enable_gradient_checkpointing": "layerfreeze.apply",
    "save_trainable": "layerfreeze.export",
    "load_trainable": "layerfreeze.export",
    "export_merged": "layerfreeze.export",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from layerfreeze.apply import AppliedPlan, PlanSummary, apply_plan, enable_gradient_checkpointing
    from layerfreeze.errors import ConfigError
    from layerfreeze.export import export_merged, load_trainable, save_trainable
    from layerfreeze.models import LayerInfo, ModelLayout, discover_layout
    from layerfreeze.plan import PRESETS, LayerPlan, ResolvedPlan
    from layerfreeze.policies.base import Policy, PolicySpec
    from layerfreeze.registry import POLICIES, get_policy, register_policy
    from layerfreeze.schedule import PlanSchedule


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'layerfreeze' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
