"""DeepSpeed engine package: the only place in layerfreeze that imports ``deepspeed``.

Re-exports the public names of the adapter (see :mod:`layerfreeze.engines.deepspeed.runner`).
"""

from __future__ import annotations

from layerfreeze.engines.deepspeed.runner import *  # noqa: F403
from layerfreeze.engines.deepspeed.runner import __all__  # noqa: F401
