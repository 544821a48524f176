"""Sharded evaluation over 2 gloo ranks equals single-process evaluation; forwards stay aligned."""

from __future__ import annotations

import pytest

from tests.helpers.dist import run_distributed
from tests.helpers.eval_fixtures import cached_tokenizer_dir

SUBJECTS = ["basic_medicine", "plant_protection", "art_studies"]


def _evaluate(rank: int, world_size: int, data_dir: str, limits: dict[str, int], tok_dir: str):
    import torch
    from transformers import AutoTokenizer

    from layerfreeze.evaluation.data import load_benchmark
    from layerfreeze.evaluation.runner import build_requests, evaluate
    from layerfreeze.evaluation.scoring import Scorer
    from tests.helpers.eval_fixtures import build_eval_model

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = build_eval_model(len(tok))
    bench = load_benchmark("ceval", data_dir, "val", SUBJECTS)
    for s in bench.subjects:  # uneven shares: ranks plan different numbers of batches
        s.questions = s.questions[: limits[s.name]]
    _, reqs = build_requests(tok, bench, shots=2, rank=rank, world_size=world_size)
    planned = len(Scorer(model, batch_size=2).plan(reqs))
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    result, records = evaluate(model, tok, bench, shots=2, batch_size=2)
    return {"result": result, "records": records, "forwards": len(calls), "planned": planned}


@pytest.mark.slow
def test_two_ranks_equal_single_process(eval_data_dir):
    limits = {"basic_medicine": 7, "plant_protection": 4, "art_studies": 1}
    tok_dir = str(cached_tokenizer_dir("merged"))
    single = _evaluate(0, 1, str(eval_data_dir), limits, tok_dir)
    ranks = run_distributed(_evaluate, world_size=2, args=(str(eval_data_dir), limits, tok_dir))
    # The ranks planned different amounts of work but made the same number of forward calls
    # (dummy forwards pad the shorter one: ZeRO-3 gathers parameters inside every forward).
    assert ranks[0]["planned"] != ranks[1]["planned"]
    assert ranks[0]["forwards"] == ranks[1]["forwards"] == max(r["planned"] for r in ranks)
    # Both ranks hold all records, in the same order as the single process.
    for r in ranks:
        assert [(x["subject"], x["index"]) for x in r["records"]] == [
            (x["subject"], x["index"]) for x in single["records"]
        ]
    for got, ref in zip(ranks[0]["records"], single["records"], strict=True):
        for k in "ABCD":
            assert got["loglik"][k] == pytest.approx(ref["loglik"][k], abs=1e-4)
        if got["pred"] != ref["pred"]:
            ll = ref["loglik"]
            assert abs(ll[got["pred"]] - ll[ref["pred"]]) < 1e-4
    assert ranks[0]["result"]["overall"] == pytest.approx(single["result"]["overall"])
    assert ranks[0]["result"]["world_size"] == 2


def _evaluate_zero3(rank: int, world_size: int, data_dir: str, limits: dict[str, int],
                    tok_dir: str):
    import deepspeed
    import torch
    from transformers import AutoTokenizer

    from layerfreeze.evaluation.data import load_benchmark
    from layerfreeze.evaluation.runner import evaluate
    from tests.helpers.eval_fixtures import build_eval_model

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = build_eval_model(len(tok))
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "zero_optimization": {"stage": 3},
        "steps_per_print": 10**6,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=cfg)
    # Parameters are really partitioned: each rank holds an empty local tensor.
    assert all(p.numel() == 0 for p in engine.module.parameters())
    bench = load_benchmark("ceval", data_dir, "val", SUBJECTS)
    for s in bench.subjects:
        s.questions = s.questions[: limits[s.name]]
    engine.train()
    result, records = evaluate(engine, tok, bench, shots=2, batch_size=2)
    assert engine.training  # the train mode is restored
    return {"result": result, "records": records}


@pytest.mark.slow
def test_zero3_partitioned_model_uneven_shards(eval_data_dir):
    """Under ZeRO-3 ranks with different work finish without deadlock and match one process."""
    limits = {"basic_medicine": 5, "plant_protection": 2, "art_studies": 1}
    tok_dir = str(cached_tokenizer_dir("merged"))
    single = _evaluate(0, 1, str(eval_data_dir), limits, tok_dir)
    ranks = run_distributed(_evaluate_zero3, world_size=2,
                            args=(str(eval_data_dir), limits, tok_dir), timeout=300)
    got = ranks[0]["records"]
    assert [(x["subject"], x["index"]) for x in got] == [
        (x["subject"], x["index"]) for x in single["records"]
    ]
    for g, ref in zip(got, single["records"], strict=True):
        for k in "ABCD":
            assert g["loglik"][k] == pytest.approx(ref["loglik"][k], abs=1e-4)
