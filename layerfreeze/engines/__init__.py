"""Engine adapters, imported lazily: ``get_engine("deepspeed")`` imports DeepSpeed only when asked.

Only the adapter modules here import their engine (``deepspeed``, later ``megatron.core``), so
the engine-neutral core and the CLI start without them installed.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["ENGINES", "get_engine"]

#: engine name -> adapter module
ENGINES: dict[str, str] = {
    "deepspeed": "layerfreeze.engines.deepspeed",
    "megatron": "layerfreeze.engines.megatron.recipe",
}


def get_engine(name: str) -> ModuleType:
    """Import and return the adapter module of engine ``name``.

    Raises:
        ValueError: unknown engine name (the message lists the known ones).
        ImportError: the engine's package is not installed (with the pip command to fix it).
    """
    if name not in ENGINES:
        raise ValueError(
            f"engine: unknown engine {name!r}. Known engines: {', '.join(sorted(ENGINES))}."
        )
    try:
        return importlib.import_module(ENGINES[name])
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == name:
            raise ImportError(
                f"engine {name!r}: the {name} package is not installed. Install it with "
                f"`pip install 'layerfreeze[{name}]'`."
            ) from e
        raise
