"""Engine-neutral helpers. ``layerfreeze.engines.partition`` on plain parameters (no engine):
nothing is partitioned, the whole is what the tensor holds, gathering is a no-op and imports no
engine (the ZeRO-3 side runs in tests/distributed/test_engine_conformance.py, real DeepSpeed,
2 ranks). ``layerfreeze.engines.common.unwrap_module``: the one wrapper-peeling helper."""

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


class _Wrapper(nn.Module):
    """A training wrapper as DDP / Float16Module are: the wrapped module in ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


class _Gpt(nn.Module):
    """Stands for Megatron's GPTModel: has a ``.decoder`` (and here, a ``.module`` too)."""

    def __init__(self):
        super().__init__()
        self.decoder = nn.Linear(2, 2)
        self.module = nn.Linear(2, 2)


def test_unwrap_module_peels_every_wrapper_and_stops_where_asked():
    from layerfreeze.engines.common import unwrap_module

    inner = nn.Linear(2, 2)
    assert unwrap_module(inner) is inner
    assert unwrap_module(_Wrapper(_Wrapper(inner))) is inner
    gpt = _Gpt()
    assert unwrap_module(_Wrapper(gpt), stop_at="decoder") is gpt  # Megatron: stop at GPTModel
    assert unwrap_module(_Wrapper(gpt)) is gpt.module  # no stop: follow every .module
    obj = type("Callable", (), {"module": "not a module"})()
    assert unwrap_module(obj) is obj  # a .module that is no nn.Module is not followed


def test_torch_ddp_is_unwrapped(tmp_path):
    import torch.distributed as dist

    from layerfreeze.engines.common import unwrap_module

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        inner = nn.Linear(2, 2)
        assert unwrap_module(nn.parallel.DistributedDataParallel(inner)) is inner
    finally:
        dist.destroy_process_group()
