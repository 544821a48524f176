"""Fixtures shared by the distributed tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def tp1():
    """megatron-core on the CPU with TP=1, PP=1 in this process (torn down afterwards)."""
    from tests.helpers.megatron import (
        destroy_model_parallel,
        init_model_parallel,
        megatron_cpu_shim,
    )

    with megatron_cpu_shim():
        init_model_parallel(tp=1, pp=1)
        try:
            yield
        finally:
            destroy_model_parallel()
