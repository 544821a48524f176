"""`embeddings` / `lm_head` `new_rows` under DeepSpeed ZeRO-2 and ZeRO-3 on 2 gloo ranks: only the new rows
move (the full matrices stay bit-identical on every rank), the optimizer holds state for the
new rows only (master + 2 Adam moments), and the new rows follow a single-process AdamW run on
the same global batches."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.slow

WORLD, GAS, LR, WD, EPS = 2, 2, 1e-2, 0.1, 1e-6
FROM, VOCAB, HIDDEN = 100, 128, 32
PLAN = f"embeddings:new_rows(from_id={FROM}),lm_head:new_rows(from_id={FROM})"
STEPS = 3


def _model():
    from tests.helpers.tiny_models import build_tiny_model

    return build_tiny_model("llama", num_layers=2, hidden=HIDDEN, num_heads=2, num_kv_heads=1,
                            vocab_size=VOCAB, tie_word_embeddings=False)


def _micro(step: int, micro: int, rank: int) -> dict:
    g = torch.Generator().manual_seed(7_000 + 100 * step + 10 * micro + rank)
    ids = torch.randint(0, VOCAB, (2, 8), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _cfg(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": GAS,
        "optimizer": {"type": "AdamW",
                      "params": {"lr": LR, "weight_decay": WD, "eps": EPS, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**6,
    }


def _body(rank: int, world: int, stage: int) -> dict:
    from layerfreeze.engines.deepspeed import DeepSpeedRunner
    from layerfreeze.engines.partition import gathered

    model = _model()
    runner = DeepSpeedRunner(model, _cfg(stage), plan=PLAN)
    for s in range(STEPS):
        runner.train_step([_micro(s, m, rank) for m in range(GAS)])
    counts = runner.optimizer_state_numel()
    mod = runner.engine.module
    emb, head = mod.get_input_embeddings(), mod.get_output_embeddings()
    tensors = [emb.weight, head.weight, emb.new_rows_weight, head.new_rows_weight]
    with gathered(tensors):
        out = dict(zip(["emb", "head", "emb_rows", "head_rows"],
                       [t.detach().clone() for t in tensors], strict=True))
    out["counts"] = counts
    out["trainable"] = sorted(n for n, p in mod.named_parameters() if p.requires_grad)
    return out


def _reference() -> dict:
    from layerfreeze.apply import apply_plan

    model = _model().train()
    applied = apply_plan(model, PLAN, log=False)
    opt = torch.optim.AdamW(applied.param_groups(LR, WD), lr=LR, weight_decay=WD, eps=EPS)
    for s in range(STEPS):
        for m in range(GAS):
            for r in range(WORLD):  # mean over ranks and micro-batches, as DeepSpeed reduces
                (model(**_micro(s, m, r)).loss / (GAS * WORLD)).backward()
        opt.step()
        opt.zero_grad()
    return {"emb_rows": model.get_input_embeddings().new_rows_weight.detach(),
            "head_rows": model.get_output_embeddings().new_rows_weight.detach()}


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_only_new_rows_and_holds_state_for_them_only(stage):
    res = run_distributed(_body, world_size=WORLD, args=(stage,))
    ref = _reference()
    base = _model()
    emb0 = base.get_input_embeddings().weight.detach()
    head0 = base.get_output_embeddings().weight.detach()
    n = (VOCAB - FROM) * HIDDEN
    for out in res:
        assert out["trainable"] == ["lm_head.new_rows_weight",
                                    "model.embed_tokens.new_rows_weight"]
        assert torch.equal(out["emb"], emb0) and torch.equal(out["head"], head0)
        assert not torch.equal(out["emb_rows"], emb0[FROM:])
        torch.testing.assert_close(out["emb_rows"], ref["emb_rows"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out["head_rows"], ref["head_rows"], rtol=1e-4, atol=1e-5)
        # ZeRO pads each rank's flat partition by a few elements: allow that, nothing more.
        for key in ("master", "exp_avg", "exp_avg_sq"):
            assert 2 * n <= out["counts"][key] <= 2 * n + 64, (key, out["counts"])
    assert torch.equal(res[0]["emb_rows"], res[1]["emb_rows"])
