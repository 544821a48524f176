"""Fixtures shared by the distributed tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def tp1():
    """megatron-core on the CPU with TP=1, PP=1 in this process (torn down afterwards)."""
    from tests.helpers.megatron import megatron_parallel

    with megatron_parallel(tp=1, pp=1):
        yield
