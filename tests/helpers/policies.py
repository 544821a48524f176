"""Install one policy on chosen layers directly through the registry (policy-level tests)."""

from __future__ import annotations

from layerfreeze.models import discover_layout
from layerfreeze.policies.base import PolicySpec
from layerfreeze.registry import get_policy


def install(model, spec: PolicySpec, layers=None) -> list[str]:
    """Apply ``spec`` to ``layers`` (all by default); only the returned names train."""
    policy = get_policy(spec.name)
    layout = discover_layout(model)
    names = []
    for layer in layout.layers:
        if layers is not None and layer.index not in layers:
            continue
        assert policy.check(layer, spec, layout) == []
        names += [f"{layer.name}.{n}" for n in policy.apply(layer, spec, layout)]
    wanted = set(names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in wanted)
    return sorted(names)
