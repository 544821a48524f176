"""Fixtures of the CUDA-only tests (skipped without a GPU)."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="module")
def megatron_cuda():
    """megatron-core on one GPU: NCCL, TP=1, PP=1, in this process (torn down afterwards)."""
    pytest.importorskip("megatron.core")
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from tests.helpers.dist import find_free_port

    torch.cuda.set_device(0)
    own = not dist.is_initialized()
    if own:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(find_free_port())
        dist.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)
    yield
    parallel_state.destroy_model_parallel()
    if own:
        dist.destroy_process_group()
