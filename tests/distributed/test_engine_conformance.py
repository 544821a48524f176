"""Both engines through the same Protocol checks (issue #15, "one seam, two symmetric engines").

For each engine, on 2 gloo ranks (DeepSpeed at ZeRO-3, so parameters really are partitioned;
Megatron at pipeline parallel 2 under the CPU shim of tests/helpers/megatron.py, so each rank
holds half of the layers):

* ``get_engine(name)`` satisfies :class:`~layerfreeze.engines.base.EngineModule`;
* the runner ``runner_from_run_config`` builds from a tiny run config satisfies
  :class:`~layerfreeze.engines.base.EngineAdapter` (``isinstance``, runtime-checkable);
* ``iter_layers`` yields global indices: over all ranks exactly ``0..N-1``, each rank ascending;
* ``capabilities`` is the frozen :class:`~layerfreeze.engines.base.EngineCapabilities`;
* inside ``gathered_parameters`` every parameter is whole (shape = its full shape, the engine-
  neutral :mod:`layerfreeze.engines.partition` answer); the sensitivity hooks compute on every
  layer; ``export_trainable`` works exactly when ``capabilities.export_adapter`` says so;
* save / load round-trip through the Protocol: after a save at step 1 and a second step, loading
  brings back the step-1 weights (``consolidated_state_dict``) and the step counter.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.slow

LAYERS = 4
ARCH = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 64, "tie_word_embeddings": False,
}
VOCAB = 320


def _run_config(engine: str, tmp: str):
    import yaml

    from layerfreeze.config import load_config

    cfg = {
        "engine": engine,
        "model": {"architecture": dict(ARCH), "attn_implementation": "sdpa"},
        "tokenizer": {"vocab_size": VOCAB},
        "data": {"paths": ["@bundled"], "seq_len": 8, "cache_dir": f"{tmp}/cache"},
        "plan": {"spec": "freeze_deep"},
        "optim": {"lr": 1e-2, "warmup_steps": 0},
        "train": {"steps": 4, "micro_batch_size": 2, "grad_accum_steps": 1, "seed": 5},
        "logging": {"out_dir": f"{tmp}/run", "wandb_project": None, "progress": "none"},
        "eval": {"every_steps": 0, "at_end": False},
    }
    if engine == "deepspeed":
        cfg["deepspeed"] = {
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "optimizer": {"type": "AdamW", "params": {"torch_adam": True}},
            "steps_per_print": 1000000,
        }
    else:
        cfg["megatron"] = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 2}
    path = f"{tmp}/run_{engine}.yaml"
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f)
    return load_config(path)


def _window(step: int) -> list[dict]:
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (2, 8), generator=g)
    return [{"input_ids": ids, "labels": ids.clone()}]


def _body(rank: int, world: int, engine: str, tmp: str) -> dict:
    import dataclasses

    import torch.distributed as dist

    from layerfreeze.diagnostics.hooks import HOOK_MEASURES
    from layerfreeze.engines import get_engine
    from layerfreeze.engines.base import EngineAdapter, EngineCapabilities, EngineModule
    from layerfreeze.engines.partition import full_shape, gathered, is_partitioned
    from layerfreeze.train import build_schedule

    shim = contextlib.nullcontext()
    if engine == "megatron":
        from tests.helpers.megatron import megatron_cpu_shim

        shim = megatron_cpu_shim()
    with shim:
        module = get_engine(engine)
        assert isinstance(module, EngineModule), engine
        cfg = _run_config(engine, tmp)
        assert isinstance(module.check_run_config(cfg, world), list)
        assert all(isinstance(line, str) for line in module.describe_run_config(cfg))
        module.init_distributed()
        torch.manual_seed(5)
        runner = module.runner_from_run_config(cfg, schedule=build_schedule(cfg), vocab_size=VOCAB)
        try:
            assert isinstance(runner, EngineAdapter), type(runner).__name__
            caps = runner.capabilities
            assert isinstance(caps, EngineCapabilities)
            assert dataclasses.is_dataclass(caps) and type(caps).__dataclass_params__.frozen
            assert caps.sensitivity_measures <= set(HOOK_MEASURES)

            mine = [i for i, _ in runner.iter_layers()]
            assert mine == sorted(set(mine)), mine
            every: list = [None] * world
            dist.all_gather_object(every, mine)

            with runner.gathered_parameters():
                shapes = [(n, tuple(p.shape), tuple(full_shape(p)))
                          for n, p in runner.model.named_parameters()]
            assert shapes and all(s == f for _, s, f in shapes), shapes
            with gathered(list(runner.model.parameters())):  # the engine-neutral helper agrees
                assert all(tuple(p.shape) == tuple(full_shape(p))
                           for p in runner.model.parameters())
            result_partitioned = any(is_partitioned(p) for p in runner.model.parameters())

            probe = _window(99)[0]["input_ids"]
            hooks = runner.sensitivity_hooks(probe, sorted(caps.sensitivity_measures - {"grad_norm"}))
            gather = runner.gathered_parameters if caps.partitioned_params else None
            stats = hooks.compute(runner.model, 0, gather=gather)
            assert isinstance(stats, dict) and stats

            runner.train_step(_window(1))
            saved = runner.save_checkpoint(f"{tmp}/ckpt_{engine}", step=1)
            at_save = runner.consolidated_state_dict()
            runner.train_step(_window(2))
            moved = runner.consolidated_state_dict()
            runner.load_checkpoint(f"{tmp}/ckpt_{engine}")
            loaded = runner.consolidated_state_dict()
            result = {"layers": every, "step": runner.global_step, "saved": str(saved),
                      "partitioned": result_partitioned}
            if rank == 0:
                assert set(at_save) == set(loaded)
                result["moved"] = any(not torch.equal(at_save[k], moved[k]) for k in at_save)
                result["restored"] = all(torch.equal(at_save[k], loaded[k]) for k in at_save)

            if caps.export_adapter:
                out = runner.export_trainable(f"{tmp}/adapter_{engine}")
                result["adapter"] = out is not None and out.is_dir() if rank == 0 else None
            else:
                with pytest.raises(NotImplementedError):
                    runner.export_trainable(f"{tmp}/adapter_{engine}")
            result["caps"] = caps
            return result
        finally:
            runner.close()


@pytest.mark.parametrize("engine", ["deepspeed", "megatron"])
def test_engine_satisfies_the_protocols(engine, tmp_path):
    results = run_distributed(_body, world_size=2, args=(engine, str(tmp_path)))
    for r in results:  # every rank saw every rank's layers: together exactly 0..N-1
        assert sorted(set().union(*map(set, r["layers"]))) == list(range(LAYERS))
        assert r["step"] == 1
    if engine == "megatron":  # pipeline parallel 2: each stage holds its half
        assert results[0]["layers"] == [[0, 1], [2, 3]]
        assert results[0]["caps"].model_parallel_params and not results[0]["caps"].export_adapter
    else:  # data parallel: every rank holds every layer; ZeRO-3 partitions the parameters
        assert results[0]["layers"] == [[0, 1, 2, 3], [0, 1, 2, 3]]
        assert results[0]["caps"].partitioned_params and results[0]["adapter"]
    # capabilities.partitioned_params says what the engine-neutral helper sees
    assert all(r["partitioned"] == r["caps"].partitioned_params for r in results)
    assert results[0]["moved"] and results[0]["restored"]
