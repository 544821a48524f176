"""``layerfreeze`` CLI with the megatron-core CPU shim applied (tests only; see megatron.py).

megatron-core needs a few CUDA-only spots redirected to run on CPU; the library never patches
megatron, so the end-to-end tests launch the real CLI through this entry point::

    torchrun --standalone --nproc_per_node 2 -m tests.helpers.megatron_train_entry train --config C

(as a module from the repository root: run as a script, ``tests/helpers/megatron.py`` would
shadow the ``megatron`` package).
"""

from __future__ import annotations

import sys

from layerfreeze.cli import main
from tests.helpers.megatron import megatron_cpu_shim

if __name__ == "__main__":
    with megatron_cpu_shim():
        code = main()
    sys.exit(code)
