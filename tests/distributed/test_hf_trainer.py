"""Hugging Face ``Trainer`` with a layer plan on 2 gloo ranks (CPU): plain DDP with a two-phase
plan schedule, C-Eval at checkpoints and the sensitivity hooks; the Trainer's DeepSpeed
integration with ZeRO-2 and ZeRO-3 (single plan) and its refusal of schedules.

Expected values come from an independent single-process run (:func:`_reference`): plain
``torch.optim.AdamW`` over the plan's groups, each step on the 4 samples the two ranks see,
gradients clipped to global norm 1, and at the phase switch a new optimizer carrying the Adam
state of parameters that stay trainable.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.slow

STEPS = 4
LR = 1e-3
WD = 0.1
EPS = 1e-6
SEQ = 8
PHASE0 = {"default": "freeze", "rules": [{"layers": "0-1", "policy": "full", "lr_scale": 0.1}]}
PHASE1 = {"default": "freeze", "rules": [{"layers": "1-3", "policy": "full"}],
          "lm_head": {"policy": "full", "lr_scale": 0.5}}
SCHEDULE = [{"plan": PHASE0, "until_step": 2}, {"plan": PHASE1, "until_step": None}]
SINGLE = [{"plan": PHASE1, "until_step": None}]


def _samples(vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (4 * STEPS, SEQ), generator=g)
    return [{"input_ids": r, "labels": r.clone()} for r in ids]


def _model(vocab: int):
    from tests.helpers.tiny_models import build_tiny_model

    return build_tiny_model("llama", num_layers=4, vocab_size=vocab).train()


def _reference(schedule, vocab: int) -> dict:
    from layerfreeze.apply import apply_plan
    from layerfreeze.schedule import PlanSchedule

    sched = PlanSchedule.parse(schedule)
    model = _model(vocab)
    applied = apply_plan(model, sched.plans[0], install=tuple(sched.plans[1:]))
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(applied.param_groups(LR, WD), lr=LR, eps=EPS)
    data, phase, losses = _samples(vocab), 0, []
    for step in range(STEPS):
        if sched.phase_at(step) != phase:
            old = {n: opt.state[params[n]] for n in applied.trainable_names() if params[n] in opt.state}
            phase = sched.phase_at(step)
            applied.switch_plan(sched.plans[phase])
            opt = torch.optim.AdamW(applied.param_groups(LR, WD), lr=LR, eps=EPS)
            for n in applied.trainable_names():
                if n in old:
                    opt.state[params[n]] = old[n]
        model.zero_grad(set_to_none=True)
        batch = data[4 * step: 4 * step + 4]
        loss = model(input_ids=torch.stack([b["input_ids"] for b in batch]),
                     labels=torch.stack([b["labels"] for b in batch])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        opt.step()
        losses.append(float(loss))
    return {"model": model, "applied": applied, "losses": losses}


def _trainer_cls():
    from torch.utils.data import SequentialSampler
    from transformers import Trainer

    class _InOrder(Trainer):  # the reference's sample order (rank r gets batches r, r+2, ...)
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset or self.train_dataset)

    return _InOrder


def _args(tmp: str, **extra):
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=tmp, per_device_train_batch_size=2, max_steps=STEPS, learning_rate=LR,
        weight_decay=WD, adam_epsilon=EPS, max_grad_norm=1.0, lr_scheduler_type="constant",
        optim="adamw_torch", logging_steps=1, report_to=[], use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, save_strategy="no",
    )
    return TrainingArguments(**{**kwargs, **extra})


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _body_ddp(rank: int, world: int, tmp: str, data_dir: str) -> dict:
    from layerfreeze.diagnostics.hooks import SensitivityHooks
    from layerfreeze.evaluation import EvalCallback
    from layerfreeze.evaluation.config import EvalConfig
    from layerfreeze.hf_trainer import LayerfreezeCallback, apply_schedule, plan_optimizer
    from tests.helpers.eval_fixtures import cached_tokenizer

    tok = cached_tokenizer()
    vocab = len(tok)
    model = _model(vocab)
    applied, schedule = apply_schedule(model, SCHEDULE)
    args = _args(f"{tmp}/ddp", save_strategy="steps", save_steps=2)
    ecfg = EvalConfig(benchmarks=["ceval"], data_dir=data_dir, shots=0, max_questions=3,
                      subjects={"ceval": ["computer_network"]}, at_end=False)
    probe = _samples(vocab)[0]["input_ids"][None]
    cb = LayerfreezeCallback(
        applied, schedule, evaluation=EvalCallback(ecfg, tok, f"{tmp}/eval"),
        sensitivity=SensitivityHooks(applied.layout, probe, measures=("grad_norm", "angular")),
        sensitivity_every=2,
    )
    trainer = _trainer_cls()(model=model, args=args, train_dataset=_samples(vocab),
                             optimizers=(plan_optimizer(applied, args), None), callbacks=[cb])
    trainer.train()
    out = {"losses": _losses(trainer), "phase": cb.phase,
           "records": [(s, m) for s, m in cb.records]}
    if rank == 0:
        out["state"] = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return out


def test_ddp_trainer_schedule_eval_and_hooks_match_reference(tmp_path, eval_data_dir):
    from layerfreeze.diagnostics.hooks import SensitivityHooks
    from layerfreeze.evaluation import EvalCallback
    from layerfreeze.evaluation.config import EvalConfig
    from tests.helpers.eval_fixtures import cached_tokenizer

    res = run_distributed(_body_ddp, world_size=2, args=(str(tmp_path), str(eval_data_dir)),
                          timeout=900)
    tok = cached_tokenizer()
    ref = _reference(SCHEDULE, len(tok))
    r = res[0]
    assert r["phase"] == 1
    # the Trainer logs losses rounded to 4 digits
    assert [float(x) for x in r["losses"]] == pytest.approx(ref["losses"], abs=2e-4)
    state = ref["model"].state_dict()
    never = {n for n, _ in ref["model"].named_parameters()} - {
        n for p in (PHASE0, PHASE1) for n in ref["applied"].trainable_names_for(p)
    }
    assert "model.embed_tokens.weight" in never
    for k, v in r["state"].items():
        got = torch.from_numpy(v)
        if k in never:  # frozen in every phase: untouched
            assert torch.equal(got, _model(len(tok)).state_dict()[k]), k
        # Adam turns float noise in near-zero gradients (2 ranks vs 1 process) into ~1e-5
        # weight differences; one missed or extra update would move weights by ~lr = 1e-3.
        diff = float((got - state[k]).abs().max())
        assert diff < 5e-5, (k, diff)
    # C-Eval at the checkpoints (steps 2 and 4) = the reference model scored the same way
    evals = {s: m for s, m in r["records"] if "eval/ceval/acc_macro" in m}
    assert sorted(evals) == [2, 4]
    ecfg = EvalConfig(benchmarks=["ceval"], data_dir=str(eval_data_dir), shots=0,
                      max_questions=3, subjects={"ceval": ["computer_network"]}, at_end=False)
    want = EvalCallback(ecfg, tok, tmp_path / "ref_eval").maybe_run(4, ref["model"], force=True)
    assert evals[4]["eval/ceval/acc_macro"] == pytest.approx(want["eval/ceval/acc_macro"])
    assert evals[4]["eval/ceval/num_questions"] == want["eval/ceval/num_questions"] == 3
    # sensitivity hooks before step 1 and every 2 steps; at step 4 = the reference's
    diag = {s: m for s, m in r["records"] if "diag/probe_loss" in m}
    assert sorted(diag) == [0, 2, 4]
    probe = _samples(len(tok))[0]["input_ids"][None]
    hooks = SensitivityHooks(ref["applied"].layout, probe, measures=("grad_norm", "angular"))
    want = hooks.compute(ref["model"], 4)
    for k, v in want.items():
        assert diag[4][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def _ds_config(stage: int) -> dict:
    # no optimizer / scheduler section: the Trainer uses plan_optimizer's and its own LambdaLR
    return {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_optimization": {"stage": stage},
        "steps_per_print": 10**6,
    }


def _body_deepspeed(rank: int, world: int, tmp: str, stage: int) -> dict:
    from layerfreeze.hf_trainer import LayerfreezeCallback, apply_schedule, plan_trainer

    vocab = 128
    ds = _ds_config(stage)
    out: dict = {}
    # a single plan trains like the reference (per-policy lr scales from plan_optimizer). The
    # model is built before the TrainingArguments: with a ZeRO-3 config alive, transformers
    # builds models under zero.Init (other random weights than the reference's).
    model = _model(vocab)
    applied, schedule = apply_schedule(model, SINGLE)
    args = _args(f"{tmp}/ds{stage}", deepspeed=ds)
    # the DeepSpeed integration discards optimizers=: plan_trainer's create_optimizer gives it
    trainer = plan_trainer(_trainer_cls())(
        model=model, args=args, train_dataset=_samples(vocab), applied=applied,
        callbacks=[LayerfreezeCallback(applied, schedule)],
    )
    trainer.train()
    out["losses"] = _losses(trainer)
    inner = trainer.optimizer
    while not isinstance(inner, torch.optim.Optimizer):
        inner = inner.optimizer
    out["scales"] = sorted(g["lr_scale"] for g in inner.param_groups)
    return out


def _body_deepspeed_refusal(rank: int, world: int, tmp: str, stage: int) -> str:
    """A schedule is refused under the DeepSpeed integration when the Trainer is built (its own
    process: accelerate allows one DeepSpeed ``Accelerator`` per process)."""
    from layerfreeze.hf_trainer import LayerfreezeCallback, apply_schedule, plan_optimizer

    model = _model(128)
    applied, schedule = apply_schedule(model, SCHEDULE)
    args = _args(f"{tmp}/ds{stage}", deepspeed=_ds_config(stage))
    try:
        _trainer_cls()(model=model, args=args, train_dataset=_samples(128),
                       optimizers=(plan_optimizer(applied, args), None),
                       callbacks=[LayerfreezeCallback(applied, schedule)])
    except ValueError as e:
        return str(e)
    return ""


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_trainer_single_plan_matches_reference_and_refuses_schedules(tmp_path, stage):
    res = run_distributed(_body_deepspeed, world_size=2, args=(str(tmp_path), stage), timeout=900)
    ref = _reference(SINGLE, 128)
    for r in res:
        assert [float(x) for x in r["losses"]] == pytest.approx(ref["losses"], abs=2e-4)
        assert set(r["scales"]) == {0.5, 1.0}
    if stage == 3:  # the refusal does not depend on the stage: check it once
        refused = run_distributed(_body_deepspeed_refusal, world_size=2,
                                  args=(str(tmp_path), stage), timeout=900)
        for msg in refused:
            assert "refused under the Trainer's DeepSpeed integration" in msg
            assert "cannot rebuild mid-run" in msg
