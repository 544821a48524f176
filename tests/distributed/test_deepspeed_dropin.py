"""``layerfreeze.deepspeed.initialize`` as a drop-in for ``deepspeed.initialize`` on 2 gloo ranks.

An unchanged DeepSpeed script (:mod:`tests.helpers.ds_user_script`) runs with
``deepspeed.initialize`` swapped for layerfreeze's (a plan bound with ``functools.partial``);
its losses must equal the plain-torch AdamW reference of ``test_deepspeed_engine`` (independent:
single process, the plan's groups, gradients averaged over the same ranks and micro-batches).
Also: a callable ``optimizer`` receiving the plan's groups, a matching optimizer instance with a
scheduler instance bound to it, and ``config_params`` as DeepSpeed's alias of ``config``.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.slow

_SCALED_PLAN = {
    "default": "freeze",
    "rules": [
        {"layers": "0-1", "policy": "full", "lr_scale": 0.1},
        {"layers": "2-3", "policy": "full"},
    ],
    "lm_head": {"policy": "full", "lr_scale": 0.5},
}


def _ds_cfg(stage: int, optimizer: bool = True) -> dict:
    from tests.helpers import ds_user_script as s

    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": s.GAS,
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**6,
    }
    if optimizer:
        cfg["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": s.LR, "weight_decay": s.WD, "eps": s.EPS, "torch_adam": True},
        }
    return cfg


def _body(rank: int, world: int, tmp: str) -> dict:
    import deepspeed

    import layerfreeze.deepspeed as lfds
    from tests.helpers import ds_user_script as script

    out = {}
    original = deepspeed.initialize
    try:
        # 1. config from args.deepspeed_config, model_parameters=model.parameters(), ZeRO-2 and 3
        for stage in (2, 3):
            path = f"{tmp}/ds{stage}.json"
            if rank == 0:
                with open(path, "w") as f:
                    json.dump(_ds_cfg(stage), f)
            torch.distributed.barrier()
            deepspeed.initialize = functools.partial(lfds.initialize, plan="freeze_deep")
            out[f"args{stage}"] = script.main(["--deepspeed_config", path])
        # 2. a callable optimizer gets the plan's groups (lr scales 0.1 / 0.5 / 1, no decay on
        #    norms), config without an optimizer section, passed as config_params
        deepspeed.initialize = functools.partial(
            lfds.initialize, plan=_SCALED_PLAN, config_params=_ds_cfg(2, optimizer=False)
        )
        out["callable"] = script.main(["--client-optimizer"])
    finally:
        deepspeed.initialize = original

    # 3. an optimizer instance that matches the plan (built from its groups), with a scheduler
    #    instance bound to it
    from layerfreeze.apply import apply_plan
    from tests.helpers.tiny_models import build_tiny_model

    model = build_tiny_model("llama", num_layers=4).train()
    applied = apply_plan(model, _SCALED_PLAN)
    # As documented: the groups hold lr * lr_scale (param_groups), initialize unscales them.
    opt = torch.optim.AdamW(
        applied.param_groups(script.LR, script.WD), lr=script.LR, eps=script.EPS
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    engine, _, _, scaled = lfds.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, applied=applied,
        config=_ds_cfg(1, optimizer=False),
    )
    losses = []
    for step in range(script.STEPS):
        total = 0.0
        for m in range(script.GAS):
            loss = engine(**script.micro_batch(step, m, rank)).loss
            engine.backward(loss)
            engine.step()
            t = loss.detach().clone()
            torch.distributed.all_reduce(t)
            total += float(t) / world
        losses.append(total / script.GAS)
    out["instance"] = losses
    out["instance_lrs"] = sorted({round(g["lr"], 12) for g in opt.param_groups})
    out["instance_inner"] = scaled.inner is sched
    engine.destroy()
    return out


def test_unchanged_script_with_swapped_initialize_matches_reference(tmp_path):
    from tests.distributed.test_deepspeed_engine import _reference

    res = run_distributed(_body, world_size=2, args=(str(tmp_path),), timeout=900)
    assert res[0] == res[1] or all(
        res[0][k] == pytest.approx(res[1][k]) for k in ("args2", "args3", "callable", "instance")
    )
    r = res[0]
    ref = _reference([{"plan": "freeze_deep", "until_step": None}], 2)["losses"]
    assert r["args2"] == pytest.approx(ref, rel=1e-5)
    assert r["args3"] == pytest.approx(ref, rel=1e-5)
    scaled_ref = _reference([{"plan": _SCALED_PLAN, "until_step": None}], 2)["losses"]
    assert scaled_ref[1] != pytest.approx(ref[1], rel=1e-4)  # the plans differ in what they learn
    assert r["callable"] == pytest.approx(scaled_ref, rel=1e-5)
    assert r["instance"] == pytest.approx(scaled_ref, rel=1e-5)
    assert r["instance_lrs"] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert r["instance_inner"]
