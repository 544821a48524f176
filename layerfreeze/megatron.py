"""Public Megatron-core entry points: ``layerfreeze.megatron.plan_model_provider`` and friends.

A thin alias of :mod:`layerfreeze.engines.megatron` (resolved on first attribute access, so
importing this module does not import megatron-core)::

    from layerfreeze.megatron import optimizer_overrides, plan_model_provider

    model_provider = plan_model_provider(model_provider, "freeze_deep")
    optimizer = get_megatron_optimizer(
        opt_config, model, config_overrides=optimizer_overrides(model, opt_config))

See ``docs/megatron.md`` for a ``pretrain_gpt.py``-style script and
``launch/megatron_example.py`` for a complete training loop on megatron-core's own pieces.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and linters only: the runner imports megatron-core
    from layerfreeze.engines.megatron.layout import megatron_layout  # noqa: F401
    from layerfreeze.engines.megatron.provider import (  # noqa: F401
        apply_megatron_plan,
        load_base_checkpoint,
        optimizer_overrides,
        plan_model_provider,
    )
    from layerfreeze.engines.megatron.runner import (  # noqa: F401
        MegatronRunner,
        optimizer_state_numel,
    )
    from layerfreeze.engines.megatron.vocab import mask_padded_vocab  # noqa: F401

__all__ = [
    "MegatronRunner",
    "apply_megatron_plan",
    "load_base_checkpoint",
    "mask_padded_vocab",
    "megatron_layout",
    "optimizer_overrides",
    "optimizer_state_numel",
    "plan_model_provider",
]

_WHERE = {
    "MegatronRunner": "layerfreeze.engines.megatron.runner",
    "optimizer_state_numel": "layerfreeze.engines.megatron.runner",
    "apply_megatron_plan": "layerfreeze.engines.megatron.provider",
    "load_base_checkpoint": "layerfreeze.engines.megatron.provider",
    "mask_padded_vocab": "layerfreeze.engines.megatron.vocab",
    "optimizer_overrides": "layerfreeze.engines.megatron.provider",
    "plan_model_provider": "layerfreeze.engines.megatron.provider",
    "megatron_layout": "layerfreeze.engines.megatron.layout",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        try:
            return getattr(importlib.import_module(_WHERE[name]), name)
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] == "megatron":
                raise ImportError(
                    "layerfreeze.megatron: megatron-core is not installed. Install it with "
                    "`pip install 'layerfreeze[megatron]'`."
                ) from e
            raise
    raise AttributeError(f"module 'layerfreeze.megatron' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
