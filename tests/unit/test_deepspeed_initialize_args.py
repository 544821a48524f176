"""``layerfreeze.deepspeed.initialize`` refuses arguments that contradict the plan, each with a
clear message, before DeepSpeed is called (single process, no process group needed)."""

from __future__ import annotations

import types

import pytest
import torch

from tests.helpers.tiny_models import build_tiny_model

_CFG = {
    "train_micro_batch_size_per_gpu": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
}


@pytest.fixture(scope="module")
def lfds():
    import layerfreeze.deepspeed as lfds

    return lfds


def _model():
    return build_tiny_model("llama", num_layers=2)


def test_optimizer_instance_holding_frozen_params_is_refused(lfds):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # built before the plan froze anything
    with pytest.raises(ValueError, match=r"contradicts the plan: it holds parameters the plan "
                       r"freezes \(model\.layers\.1\."):
        lfds.initialize(model=model, optimizer=opt, plan="freeze_deep", config=_CFG)


def test_optimizer_instance_missing_adapters_is_refused(lfds):
    model = _model()
    opt = torch.optim.AdamW([p for p in model.parameters()], lr=1e-3)
    with pytest.raises(ValueError, match=r"misses parameters the plan trains \(.*lora_"):
        lfds.initialize(model=model, optimizer=opt, plan="hlpt", config=_CFG)


def test_optimizer_instance_with_other_lr_scales_is_refused(lfds):
    from layerfreeze.apply import apply_plan

    model = _model()
    plan = {"default": "full", "lm_head": {"policy": "full", "lr_scale": 0.5}}
    applied = apply_plan(model, plan)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with pytest.raises(ValueError, match=r"lr_scale differs from the plan's .*lm_head"):
        lfds.initialize(model=model, optimizer=opt, applied=applied, config=_CFG)


def test_model_parameters_leaving_out_trained_params_is_refused(lfds):
    model = _model()
    only_embed = [model.model.embed_tokens.weight]
    with pytest.raises(ValueError, match=r"model_parameters leaves out parameters the plan "
                       r"trains \(model\.layers\.0\."):
        lfds.initialize(model=model, model_parameters=only_embed, plan="freeze_deep", config=_CFG)


def test_model_parameter_groups_with_options_are_refused(lfds):
    model = _model()
    groups = [{"params": list(model.parameters()), "weight_decay": 0.0}]
    with pytest.raises(ValueError, match=r"model_parameters\[0\] is a parameter group with its "
                       r"own options \['weight_decay'\]"):
        lfds.initialize(model=model, model_parameters=groups, plan="full", config=_CFG)


def test_config_sources_follow_deepspeed(lfds):
    model = _model()
    with pytest.raises(ValueError, match="config= and config_params= both given"):
        lfds.initialize(model=model, plan="full", config=_CFG, config_params=_CFG)
    args = types.SimpleNamespace(deepspeed_config="ds.json", local_rank=0)
    with pytest.raises(ValueError, match=r"args\.deepspeed_config='ds\.json' and config= both"):
        lfds.initialize(args=args, model=model, plan="full", config=_CFG)
    with pytest.raises(ValueError, match="no DeepSpeed config; pass config="):
        lfds.initialize(model=model, plan="full")
    with pytest.raises(TypeError, match="first positional argument is `args`"):
        lfds.initialize(model)


def test_scheduler_instance_needs_the_optimizer_instance(lfds):
    model = _model()
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(other, lambda s: 1.0)
    with pytest.raises(TypeError, match="not bound to the optimizer= instance"):
        lfds.initialize(model=model, plan="full", lr_scheduler=sched, config=_CFG)


def _lr_warnings(lfds, caplog, lr):
    """Run initialize with a WarmupDecayLR config up to a later refusal (no process group)."""
    import logging

    model = _model()
    cfg = {**_CFG, "scheduler": {"type": "WarmupDecayLR", "params": {
        "warmup_min_lr": 0.0, "warmup_max_lr": 3e-4, "warmup_num_steps": 2, "total_num_steps": 4}}}
    # The CLI's logging set-up stops layerfreeze records at its own root logger: listen there.
    log = logging.getLogger("layerfreeze.engines.deepspeed")
    caplog.clear()
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING", logger=log.name), pytest.raises(
            ValueError, match="its own options"
        ):
            lfds.initialize(model=model, plan="freeze_deep", config=cfg, lr=lr,
                            model_parameters=[{"params": list(model.parameters()), "lr": 1.0}])
    finally:
        log.removeHandler(caplog.handler)
    return sorted({r.getMessage() for r in caplog.records if r.name == log.name})


def test_lr_that_the_config_scheduler_overrides_is_warned(lfds, caplog):
    """initialize(lr=1e-3) with a WarmupDecayLR section trains at the scheduler's own
    warmup_max_lr (DeepSpeed writes absolute lrs); that once happened without a word."""
    assert _lr_warnings(lfds, caplog, 1e-3) == [
        "lr=0.001 is not the learning rate that trains: the DeepSpeed config's scheduler "
        "WarmupDecayLR sets absolute values (scheduler.params.warmup_max_lr = 0.0003). Set "
        "warmup_max_lr to 0.001, or drop the scheduler section (or pass lr_scheduler=) to "
        "follow lr=."
    ]
    assert _lr_warnings(lfds, caplog, 3e-4) == []  # the same value: nothing to say
    assert _lr_warnings(lfds, caplog, None) == []  # lr from the config's optimizer section
