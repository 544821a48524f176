"""``layerfreeze.hf_trainer`` in one process: the plan optimizer's groups, and the callback's
refusals (schedule not prepared, optimizer not built from the plan)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny_models import build_tiny_model

PLAN = {"default": "freeze", "rules": [{"layers": "0", "policy": "full", "lr_scale": 0.1}],
        "lm_head": {"policy": "full", "lr_scale": 0.5}}


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.1,
                             optim="adamw_torch", use_cpu=True, report_to=[], max_steps=1,
                             per_device_train_batch_size=2, disable_tqdm=True,
                             save_strategy="no", **kw)


def _data():
    ids = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": r, "labels": r.clone()} for r in ids]


def test_plan_optimizer_holds_the_plan_groups(tmp_path):
    from layerfreeze.hf_trainer import apply_schedule, plan_optimizer

    model = build_tiny_model("llama", num_layers=2)
    applied, _ = apply_schedule(model, PLAN)
    opt = plan_optimizer(applied, _args(tmp_path))
    assert type(opt) is torch.optim.AdamW
    want = applied.param_groups(1e-3, 0.1)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in opt.param_groups] == [
        (g["name"], g["lr"], g["weight_decay"]) for g in want
    ]
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([1e-4, 5e-4])


def test_schedule_applied_without_apply_schedule_is_refused(tmp_path):
    from transformers import Trainer

    from layerfreeze.apply import apply_plan
    from layerfreeze.hf_trainer import LayerfreezeCallback, plan_optimizer
    from layerfreeze.schedule import PlanSchedule

    model = build_tiny_model("llama", num_layers=2)
    schedule = PlanSchedule.parse([{"plan": PLAN, "until_step": 1},
                                   {"plan": "full", "until_step": None}])
    applied = apply_plan(model, schedule.plans[0], install=tuple(schedule.plans[1:]))
    args = _args(tmp_path)
    with pytest.raises(ValueError, match="apply_schedule"):
        Trainer(model=model, args=args, train_dataset=_data(),
                optimizers=(plan_optimizer(applied, args), None),
                callbacks=[LayerfreezeCallback(applied, schedule)])


def test_trainer_default_optimizer_is_refused(tmp_path):
    from transformers import Trainer

    from layerfreeze.hf_trainer import LayerfreezeCallback, apply_schedule

    model = build_tiny_model("llama", num_layers=2)
    applied, schedule = apply_schedule(model, PLAN)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_data(),
                      callbacks=[LayerfreezeCallback(applied, schedule)])
    with pytest.raises(ValueError, match="not built from the plan .* lr_scale"):
        trainer.train()


def test_plan_trainer_builds_the_plan_optimizer(tmp_path):
    from layerfreeze.hf_trainer import LayerfreezeCallback, apply_schedule, plan_trainer

    model = build_tiny_model("llama", num_layers=2)
    applied, schedule = apply_schedule(model, PLAN)
    trainer = plan_trainer()(model=model, args=_args(tmp_path), train_dataset=_data(),
                             applied=applied, callbacks=[LayerfreezeCallback(applied, schedule)])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert type(trainer).__name__ == "PlanTrainer"
    assert sorted(g["lr_scale"] for g in trainer.optimizer.param_groups) == [0.1, 0.1, 0.5]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(applied.trainable_names())
