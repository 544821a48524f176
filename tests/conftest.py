"""Shared fixtures: paths to the real evaluation data beside the checkout, CPU-only settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]

# Child processes (launchers, CLIs, distributed workers) import this checkout's layerfreeze, not
# whichever checkout the editable install last pointed at.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO_ROOT), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
)


def shared_data_dir() -> Path:
    """``../shared/data`` beside the checkout, or ``$LAYERFREEZE_EVAL_DATA`` when set."""
    env = os.environ.get("LAYERFREEZE_EVAL_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def eval_data_dir() -> Path:
    path = shared_data_dir()
    if not (path / "ceval").is_dir() or not (path / "cmmlu").is_dir():
        pytest.fail(
            f"evaluation data not found at {path}: expected ceval/ and cmmlu/ there "
            "(set LAYERFREEZE_EVAL_DATA to the folder holding them)."
        )
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _restore_distributed_env():
    """A test that starts a one-process world in-process (``init_distributed``) sets RANK,
    MASTER_PORT, ...; later tests' child processes must not inherit that rendezvous."""
    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def megatron_tp1():
    """megatron-core's model-parallel state at TP=1, PP=1 in this process, on the CPU shim
    (:func:`tests.helpers.megatron.megatron_parallel`), torn down afterwards."""
    from tests.helpers.megatron import megatron_parallel

    with megatron_parallel(tp=1, pp=1):
        yield
