"""``run_trace`` on a DeepSpeed ZeRO-3 model over 2 gloo ranks: the same numbers as one process
with the whole model, weights restored after the noise passes, gradient/stability refused."""

from __future__ import annotations

import copy

import pytest
import torch

from layerfreeze.diagnostics.probe import ProbeBatch, ProbeSet, collate
from layerfreeze.diagnostics.trace import TraceSettings, run_trace
from tests.helpers.dist import run_distributed
from tests.helpers.tiny_models import build_tiny_model

pytestmark = pytest.mark.slow

_KEYS = ("layers", "representation", "logit_lens", "sensitivity")


def _probe(vocab: int) -> ProbeSet:
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (8, 6, 7, 8, 5)]
    batches = []
    for i in range(0, len(rows), 2):
        ids, mask = collate(rows[i : i + 2])
        batches.append(ProbeBatch(ids, mask))
    return ProbeSet("text", batches, {"kind": "text"})


def _body(rank: int, world: int):
    from layerfreeze.engines.deepspeed import DeepSpeedRunner

    model = build_tiny_model("llama", num_layers=3, hidden=32)
    whole = copy.deepcopy(model)
    probe = _probe(model.config.vocab_size)
    settings = TraceSettings(
        measures=("angular", "cka", "logit_lens", "skip", "noise"), noise_scales=(0.0, 0.1)
    )
    single = run_trace(whole, probe, settings)
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**6,
    }
    runner = DeepSpeedRunner(model, cfg, plan="full")
    partitioned = any(p.numel() != getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    sharded = run_trace(runner.eval_model(), probe, settings, gather=runner.gathered_parameters)
    refused = ""
    try:
        run_trace(
            runner.eval_model(),
            probe,
            TraceSettings(measures=("gradient",)),
            gather=runner.gathered_parameters,
        )
    except ValueError as e:
        refused = str(e)
    state = runner.consolidated_state_dict()
    restored = None
    if state is not None:
        ref = whole.state_dict()
        restored = all(torch.equal(state[k], ref[k]) for k in ref)
    return {
        "partitioned": partitioned,
        "single": {k: single[k] for k in _KEYS},
        "sharded": {k: sharded[k] for k in _KEYS},
        "num_params": (single["model"]["num_params"], sharded["model"]["num_params"]),
        "refused": refused,
        "restored": restored,
    }


def test_zero3_trace_equals_the_whole_model_trace():
    results = run_distributed(_body, world_size=2)
    for r in results:
        assert r["partitioned"]
        assert r["num_params"][0] == r["num_params"][1]
        single, sharded = r["single"], r["sharded"]
        for a, b in zip(single["layers"], sharded["layers"], strict=True):
            assert a.keys() == b.keys()
            for k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
        assert sharded["sensitivity"]["noise"]["0"] == [0.0, 0.0, 0.0]
        assert sharded["logit_lens"]["loss"] == pytest.approx(
            single["logit_lens"]["loss"], rel=1e-5
        )
        assert "gradient need whole parameters" in r["refused"]
    assert results[0]["restored"] is True
    assert results[0]["sharded"]["layers"] == results[1]["sharded"]["layers"]
