"""Hugging Face ``Trainer`` with a layer plan on 2 gloo ranks (CPU): plain DDP with a two-phase
plan schedule, C-Eval at checkpoints and the sensitivity hooks, and a resume in the second phase;
the Trainer's DeepSpeed integration with ZeRO-2 and ZeRO-3: a single plan, a two-phase schedule
(the engine rebuilt at the switch) and a resume in the second phase, and the refusal of a
schedule under DeepSpeed without ``plan_trainer``.

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
LONG = 5  # the resume tests: a checkpoint in phase 1, then two more steps
LR = 1e-3
WD = 0.1
EPS = 1e-6
SEQ = 8
PHASE0 = {"default": "freeze", "rules": [{"layers": "0-1", "policy": "full", "lr_scale": 0.1}]}
PHASE1 = {"default": "freeze", "rules": [{"layers": "1-3", "policy": "full"}],
          "lm_head": {"policy": "full", "lr_scale": 0.5}}
SCHEDULE = [{"plan": PHASE0, "until_step": 2}, {"plan": PHASE1, "until_step": None}]
SINGLE = [{"plan": PHASE1, "until_step": None}]


def _samples(vocab: int, steps: int = STEPS) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (4 * steps, SEQ), generator=g)
    return [{"input_ids": r, "labels": r.clone()} for r in ids]


def _model(vocab: int):
    from tests.helpers.tiny_models import build_tiny_model

    return build_tiny_model("llama", num_layers=4, vocab_size=vocab).train()


def _reference(schedule, vocab: int, steps: int = STEPS) -> dict:
    from layerfreeze.apply import apply_plan
    from layerfreeze.schedule import PlanSchedule

    sched = PlanSchedule.parse(schedule)
    model = _model(vocab)
    applied = apply_plan(model, sched.plans[0], install=tuple(sched.plans[1:]))
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(applied.param_groups(LR, WD), lr=LR, eps=EPS)
    data, phase, losses = _samples(vocab, steps), 0, []
    for step in range(steps):
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
        exact_losses: list[float]

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset or self.train_dataset)

        def compute_loss(self, *args, **kwargs):  # this rank's unrounded loss of each step
            out = super().compute_loss(*args, **kwargs)
            loss = out[0] if isinstance(out, tuple) else out
            self.__dict__.setdefault("exact_losses", []).append(float(loss.detach()))
            return out

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
    """A schedule under the DeepSpeed integration without plan_trainer is refused when the
    Trainer is built (its own process: accelerate allows one DeepSpeed ``Accelerator`` per
    process)."""
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
def test_deepspeed_trainer_single_plan_matches_reference(tmp_path, stage):
    res = run_distributed(_body_deepspeed, world_size=2, args=(str(tmp_path), stage), timeout=900)
    ref = _reference(SINGLE, 128)
    for r in res:
        assert [float(x) for x in r["losses"]] == pytest.approx(ref["losses"], abs=2e-4)
        assert set(r["scales"]) == {0.5, 1.0}
    if stage == 3:  # the refusal does not depend on the stage: check it once
        refused = run_distributed(_body_deepspeed_refusal, world_size=2,
                                  args=(str(tmp_path), stage), timeout=900)
        for msg in refused:
            assert "needs the Trainer class from layerfreeze.hf_trainer.plan_trainer()" in msg


def _inner_optimizer(trainer):
    inner = trainer.optimizer
    while not isinstance(inner, torch.optim.Optimizer):
        inner = inner.optimizer
    return inner


def _body_deepspeed_schedule(
    rank: int, world: int, tmp: str, stage: int, resume: bool, data_dir: str
) -> dict:
    """The two-phase schedule under the DeepSpeed integration, with C-Eval at the checkpoint
    (step 3, in phase 1, after the engine was rebuilt with split groups) and the sensitivity hooks
    every 2 steps. ``resume``: a new process resumes from that checkpoint."""
    import json

    from layerfreeze.diagnostics.hooks import SensitivityHooks
    from layerfreeze.evaluation import EvalCallback
    from layerfreeze.hf_trainer import STATE_FILE, LayerfreezeCallback, apply_schedule, plan_trainer
    from tests.helpers.eval_fixtures import cached_tokenizer

    tok = cached_tokenizer()
    vocab = len(tok)
    model = _model(vocab)
    applied, schedule = apply_schedule(model, SCHEDULE)
    out_dir = f"{tmp}/sched{stage}"
    args = _args(out_dir, deepspeed=_ds_config(stage), save_strategy="steps", save_steps=3,
                 max_steps=LONG)
    cb = LayerfreezeCallback(
        applied, schedule,
        evaluation=EvalCallback(_eval_config(data_dir), tok, f"{tmp}/eval{stage}{resume}"),
        sensitivity=SensitivityHooks(applied.layout, _probe(vocab),
                                     measures=("angular", "update_ratio")),
        sensitivity_every=2,
    )
    trainer = plan_trainer(_trainer_cls())(
        model=model, args=args, train_dataset=_samples(vocab, LONG), applied=applied,
        callbacks=[cb],
    )
    if resume:
        trainer.train(resume_from_checkpoint=f"{out_dir}/checkpoint-3")
    else:
        trainer.train()
    inner = _inner_optimizer(trainer)
    held = {n for n, p in model.named_parameters() if p.requires_grad}
    return {
        "rank": rank,
        "losses": _losses(trainer),
        "exact": trainer.exact_losses,
        "phase": cb.phase,
        "records": cb.records,
        "groups": sorted((g["name"], g["lr_scale"], g["lr"]) for g in inner.param_groups),
        "requires_grad": sorted(held),
        "phase1": sorted(applied.trainable_names_for(PHASE1)),
        "rebuilt": len(trainer._layerfreeze_retired),  # engines retired by phase switches
        "state": json.loads(open(f"{out_dir}/checkpoint-3/{STATE_FILE}").read()),
        "global_steps": trainer.model_wrapped.global_steps,
    }


def _eval_config(data_dir: str):
    from layerfreeze.evaluation.config import EvalConfig

    return EvalConfig(benchmarks=["ceval"], data_dir=data_dir, shots=0, max_questions=3,
                      subjects={"ceval": ["computer_network"]}, at_end=False)


def _probe(vocab: int) -> torch.Tensor:
    return _samples(vocab)[0]["input_ids"][None]


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_trainer_schedule_rebuilds_the_engine_and_resumes_in_phase_two(
    tmp_path, stage, eval_data_dir
):
    import json

    from layerfreeze.diagnostics.hooks import SensitivityHooks
    from layerfreeze.evaluation import EvalCallback
    from tests.helpers.eval_fixtures import cached_tokenizer

    tok = cached_tokenizer()
    vocab = len(tok)
    # the references for 2, 3, 4 and 5 steps see the same samples in the same order
    assert torch.equal(
        torch.stack([b["input_ids"] for b in _samples(vocab, 2)]),
        torch.stack([b["input_ids"] for b in _samples(vocab, LONG)])[:8],
    )
    ref = {n: _reference(SCHEDULE, vocab, n) for n in (2, 3, 4, LONG)}
    straight = run_distributed(_body_deepspeed_schedule, world_size=2,
                               args=(str(tmp_path), stage, False, str(eval_data_dir)), timeout=900)
    for r in straight:
        assert r["phase"] == 1 and r["rebuilt"] == 1
        # the Trainer logs losses rounded to 4 digits; the reference really freezes and builds
        # a new AdamW at the switch carrying the Adam state of the layer both phases train
        assert [float(x) for x in r["losses"]] == pytest.approx(ref[LONG]["losses"], abs=2e-4)
        assert r["requires_grad"] == r["phase1"]  # ZeRO holds exactly phase 1's parameters
        # layer 1 (trained in both phases) has 2 Adam steps, the rest none: split groups
        names = [g[0] for g in r["groups"]]
        assert any(n.endswith("@2") for n in names), names
        assert {g[1] for g in r["groups"]} == {0.5, 1.0}
        for _name, scale, lr in r["groups"]:  # the constant schedule continued, scales kept
            assert lr == pytest.approx(LR * scale)
        assert r["state"]["phase"] == 1 and r["state"]["global_step"] == 3
        assert r["global_steps"] == LONG
    records = straight[0]["records"]
    # C-Eval at the checkpoints (step 3 and the final save) = the reference model after as many
    # steps, scored the same way
    evals = {s: m for s, m in records if "eval/ceval/acc_macro" in m}
    assert sorted(evals) == [3, LONG]
    for step in (3, LONG):
        ref_dir = tmp_path / f"ref_eval{step}"
        want = EvalCallback(_eval_config(str(eval_data_dir)), tok, ref_dir).maybe_run(
            step, ref[step]["model"], force=True
        )
        got = evals[step]
        assert got["eval/ceval/acc_macro"] == pytest.approx(want["eval/ceval/acc_macro"])
        assert got["eval/ceval/num_questions"] == want["eval/ceval/num_questions"] == 3
        # question by question: each choice's log-likelihood under the trained model
        name = f"step_{step:08d}.json"
        got_q = json.loads((tmp_path / f"eval{stage}False" / name).read_text())["questions"]
        want_q = json.loads((ref_dir / name).read_text())["questions"]
        assert len(got_q["ceval"]) == len(want_q["ceval"]) == 3
        for a, b in zip(got_q["ceval"], want_q["ceval"], strict=True):
            assert a["id"] == b["id"] and a["pred"] == b["pred"]
            for letter, v in b["loglik"].items():
                assert a["loglik"][letter] == pytest.approx(v, abs=1e-3), (a["id"], letter)
    # sensitivity hooks at steps 0, 2, 4: angular distances = the reference's; the update ratio
    # from step 2 to 4 (ZeRO-3: gathered one layer at a time) = the reference weights' ratio
    diag = {s: m for s, m in records if "diag/probe_loss" in m}
    assert sorted(diag) == [0, 2, 4]
    want = SensitivityHooks(ref[4]["applied"].layout, _probe(vocab), measures=("angular",))
    for k, v in want.compute(ref[4]["model"], 4).items():
        assert diag[4][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    w2, w4 = ref[2]["model"].state_dict(), ref[4]["model"].state_dict()
    phase1 = set(ref[4]["applied"].trainable_names_for(PHASE1))
    for i in range(4):
        keys = [k for k in phase1 if k.startswith(f"model.layers.{i}.")]
        num = sum(float((w4[k].double() - w2[k].double()).pow(2).sum()) for k in keys)
        den = sum(float(w2[k].double().pow(2).sum()) for k in keys)
        expect = (num ** 0.5) / (den ** 0.5) if den else 0.0
        got = diag[4][f"diag/update_ratio/layers.{i}"]
        assert got == pytest.approx(expect, rel=2e-2, abs=1e-9), (i, got, expect)
        assert (got > 0) == (i >= 1)  # layer 0 is frozen in phase 1
    resumed = run_distributed(_body_deepspeed_schedule, world_size=2,
                              args=(str(tmp_path), stage, True, str(eval_data_dir)), timeout=900)
    for r in resumed:
        assert r["phase"] == 1 and r["rebuilt"] == 0  # built for phase 1 from the start
        assert r["requires_grad"] == r["phase1"]
        assert r["groups"] == straight[0]["groups"]
        # steps 4 and 5 from the checkpoint = the straight run's, unrounded (step 5's loss
        # depends on step 4's update, i.e. on the Adam state the checkpoint restored)
        assert len(r["exact"]) == 2
        assert r["exact"] == pytest.approx(straight[r["rank"]]["exact"][3:], rel=1e-6)
        assert r["global_steps"] == LONG


def _body_ddp_resume(rank: int, world: int, tmp: str) -> dict:
    """A plain Trainer (DDP) resuming the schedule in phase 1: apply_schedule reads the phase."""
    from layerfreeze.hf_trainer import (
        LayerfreezeCallback,
        apply_schedule,
        plan_optimizer,
        plan_trainer,
    )

    model = _model(128)
    out_dir = f"{tmp}/ddp_resume"
    args = _args(out_dir, save_strategy="steps", save_steps=2, max_steps=LONG)
    applied, schedule = apply_schedule(model, SCHEDULE)
    trainer = _trainer_cls()(model=model, args=args, train_dataset=_samples(128, LONG),
                             optimizers=(plan_optimizer(applied, args), None),
                             callbacks=[LayerfreezeCallback(applied, schedule)])
    trainer.train()
    straight, straight_exact = _losses(trainer), trainer.exact_losses
    model = _model(128)
    applied, schedule = apply_schedule(
        model, SCHEDULE, resume_from_checkpoint=f"{out_dir}/checkpoint-2"
    )
    cb = LayerfreezeCallback(applied, schedule)
    trainer = _trainer_cls()(model=model, args=args, train_dataset=_samples(128, LONG),
                             optimizers=(plan_optimizer(applied, args), None), callbacks=[cb])
    trainer.train(resume_from_checkpoint=f"{out_dir}/checkpoint-2")
    resumed = trainer.exact_losses
    # plan_trainer finds the phase itself: the model starts in phase 0 (checkpoint-4 is in phase 1)
    model = _model(128)
    applied2, schedule = apply_schedule(model, SCHEDULE)
    cb2 = LayerfreezeCallback(applied2, schedule)
    trainer = plan_trainer(_trainer_cls())(
        model=model, args=args, train_dataset=_samples(128, LONG), applied=applied2,
        callbacks=[cb2],
    )
    trainer.train(resume_from_checkpoint=f"{out_dir}/checkpoint-4")
    return {"straight": straight, "straight_exact": straight_exact, "resumed": resumed,
            "phase": cb.phase, "plan": applied.plan.to_dict(),
            "last": trainer.exact_losses, "phase2": cb2.phase, "plan2": applied2.plan.to_dict()}


def test_ddp_trainer_resumes_a_schedule_in_phase_two(tmp_path):
    from layerfreeze.plan import LayerPlan

    res = run_distributed(_body_ddp_resume, world_size=2, args=(str(tmp_path),), timeout=900)
    ref = _reference(SCHEDULE, 128, LONG)
    for r in res:
        assert [float(x) for x in r["straight"]] == pytest.approx(ref["losses"], abs=2e-4)
        assert r["phase"] == 1 and r["plan"] == LayerPlan.parse(PHASE1).to_dict()
        # steps 3-5 from the checkpoint = the straight run's, unrounded (they depend on the
        # Adam state the checkpoint restored into phase 1's groups)
        assert r["resumed"] == pytest.approx(r["straight_exact"][2:], rel=1e-6)
        assert r["phase2"] == 1 and r["plan2"] == r["plan"]
        assert r["last"] == pytest.approx(r["straight_exact"][4:], rel=1e-6)


def test_resume_state_errors_name_the_file(tmp_path):
    from layerfreeze.hf_trainer import STATE_FILE, read_trainer_state
    from layerfreeze.schedule import PlanSchedule

    sched = PlanSchedule.parse(SCHEDULE)
    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text('{"global_step": 3}')
    with pytest.raises(ValueError, match=f"{STATE_FILE}: missing"):
        read_trainer_state(ckpt, sched)
    (ckpt / STATE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        read_trainer_state(ckpt, sched)
    (ckpt / STATE_FILE).write_text(
        '{"format": "layerfreeze.hf_trainer/1", "phase": 1, "global_step": 3, "plans": []}'
    )
    with pytest.raises(ValueError, match="another plan schedule"):
        read_trainer_state(ckpt, sched)
    # a checkpoint of phase 0 written without the callback still resumes (nothing to know)
    early = tmp_path / "checkpoint-1"
    early.mkdir()
    (early / "trainer_state.json").write_text('{"global_step": 1}')
    assert read_trainer_state(early, sched)["phase"] == 0
