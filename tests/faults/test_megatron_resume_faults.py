"""The Megatron runner's dist-checkpoint resume (``checkpoint.format: dist``) refuses what it cannot
do with one line naming the setting or file: the DeepSpeed engine, Megatron's distributed
optimizer (at config time, at runner construction, and when such a run resumes a dist
checkpoint), an unknown format, and a dist checkpoint whose optimizer-step file is damaged."""

from __future__ import annotations

import os

import pytest

from layerfreeze.config import load_config
from layerfreeze.errors import ConfigError
from tests.helpers.dist import run_distributed

BASE = ["model.architecture={model_type: llama}", "plan.spec=freeze_deep"]


def test_config_dist_format_needs_engine_megatron():
    with pytest.raises(ConfigError, match=r"checkpoint.format: dist .* got engine 'deepspeed'"):
        load_config(None, [*BASE, "checkpoint.format=dist"])


def test_config_dist_format_refuses_distributed_optimizer():
    with pytest.raises(ConfigError, match=r"does not support megatron.use_distributed_optimizer"):
        load_config(
            None,
            [
                *BASE,
                "engine=megatron",
                "checkpoint.format=dist",
                "megatron.use_distributed_optimizer=true",
            ],
        )


def test_config_unknown_format_lists_the_valid_ones():
    with pytest.raises(
        ConfigError, match=r"checkpoint.format: .*'safetensors', 'dist', got 'zarr'"
    ):
        load_config(None, [*BASE, "engine=megatron", "checkpoint.format=zarr"])


def _errors(fn) -> str | None:
    try:
        fn()
    except (ValueError, OSError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _body(rank, world_size, tmp):
    from layerfreeze.engines.megatron.runner import MegatronRunner
    from tests.helpers.megatron import build_tiny_gpt, init_model_parallel, megatron_cpu_shim

    def runner(**kw):
        init_model_parallel(tp=2)
        return MegatronRunner(build_tiny_gpt(tp=2, seed=3), plan="freeze_deep", lr=1e-3, **kw)

    out = {}
    with megatron_cpu_shim():
        out["do"] = _errors(
            lambda: runner(checkpoint_format="dist", use_distributed_optimizer=True)
        )
        out["bogus"] = _errors(lambda: runner(checkpoint_format="zarr"))
        ids = __import__("tests.helpers.megatron", fromlist=["tiny_tokens"]).tiny_tokens()
        r = runner(checkpoint_format="dist")
        r.train_step([{"input_ids": ids, "labels": ids}])
        path = r.save_checkpoint(tmp)
        r.close()
        r = runner(use_distributed_optimizer=True)
        out["resume_do"] = _errors(lambda: r.load_checkpoint(tmp))
        r.close()
        import torch.distributed as dist

        if rank == 0:
            steps = os.path.join(path, "optim_steps.json")
            size = os.path.getsize(steps)
            with open(steps, "w") as f:
                f.write("{" * size)  # same size, not JSON (only the sha256 sees it)
        dist.barrier()
        r = runner(checkpoint_format="dist")
        out["no_steps"] = _errors(lambda: r.load_checkpoint(tmp, verify=False))
        out["no_steps_verified"] = _errors(lambda: r.load_checkpoint(tmp))
        r.close()
    return out


@pytest.mark.slow
def test_runner_refuses_what_dist_checkpoints_cannot_do(tmp_path):
    for r in run_distributed(_body, world_size=2, args=(str(tmp_path),), timeout=900):
        assert r["do"].startswith("ValueError: checkpoint.format: dist does not support ")
        assert "use_distributed_optimizer" in r["do"] and "\n" not in r["do"]
        assert r["bogus"] == (
            "ValueError: checkpoint.format: must be one of safetensors, dist, got 'zarr'."
        )
        assert "CheckpointError" in r["resume_do"] and "cannot resume this run" in r["resume_do"]
        assert "megatron.use_distributed_optimizer: true" in r["resume_do"]
        assert (
            "CheckpointError" in r["no_steps"] and "optim_steps.json: unreadable" in r["no_steps"]
        )
        assert "CheckpointError" in r["no_steps_verified"]  # the manifest's sha256 catches it
        assert "optim_steps.json" in r["no_steps_verified"] and "damaged" in r["no_steps_verified"]
