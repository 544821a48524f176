"""MegatronRunner full resume through megatron-core distributed checkpointing (``checkpoint_format=
"dist"``), 2 gloo ranks, the test shim of tests/helpers/megatron.py.

A run trains 2 steps at layout A and saves; a runner at layout B built from *other* weights (so
every tensor must come from the checkpoint: weights, Adam moments, lr schedule, counters) resumes
it. Expected values come from independent runs, never from the resumed runner itself:

* right after the load, B's per-token losses on a probe batch equal those of the saving model;
* B's next 2 steps give the losses of a straight 4-step run at layout A (every data-parallel
  replica reads the same micro-batches, so a TP=1 layout on 2 ranks, two replicas, is the same
  training as one TP=2 replica): exactly at the same layout, to float tolerance across layouts
  (another reduction order). Wrong Adam moments or steps change the second step's update.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.slow

GAS = 2
LR = 1e-2
#: a frozen layer, LoRA (ungated and gated), a fully trained layer, trained head
PLAN = {
    "rules": [
        {"layers": "0", "policy": "freeze"},
        {"layers": "1", "policy": "lora", "r": 4, "target": "all"},
        {"layers": "2", "policy": "lora", "r": 4, "target": "mlp", "gated": True},
        {"layers": "3", "policy": "full"},
    ],
    "embeddings": "freeze",
    "final_norm": "full",
    "lm_head": "full",
}
#: (save layout, resume layout, trainable_only); a layout is (tp, pp) or (tp, pp, virtual chunks)
CASES = [
    ((2, 1), (2, 1), False),  # same layout: exact
    ((2, 1), (1, 1), False),  # TP2 -> TP1
    ((1, 1), (2, 1), False),  # TP1 -> TP2
    ((1, 2), (1, 1), False),  # PP2 -> PP1
    ((1, 1), (1, 2), False),  # PP1 -> PP2
    ((2, 1), (1, 2), True),  # TP2 -> PP2, trainable-only (frozen weights from the base model)
    ((1, 2, 2), (2, 1), False),  # PP2 x 2 virtual chunks -> TP2
    ((2, 1), (1, 2, 2), False),  # TP2 -> PP2 x 2 virtual chunks
]
SAVE_STEPS, MORE_STEPS = 2, 2


def _window(step: int) -> list[dict]:
    from tests.helpers.megatron import tiny_tokens

    out = []
    for j in range(GAS):
        ids = tiny_tokens(batch=2, seq=8, seed=100 * step + j)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def _sched(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.5 * s))


def _runner(layout, full):
    from layerfreeze.engines.megatron.runner import MegatronRunner
    from tests.helpers.megatron import build_tiny_gpt, init_model_parallel, load_full_weights

    tp, pp, vp = (*layout, None)[:3]
    if vp is None:
        init_model_parallel(tp=tp, pp=pp)
        model = build_tiny_gpt(tp=tp, pp=pp, seed=3)
        load_full_weights(model, full)
    else:  # interleaved pipeline: this rank's virtual chunks
        init_model_parallel(tp=tp, pp=pp, virtual_pipeline_model_parallel_size=vp)
        model = []
        for v in range(vp):
            chunk = build_tiny_gpt(
                tp=tp, pp=pp, seed=3, vp_stage=v, virtual_pipeline_model_parallel_size=vp
            )
            load_full_weights(chunk, full)
            model.append(chunk)
    return MegatronRunner(
        model,
        plan=PLAN,
        lr=LR,
        weight_decay=0.1,
        gradient_accumulation_steps=GAS,
        lr_scheduler=_sched,
        checkpoint_format="dist",
    )


def _token_losses(runner) -> torch.Tensor:
    """Per-token losses ``[b, s-1]`` of a probe batch from the runner's whole logits."""
    from tests.helpers.megatron import tiny_tokens

    ids = tiny_tokens(batch=2, seq=8, seed=777)
    logits = runner.eval_model()(ids)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(2, -1)


def _body(rank, world_size, tmp):
    from tests.helpers.megatron import megatron_cpu_shim, reference_weights

    out: dict = {"straight": {}, "cases": []}
    with megatron_cpu_shim():
        base, other = reference_weights(3), reference_weights(9)
        for layout in sorted({a for a, _, _ in CASES}):
            r = _runner(layout, base)
            out["straight"][layout] = [r.train_step(_window(s)).loss for s in range(4)]
            r.close()
        for i, (save, load, trainable_only) in enumerate(CASES):
            where = os.path.join(tmp, f"case{i}")
            r = _runner(save, base)
            [r.train_step(_window(s)) for s in range(SAVE_STEPS)]
            saved = _token_losses(r)
            r.save_checkpoint(
                where,
                client_state={"cursor": torch.tensor([SAVE_STEPS, rank])},
                trainable_only=trainable_only,
            )
            r.close()
            r = _runner(load, base if trainable_only else other)
            before = _token_losses(r)
            client = r.load_checkpoint(where)
            after = _token_losses(r)
            state = (r.global_step, r.base_lr, client["cursor"].tolist())
            more = [r.train_step(_window(s)).loss for s in range(SAVE_STEPS, 4)]
            r.close()
            weights_only = None
            if trainable_only:  # load_trainable_weights reads a dist checkpoint at any layout too
                r = _runner((1, 1), base)
                r.load_trainable_weights(where)
                weights_only = _token_losses(r).numpy()
                r.close()
            out["cases"].append(
                {
                    "saved": saved.numpy(),
                    "before": before.numpy(),
                    "after": after.numpy(),
                    "state": state,
                    "more": more,
                    "weights_only": weights_only,
                }
            )
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("dist_resume"))
    return run_distributed(_body, world_size=2, args=(tmp,), timeout=1200)


@pytest.mark.parametrize(
    "case", range(len(CASES)), ids=[f"{a}->{b}{' trainable' if t else ''}" for a, b, t in CASES]
)
def test_dist_checkpoint_resume(results, case):
    save, load, _ = CASES[case]
    for rank, res in enumerate(results):
        c = res["cases"][case]
        saved, before, after = (torch.from_numpy(c[k]) for k in ("saved", "before", "after"))
        assert (before - saved).abs().max() > 1e-3  # the resuming model differs before the load
        torch.testing.assert_close(after, saved, rtol=0, atol=1e-5)
        step, lr, cursor = c["state"]
        assert step == SAVE_STEPS and lr == pytest.approx(LR / (1.0 + 0.5 * SAVE_STEPS))
        # a rank that did not save (more ranks hold the layout now) gets rank 0's client state
        assert cursor[0] == SAVE_STEPS and cursor[1] in (rank, 0)
        if c["weights_only"] is not None:
            torch.testing.assert_close(
                torch.from_numpy(c["weights_only"]), saved, rtol=0, atol=1e-5
            )
        expected = res["straight"][save][SAVE_STEPS:]
        if save == load:
            assert c["more"] == expected  # exact
        else:
            torch.testing.assert_close(
                torch.tensor(c["more"]), torch.tensor(expected), rtol=0, atol=2e-5
            )
