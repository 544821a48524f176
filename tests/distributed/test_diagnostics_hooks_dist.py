"""SensitivityHooks on 2 gloo ranks: the reduced numbers equal one process on the union."""

from __future__ import annotations

import pytest
import torch

from layerfreeze.diagnostics.hooks import SensitivityHooks
from layerfreeze.diagnostics.probe import ProbeBatch, collate
from layerfreeze.models import discover_layout
from tests.helpers.dist import run_distributed
from tests.helpers.tiny_models import build_tiny_model

pytestmark = pytest.mark.slow


def _batch(vocab: int, lengths=(8, 6, 8, 5), seed=3) -> ProbeBatch:
    g = torch.Generator().manual_seed(seed)
    ids, mask = collate([torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths])
    return ProbeBatch(ids, mask)


def _train_step(model, batch, lr=0.05):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels)
    out.loss.backward()
    opt.step()
    opt.zero_grad()


def _two_rank_body(rank: int, world: int):
    model = build_tiny_model("llama", num_layers=3, hidden=32)
    layout = discover_layout(model)
    full = _batch(model.config.vocab_size)
    mine = ProbeBatch(
        full.input_ids[2 * rank : 2 * rank + 2], full.attention_mask[2 * rank : 2 * rank + 2]
    )
    hooks = SensitivityHooks(layout, mine)
    hooks.compute(model, 0)
    torch.manual_seed(0)
    _train_step(model, full)  # the same update on both ranks (replicated data parallelism)
    return hooks.compute(model, 1)


def test_hooks_on_two_ranks_equal_the_single_process_numbers_on_the_union():
    results = run_distributed(_two_rank_body, world_size=2)
    assert results[0] == pytest.approx(results[1], rel=1e-9)
    model = build_tiny_model("llama", num_layers=3, hidden=32)
    full = _batch(model.config.vocab_size)
    hooks = SensitivityHooks(discover_layout(model), full)
    hooks.compute(model, 0)
    _train_step(model, full)
    single = hooks.compute(model, 1)
    # each rank holds 2 of the 4 rows; reduced numbers are those of all 4
    assert results[0] == pytest.approx(single, rel=1e-5, abs=1e-9)


def _perturb(model, gather, scale=0.01):
    """Add the same seeded delta to every layer matrix (stands in for a training step)."""
    g = torch.Generator().manual_seed(11)
    for name, p in model.named_parameters():
        if ".layers." in name and len(getattr(p, "ds_shape", p.shape)) >= 2:
            with gather([name], modifier_rank=0):
                p.data.add_(scale * torch.randn(p.shape, generator=g))


def _zero3_body(rank: int, world: int):
    from contextlib import nullcontext

    from layerfreeze.engines.deepspeed import DeepSpeedRunner

    model = build_tiny_model("llama", num_layers=3, hidden=32)
    whole = build_tiny_model("llama", num_layers=3, hidden=32)
    full = _batch(model.config.vocab_size)
    mine = ProbeBatch(
        full.input_ids[2 * rank : 2 * rank + 2], full.attention_mask[2 * rank : 2 * rank + 2]
    )
    measures = ("update_ratio", "drift", "angular")
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**6,
    }
    runner = DeepSpeedRunner(model, cfg, plan="freeze_deep")
    applied_whole_layout = discover_layout(whole)
    for p, q in zip(whole.parameters(), model.parameters(), strict=True):
        q_trainable = q.requires_grad
        p.requires_grad_(q_trainable)  # the same trainable set as the plan gave the ZeRO-3 model
    gather = runner.gathered_parameters
    refused = ""
    try:
        SensitivityHooks(runner.applied.layout, mine).compute(model, 0, gather=gather)
    except RuntimeError as e:
        refused = str(e)
    hooks = SensitivityHooks(runner.applied.layout, mine, measures)
    ref = SensitivityHooks(applied_whole_layout, mine, measures)
    out = [hooks.compute(model, 0, gather=gather)]
    single = [ref.compute(whole, 0)]
    _perturb(model, gather)
    _perturb(whole, lambda names, modifier_rank=None: nullcontext())
    out.append(hooks.compute(model, 1, gather=gather))
    single.append(ref.compute(whole, 1))
    return {"zero3": out, "whole": single, "refused": refused}


def test_hooks_under_zero3_equal_the_whole_model():
    results = run_distributed(_zero3_body, world_size=2)
    for r in results:
        assert "grad_norm needs whole parameters" in r["refused"]
        for got, want in zip(r["zero3"], r["whole"], strict=True):
            assert got.keys() == want.keys()
            assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
        assert r["zero3"][1]["diag/update_ratio/layers.0"] > 0  # trained by freeze_deep
        assert r["zero3"][1]["diag/update_ratio/layers.2"] == 0.0  # frozen
    assert results[0]["zero3"] == results[1]["zero3"]
