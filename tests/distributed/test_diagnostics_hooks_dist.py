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
