"""layerfreeze.engines.partition on plain parameters (no engine): nothing is partitioned, the
whole is what the tensor holds, gathering is a no-op and imports no engine. The ZeRO-3 side runs
in tests/distributed/test_engine_conformance.py (real DeepSpeed, 2 ranks)."""

from __future__ import annotations

import subprocess
import sys

import torch
from torch import nn


def test_plain_parameters_are_whole():
    from layerfreeze.engines.partition import (
        full_shape,
        gathered,
        is_partition_managed,
        is_partitioned,
        local_numel,
        whole_numel,
    )

    lin = nn.Linear(3, 5)
    w = lin.weight
    assert not is_partitioned(w) and not is_partition_managed(w)
    assert whole_numel(w) == local_numel(w) == 15
    assert full_shape(w) == torch.Size([5, 3])
    with gathered(lin.parameters()):
        assert w.shape == (5, 3)


def test_importing_it_imports_no_engine():
    code = ("import sys, layerfreeze.engines.partition as p\n"
            "from torch import nn\n"
            "with p.gathered(nn.Linear(2, 2).parameters()): pass\n"
            "print(sorted(m for m in ('deepspeed', 'megatron') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
