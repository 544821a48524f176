"""Built-in policies (``freeze``, ``full``, ``lora``, ``prefix``), one module each.

Importing a policy module registers it. :func:`load_builtin_policies` imports them all; the
registry calls it on first use, so ``import layerfreeze.policies.base`` (and thus
``layerfreeze.plan``) stays free of torch until a policy is actually needed.
"""

from __future__ import annotations

import importlib

BUILTIN_POLICY_MODULES: tuple[str, ...] = (
    "layerfreeze.policies.freeze",
    "layerfreeze.policies.full",
    "layerfreeze.policies.lora",
    "layerfreeze.policies.prefix",
    "layerfreeze.policies.new_rows",
)


def load_builtin_policies() -> None:
    """Import (and so register) every built-in policy; a no-op after the first call."""
    for module in BUILTIN_POLICY_MODULES:
        importlib.import_module(module)
