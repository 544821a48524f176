"""tests/helpers/dist.py::run_distributed hands back tensor results intact."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.slow


def _many_tensors(rank, world_size):
    return {f"t{i}": torch.full((64,), float(rank * 1000 + i)) for i in range(300)}


def test_tensor_results_survive_the_ranks_exit():
    # Each tensor crosses by a shared-memory handle fetched from the rank while the parent
    # unpickles it; before the fix a rank that had exited gave FileNotFoundError here.
    results = run_distributed(_many_tensors, world_size=2)
    for rank, out in enumerate(results):
        assert len(out) == 300
        for i in range(300):
            assert torch.equal(out[f"t{i}"], torch.full((64,), float(rank * 1000 + i)))
