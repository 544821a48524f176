"""Aggregation (micro/macro per category), submission JSON, the callback and the eval command."""

from __future__ import annotations

import argparse
import json
import logging

import pytest
import torch

from layerfreeze.errors import ConfigError
from layerfreeze.evaluation.config import EvalConfig
from layerfreeze.evaluation.data import Benchmark, Question, Subject, load_benchmark
from layerfreeze.evaluation.report import flat_metrics, format_summary, submission_json, summarize
from layerfreeze.utils.schema import from_dict
from tests.helpers.eval_fixtures import build_eval_model, cached_tokenizer


def _bench() -> Benchmark:
    def subj(name, cats, answers):
        qs = [Question(name, i, str(i), "q", ("a", "b", "c", "d"), a) for i, a in enumerate(answers)]
        return Subject(name, name, cats, qs, [])

    return Benchmark("cmmlu", "test", [
        subj("s1", ("STEM",), "AAAA"),
        subj("s2", ("Humanities", "China specific"), "AB"),
        subj("s3", ("STEM",), "ABCDABCD"),
    ], "mem")


def _records(bench, preds):
    return [{"subject": s.name, "index": q.index, "id": q.id, "pred": p, "gold": q.answer}
            for s in bench.subjects
            for q, p in zip(s.questions, preds[s.name], strict=True)]


def test_micro_and_macro_by_formula():
    b = _bench()
    # s1: 3/4 correct, s2: 1/2, s3: 2/8
    recs = _records(b, {"s1": "AAAB", "s2": "AA", "s3": "AAAAAAAA"})
    r = summarize(b, recs, shots=5, prompt="lm-eval")
    assert r["subjects"]["s1"]["acc"] == 0.75 and r["subjects"]["s3"]["acc"] == 0.25
    assert r["overall"]["acc_micro"] == pytest.approx((3 + 1 + 2) / 14)
    assert r["overall"]["acc_macro"] == pytest.approx((0.75 + 0.5 + 0.25) / 3)
    assert r["categories"]["STEM"]["acc_micro"] == pytest.approx(5 / 12)
    assert r["categories"]["STEM"]["acc_macro"] == pytest.approx(0.5)
    assert r["categories"]["China specific"]["acc_macro"] == 0.5  # a subject in two categories
    assert list(r["categories"]) == ["STEM", "Humanities", "China specific"]
    assert r["leaderboard_metric"] == "acc_macro"
    m = flat_metrics(r)
    assert m["eval/cmmlu/acc_macro"] == pytest.approx(0.5)
    assert m["eval/cmmlu/China_specific"] == 0.5
    assert "overall" in format_summary(r, per_subject=True)


def test_submission_json_format(eval_data_dir):
    b = load_benchmark("ceval", eval_data_dir, "test", ["law", "logic"])
    recs = [{"subject": s.name, "index": q.index, "id": q.id, "pred": "ABCD"[q.index % 4],
             "gold": None} for s in b.subjects for q in s.questions]
    sub = submission_json(recs)
    assert list(sub) == ["law", "logic"]
    assert all(isinstance(k, str) and v in "ABCD" for d in sub.values() for k, v in d.items())
    assert len(sub["law"]) == len(b.subject("law").questions)
    assert sub["law"]["0"] == "A" and sub["law"]["5"] == "B"
    r = summarize(b, [dict(x, pred=x["pred"]) for x in recs], 5, "lm-eval")
    assert r["overall"]["acc_macro"] is None and flat_metrics(r) == {
        "eval/ceval/num_questions": float(b.num_questions)
    }
    json.dumps(sub)


def test_eval_config_strict():
    cfg = from_dict(EvalConfig, {"every_steps": 10, "benchmarks": ["ceval", "cmmlu"],
                                 "subjects": {"ceval": ["law"]}}, "eval")
    assert cfg.split_for("ceval") == "val" and cfg.split_for("cmmlu") == "test"
    with pytest.raises(ConfigError) as e:
        from_dict(EvalConfig, {"benchmarks": ["ceval", "mmlu"], "shots": 7, "prompt": "x",
                               "splits": {"ceval": "test"}, "every_step": 3}, "eval")
    text = str(e.value)
    assert "eval.every_step: unknown key. Did you mean 'every_steps'?" in text


def test_eval_config_value_checks():
    with pytest.raises(ConfigError) as e:
        EvalConfig(benchmarks=["ceval", "mmlu"], shots=7, prompt="x", splits={"ceval": "test"},
                   batch_size=0, subjects={"cmmlu": ["a"]})
    p = "\n".join(e.value.problems)
    for part in ("eval.benchmarks: unknown benchmark, got 'mmlu'", "eval.shots: must be 0-5",
                 "eval.prompt: unknown prompt format", "C-Eval test has no answers",
                 "eval.batch_size: must be >= 1", "eval.subjects.cmmlu: not in eval.benchmarks"):
        assert part in p


