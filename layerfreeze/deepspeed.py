"""Public DeepSpeed entry points: ``layerfreeze.deepspeed.initialize`` and friends.

A thin alias of :mod:`layerfreeze.engines.deepspeed` (resolved on first attribute access, so
importing this module does not import DeepSpeed)::

    import layerfreeze.deepspeed as lfds
    engine, optimizer, _, scheduler = lfds.initialize(model=model, plan="freeze_deep", config="ds.json")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and linters only: importing the adapter imports DeepSpeed
    from layerfreeze.engines.deepspeed import (  # noqa: F401
        DeepSpeedRunner,
        ScaledLRScheduler,
        StepOutput,
        build_param_groups,
        init_distributed,
        initialize,
        load_config,
        optimizer_state_numel,
    )

__all__ = [
    "DeepSpeedRunner",
    "ScaledLRScheduler",
    "StepOutput",
    "build_param_groups",
    "init_distributed",
    "initialize",
    "load_config",
    "optimizer_state_numel",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from layerfreeze.engines import get_engine

        return getattr(get_engine("deepspeed"), name)
    raise AttributeError(f"module 'layerfreeze.deepspeed' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
