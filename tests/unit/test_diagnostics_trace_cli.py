"""Probe sets and ``layerfreeze trace`` end to end on a tiny saved model; bad input exits 2."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from layerfreeze.cli import main as cli_main
from layerfreeze.diagnostics.probe import build_choice_probe, build_text_probe
from layerfreeze.evaluation.data import load_benchmark
from layerfreeze.evaluation.prompts import build_context
from tests.helpers.eval_fixtures import build_eval_model, cached_tokenizer, cached_tokenizer_dir

TEXT = (
    "以下是中国关于考试的单项选择题 请选出其中的正确答案 直接给出选项 题目 答案是\n" * 20
    + "layerfreeze traces every layer of the model on a probe set.\n" * 10
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny Llama with the evaluation tests' tokenizer, saved as a HF checkpoint."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("trace")
    tok = cached_tokenizer("merged")
    model = build_eval_model(len(tok), num_layers=3, hidden=32, max_positions=2048)
    model.save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(str(cached_tokenizer_dir("merged"))).save_pretrained(
        root / "model"
    )
    (root / "probe.txt").write_text(TEXT, encoding="utf-8")
    (root / "blank.txt").write_text("  \n\n  ", encoding="utf-8")
    return root


# ------------------------------------------------------------------------------ probes


def test_text_probe_chunks_and_caps_tokens(saved):
    tok = cached_tokenizer("merged")
    ids = tok.encode(TEXT)
    probe = build_text_probe([saved / "probe.txt"], tok, max_tokens=100, seq_len=32, batch_size=2)
    rows = [
        r[m.bool()].tolist()
        for b in probe.batches
        for r, m in zip(b.input_ids, b.attention_mask, strict=True)
    ]
    assert sum(len(r) for r in rows) == probe.num_tokens == 100
    assert [len(r) for r in rows] == [32, 32, 32, 4]
    assert sum(rows, []) == ids[:100]  # a small file is one tokenizer call
    assert probe.identity["files"][0]["sha256"]
    jsonl = saved / "p.jsonl"
    jsonl.write_text('{"text": "abc def"}\n\n{"text": "ghi"}\n', encoding="utf-8")
    probe = build_text_probe([jsonl], tok, max_tokens=1000)
    assert probe.num_sequences == 2


def test_text_probe_errors(saved):
    tok = cached_tokenizer("merged")
    with pytest.raises(ValueError, match="empty probe set"):
        build_text_probe([saved / "blank.txt"], tok)
    with pytest.raises(ValueError, match="no such file"):
        build_text_probe([saved / "missing.txt"], tok)


def test_choice_probe_uses_the_evaluation_prompts(eval_data_dir):
    tok = cached_tokenizer("merged")
    probe = build_choice_probe(
        "ceval", tok, eval_data_dir, ["computer_network"], max_tokens=400, batch_size=4
    )
    bench = load_benchmark("ceval", eval_data_dir, "val", ["computer_network"])
    subject = bench.subjects[0]
    n = probe.num_sequences
    assert n >= 2 and probe.identity["subjects"] == {"computer_network": n}
    letters = [tok.encode(f"x答案： {x}")[-1] for x in "ABCD"]
    k = 0
    for b in probe.batches:
        for i in range(b.input_ids.shape[0]):
            q = subject.questions[k]
            ctx = tok.encode(build_context("ceval", subject, q, 0, "lm-eval"))
            length = int(b.attention_mask[i].sum())
            assert b.input_ids[i, :length].tolist() == ctx
            assert int(b.answer_pos[i]) == length - 1
            assert b.choice_ids[i].tolist() == letters
            assert "ABCD"[int(b.gold[i])] == q.answer
            k += 1


# ------------------------------------------------------------------------------ CLI


def _run(args, capsys):
    rc = cli_main(["trace", *map(str, args)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_cli_text_probe_end_to_end(saved, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, _ = _run(
        [
            "--model",
            saved / "model",
            "--probe",
            saved / "probe.txt",
            "--max-tokens",
            200,
            "--seq-len",
            50,
            "--batch-size",
            2,
            "--noise-scales",
            "0,0.1",
            "--stability-steps",
            2,
            "--out",
            out,
            "--recommend",
            "--budget",
            0.4,
            "--family",
            "freeze",
        ],
        capsys,
    )
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert {
        "trace.json",
        "layers.csv",
        "angular_mean.csv",
        "angular_last_token.csv",
        "angular_heatmap.png",
        "logit_lens.png",
        "sensitivity.png",
        "stability.png",
        "plan.yaml",
        "recommendation.json",
    } <= names
    data = json.loads((out / "trace.json").read_text())
    assert data["model"]["num_layers"] == 3 and data["model"]["path"]
    assert data["probe"]["num_tokens"] == 200 and data["probe"]["files"]
    assert data["settings"]["noise_scales"] == [0.0, 0.1]
    assert data["sensitivity"]["noise"]["0"] == [0.0, 0.0, 0.0]
    assert len(data["representation"]["angular"]["mean"]) == 3
    assert data["recommendation"]["family"] == "freeze"
    with open(out / "layers.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["layer"] for r in rows] == ["0", "1", "2"]
    assert float(rows[1]["skip"]) == pytest.approx(data["sensitivity"]["skip"][1])
    assert "d(l,1)" in stdout and "recommended plan" in stdout
    assert (out / "angular_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    # both stabilities, each named for what it measures, in the JSON, the CSV and the table
    assert "whole-model" in data["stability"]["measure"]
    assert data["layer_stability"]["mode"] == "perturb" and data["layer_stability"]["scale"] == 0.05
    assert float(rows[2]["layer_stability"]) == pytest.approx(
        data["layer_stability"]["output_change"][2]
    )
    assert "drift(all)" in stdout and "dY/Y(alone)" in stdout
    assert data["recommendation"]["score"]["weights"] == {
        "lens": 0.4,
        "sensitivity": 0.3,
        "stability": 0.3,
    }


def test_cli_score_weights_and_layer_stability_steps(saved, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, _ = _run(
        [
            "--model", saved / "model", "--probe", saved / "probe.txt", "--max-tokens", 100,
            "--seq-len", 50, "--measures", "skip,layer_stability", "--layer-stability", "steps",
            "--stability-steps", 1, "--out", out, "--recommend", "--budget", 1.0,
            "--score-weights", "stability=1",
        ],
        capsys,
    )
    assert rc == 0
    data = json.loads((out / "trace.json").read_text())
    iso = data["layer_stability"]
    assert iso["mode"] == "steps" and iso["steps"] == 1 and "trained" in iso["measure"]
    score = data["recommendation"]["score"]
    assert score["weights_used"] == {"stability": 1.0}
    assert data["recommendation"]["boundary"] >= 1 and "score cut at layer" in stdout


def test_cli_ceval_probe(saved, tmp_path, capsys, eval_data_dir):
    out = tmp_path / "ceval"
    rc, stdout, _ = _run(
        [
            "--model",
            saved / "model",
            "--probe",
            "ceval",
            "--data-dir",
            eval_data_dir,
            "--subjects",
            "computer_network,law",
            "--max-tokens",
            800,
            "--measures",
            "angular,logit_lens,skip",
            "--out",
            out,
        ],
        capsys,
    )
    assert rc == 0
    data = json.loads((out / "trace.json").read_text())
    assert data["probe"]["benchmark"] == "ceval" and data["probe"]["kind"] == "choice"
    lens = data["logit_lens"]
    assert len(lens["accuracy"]) == 3 and "decodable_layer" in lens and "decodable_rule" in lens
    assert all(0 <= p <= 1 for p in lens["gold_choice_prob"])
    assert "stability" not in data and "answer decodable from layer" in stdout


@pytest.mark.parametrize(
    "case",
    [
        "empty_probe",
        "unknown_measure",
        "missing_model",
        "out_exists",
        "budget_alone",
        "tiny_budget",
        "bad_subject",
    ],
)
def test_cli_bad_input_exits_2_with_one_line_and_nothing_written(
    saved, tmp_path, capsys, case, eval_data_dir
):
    out = tmp_path / "out"
    args = [
        "--model",
        saved / "model",
        "--probe",
        saved / "probe.txt",
        "--max-tokens",
        64,
        "--out",
        out,
    ]
    expect = {
        "empty_probe": "empty probe set",
        "unknown_measure": "unknown measure 'skipp'",
        "missing_model": "--model: not a Hugging Face model directory",
        "out_exists": "already exists",
        "budget_alone": "--budget: only used with --recommend",
        "tiny_budget": "--budget: 1e-05 of",
        "bad_subject": "has no subject 'nope'",
    }[case]
    if case == "empty_probe":
        args[3] = saved / "blank.txt"
    elif case == "unknown_measure":
        args += ["--measures", "angular,skipp"]
    elif case == "missing_model":
        args[1] = tmp_path / "nope"
    elif case == "out_exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "budget_alone":
        args += ["--budget", 0.5]
    elif case == "tiny_budget":
        args += ["--recommend", "--budget", 1e-5]
    elif case == "bad_subject":
        args[3:4] = ["ceval", "--data-dir", eval_data_dir, "--subjects", "nope"]
    rc, _, err = _run(args, capsys)
    assert rc == 2
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and expect in errors[0], err
    if case == "out_exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