def test_callback_schedule_files_and_modes(eval_data_dir, tmp_path):
    torch.set_num_threads(1)
    tok = cached_tokenizer("merged")
    model = build_eval_model(len(tok))
    model.train()
    cfg = EvalConfig(every_steps=2, benchmarks=["ceval", "cmmlu"], data_dir=str(eval_data_dir),
                     subjects={"ceval": ["basic_medicine"], "cmmlu": ["agronomy"]}, shots=1,
                     max_questions=3, batch_size=4)
    from layerfreeze.evaluation.callback import EvalCallback

    cb = EvalCallback(cfg, tok, tmp_path / "eval")
    seen = {}

    def hook(mod, args, out):
        seen["training"] = mod.training
        seen["grad"] = torch.is_grad_enabled()

    h = model.register_forward_hook(hook)
    assert cb.maybe_run(1, model) is None
    m = cb.maybe_run(2, model)
    h.remove()
    assert seen == {"training": False, "grad": False}
    assert model.training  # restored
    assert set(m) >= {"eval/ceval/acc_macro", "eval/ceval/acc_micro", "eval/cmmlu/acc_macro",
                      "eval/ceval/Other", "eval/seconds"}
    assert cb.maybe_run(2, model) is None  # already evaluated
    assert cb.maybe_run(3, model, force=True) is not None
    step2 = json.loads((tmp_path / "eval" / "step_00000002.json").read_text("utf-8"))
    assert step2["results"]["ceval"]["num_questions"] == 3
    cb.finalize()
    assert (tmp_path / "eval" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "eval" / "summary.md").read_text("utf-8")
    assert "| 2 |" in table and "| 3 |" in table


def test_eval_command_end_to_end(eval_data_dir, tmp_path):
    torch.set_num_threads(1)
    tok = cached_tokenizer("merged")
    model = build_eval_model(len(tok))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    from layerfreeze.commands import eval as eval_cmd

    parser = argparse.ArgumentParser()
    eval_cmd.add_arguments(parser)
    args = parser.parse_args([
        "--model", str(tmp_path / "model"), "--benchmark", "ceval", "--data-dir",
        str(eval_data_dir), "--subjects", "basic_medicine,plant_protection", "--limit", "4",
        "--shots", "2", "--out", str(tmp_path / "r.json"), "--predictions",
        str(tmp_path / "p.jsonl"), "--batch-size", "3",
    ])
    assert eval_cmd.run(args) == 0
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text("utf-8").splitlines()]
    assert len(lines) == 8
    assert set(lines[0]) >= {"benchmark", "subject", "index", "pred", "gold", "loglik"}
    assert [x["index"] for x in lines[:4]] == [0, 1, 2, 3]
    for x in lines:
        ll = x["loglik"]
        assert x["pred"] == max("ABCD", key=lambda k: (ll[k], -"ABCD".index(k)))
    result = json.loads((tmp_path / "r.json").read_text("utf-8"))
    correct = sum(x["pred"] == x["gold"] for x in lines)
    assert result["overall"]["acc_micro"] == pytest.approx(correct / 8)
    # The C-Eval test split writes the official submission file.
    args = parser.parse_args([
        "--model", str(tmp_path / "model"), "--benchmark", "ceval", "--data-dir",
        str(eval_data_dir), "--split", "test", "--subjects", "basic_medicine", "--limit", "3",
        "--shots", "0", "--submission", str(tmp_path / "sub.json"),
    ])
    assert eval_cmd.run(args) == 0
    sub = json.loads((tmp_path / "sub.json").read_text("utf-8"))
    assert list(sub) == ["basic_medicine"] and list(sub["basic_medicine"]) == ["0", "1", "2"]


def test_eval_command_user_errors(eval_data_dir, tmp_path, caplog):
    from layerfreeze.commands import eval as eval_cmd

    parser = argparse.ArgumentParser()
    eval_cmd.add_arguments(parser)
    (tmp_path / "m").mkdir()
    cases = [
        (["--benchmark", "ceval"], "--model: required"),
        (["--benchmark", "ceval", "--model", str(tmp_path / "nope")], "--model: not a directory"),
        (["--benchmark", "ceval", "--model", str(tmp_path / "m"), "--data-dir",
          str(eval_data_dir), "--subjects", "lawx"], "Did you mean 'law'?"),
        (["--benchmark", "cmmlu", "--model", str(tmp_path / "m"), "--data-dir",
          str(eval_data_dir), "--subjects", "agronomy", "--shots", "6"], "--shots: must be 0-5"),
    ]
    lf_logger = logging.getLogger("layerfreeze")  # may not propagate (setup_logging)
    lf_logger.addHandler(caplog.handler)
    try:
        for argv, msg in cases:
            caplog.clear()
            assert eval_cmd.run(parser.parse_args(argv)) == 2
            assert msg in caplog.text, (argv, caplog.text)
    finally:
        lf_logger.removeHandler(caplog.handler)
