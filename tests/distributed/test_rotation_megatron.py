"""Rotating-layer (LISA / BAdam) schedules on the Megatron runner (real megatron-core on CPU,
gloo, 2 ranks at TP=2, the test shim of tests/helpers/megatron.py).

Over each interval exactly the interval's layers (from ``interval_layers``) plus the
always-trained parts change in the gathered model; everything else stays bit-identical. With
``optimizer_state: reset`` a parameter trainable on both sides of a boundary restarts its Adam
step; with ``carry`` it continues it.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.slow

LAYERS = 4
INTERVAL = 1
INTERVALS = 3


def _window(step: int) -> list[dict]:
    from tests.helpers.megatron import tiny_tokens

    out = []
    for j in range(2):
        ids = tiny_tokens(batch=2, seq=8, seed=100 * step + j)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def _body(rank: int, world: int, specs: list[dict]) -> list[dict] | None:
    from layerfreeze.engines.megatron.runner import MegatronRunner
    from layerfreeze.rotation import RotationConfig, build_rotation_schedule
    from tests.helpers.megatron import build_tiny_gpt, init_model_parallel, megatron_cpu_shim

    out = []
    with megatron_cpu_shim():
        for spec in specs:
            init_model_parallel(tp=2, pp=1)
            model = build_tiny_gpt(num_layers=LAYERS, tp=2, seed=3)
            schedule = build_rotation_schedule(RotationConfig.parse(spec), LAYERS,
                                               INTERVAL * INTERVALS)
            runner = MegatronRunner(model, schedule=schedule, lr=1e-2, weight_decay=0.0,
                                    gradient_accumulation_steps=2)
            params = dict(runner.model.named_parameters())
            changed, head_steps = [], []
            for j in range(INTERVALS):
                before = runner.consolidated_state_dict()
                for s in range(j * INTERVAL, (j + 1) * INTERVAL):
                    runner.train_step(_window(s))
                after = runner.consolidated_state_dict()
                if rank == 0:
                    changed.append(sorted(k for k in after if not torch.equal(after[k], before[k])))
                head = [n for n in params if n.startswith("output_layer.")][0]
                head_steps.append(int(runner._full_state(params[head])["step"]))
            out.append({"changed": changed, "head_steps": head_steps,
                        "names": sorted(after) if rank == 0 else None})
            runner.close()
    return out


def _expected(names: list[str], layers: tuple[int, ...], always: tuple[str, ...]) -> list[str]:
    """Global keys (``layers.<i>.``, ``embeddings.``, ``final_norm.``, ``lm_head.``) that train."""
    prefixes = [f"layers.{i}." for i in layers] + [f"{p}." for p in always]
    return sorted(n for n in names if n.startswith(tuple(prefixes)))


def test_changed_layers_are_exactly_the_rotation_megatron():
    from layerfreeze.rotation import RotationConfig, interval_layers

    specs = [
        {"rotate": "lisa", "layers": 1, "interval": INTERVAL, "seed": 3},
        {"rotate": "badam", "block": 2, "interval": INTERVAL, "always": ["lm_head"],
         "optimizer_state": "reset"},
    ]
    res = run_distributed(_body, world_size=2, args=(specs,), timeout=1500)[0]
    for spec, r in zip(specs, res, strict=True):
        cfg = RotationConfig.parse(spec)
        for j in range(INTERVALS):
            want = _expected(r["names"], interval_layers(cfg, j, LAYERS), cfg.always)
            assert want and r["changed"][j] == want, (spec["rotate"], j, r["changed"][j])
    # the head trains every interval: carry continues its Adam step, reset restarts it
    assert res[0]["head_steps"] == [1, 2, 3]
    assert res[1]["head_steps"] == [1, 1, 1]
