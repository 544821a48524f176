"""Every command: results on stdout, diagnostics on stderr, user errors exit 2 with one clear line
and leave nothing behind (issue 10's list of defects, one test each)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from layerfreeze.cli import main
from tests.helpers.cli import error_line
from tests.helpers.tiny_models import build_tiny_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    build_tiny_model("llama", num_layers=4).save_pretrained(str(path))
    return path


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("plan.yaml", "rules: [\n  - {layers: '0-1', policy: full}\n  - a", "line 2, column 3"),
        ("plan.json", '{"rules": [{"layers": "0-1", "policy": "full"}}', "line 1, column 47"),
    ],
)
def test_plan_file_with_a_syntax_error(ckpt, tmp_path, capsys, name, text, where):
    f = tmp_path / name
    f.write_text(text, encoding="utf-8")
    line = error_line(capsys, ["plan", "--model", str(ckpt), "--plan", str(f)])
    assert f"--plan {f}: not valid YAML/JSON at {where}" in line


def test_unknown_preset_in_plan_spec_says_so(tmp_path, capsys):
    cfg = REPO / "configs" / "tiny_llama" / "cpt_freeze_deep_deepspeed.yaml"
    line = error_line(capsys, ["validate", "--config", str(cfg), "plan.spec=freeze_deeep"])
    assert "plan.spec: unknown preset 'freeze_deeep'; presets are full, freeze_deep" in line
    assert "Did you mean 'freeze_deep'?" in line


def test_run_config_with_a_yaml_syntax_error_is_one_line(tmp_path, capsys):
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  family: llama\ntrain: [\n", encoding="utf-8")
    for cmd in ("validate", "train"):
        line = error_line(capsys, [cmd, "--config", str(f)])
        assert f"{f}: not valid YAML at line 4, column 1" in line


def test_tokenizer_user_errors_exit_2_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "tok"
    line = error_line(capsys, ["tokenizer", "train", "--input", str(tmp_path / "nope.txt"),
                                "--vocab-size", "300", "--out", str(out)])
    assert "input[0]: no such file or directory" in line
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    line = error_line(capsys, ["tokenizer", "train", "--input", str(empty), "--vocab-size", "300",
                                "--out", str(out)])
    assert "input: no text found in" in line
    line = error_line(capsys, ["tokenizer", "train", "--input", "@bundled", "--vocab-size", "100",
                                "--out", str(out)])
    assert "vocab_size: must be an integer above 260" in line
    assert sorted(os.listdir(tmp_path)) == ["empty.txt"]


def test_tokenizer_result_on_stdout(tmp_path, capsys):
    out = tmp_path / "tok"
    text = tmp_path / "en.txt"
    words = ["layer", "freeze", "train", "model", "token", "deep", "shallow", "plan"]
    text.write_text("\n\n".join(" ".join(words[(i + j) % 8] for j in range(12))
                                for i in range(200)), encoding="utf-8")
    assert main(["tokenizer", "train", "--input", str(text), "--vocab-size", "360",
                 "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith(f"saved to {out}: ") and "AutoTokenizer.from_pretrained" in cap.out
    assert "saved to" not in cap.err


def test_eval_results_and_subject_list_on_stdout(tmp_path, capsys, eval_data_dir):
    from tests.helpers.eval_fixtures import build_eval_model, cached_tokenizer

    tok = cached_tokenizer()
    model_dir = tmp_path / "m"
    build_eval_model(len(tok)).save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    assert main(["eval", "--benchmark", "ceval", "--data-dir", str(eval_data_dir),
                 "--list-subjects"]) == 0
    cap = capsys.readouterr()
    assert "computer_network" in cap.out and "computer_network" not in cap.err
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(model_dir), "--benchmark", "ceval", "--data-dir",
                 str(eval_data_dir), "--subjects", "computer_network", "--limit", "2",
                 "--shots", "0", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    result = json.loads(out.read_text())
    assert cap.out.splitlines()[0].startswith("ceval val | prompt lm-eval | 0-shot | 2 questions")
    assert "ceval val | prompt" not in cap.err
    assert result["num_questions"] == 2


def test_eval_unloadable_model_is_a_user_error(tmp_path, capsys, eval_data_dir):
    (tmp_path / "m").mkdir()
    line = error_line(capsys, ["eval", "--model", str(tmp_path / "m"), "--benchmark", "ceval",
                                "--data-dir", str(eval_data_dir), "--subjects",
                                "computer_network", "--limit", "1"])
    assert f"--tokenizer {tmp_path / 'm'}: cannot load a tokenizer" in line or \
        f"--model {tmp_path / 'm'}: cannot load" in line


def test_train_with_an_unknown_eval_subject_fails_before_training(ckpt, tmp_path, capsys,
                                                                  eval_data_dir):
    """A typo in eval.subjects once surfaced at the first evaluation, after training, as a
    traceback (exit 1) with the run half-written (no export, no summary)."""
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({
        "model": {"path": str(ckpt)},
        "tokenizer": {"vocab_size": 400},
        "data": {"paths": ["@bundled"], "seq_len": 16},
        "plan": {"spec": "freeze_deep"},
        "train": {"steps": 2, "micro_batch_size": 1},
        "logging": {"out_dir": str(out)},
        "eval": {"data_dir": str(eval_data_dir), "subjects": {"ceval": ["computer_netwrk"]}},
    }), encoding="utf-8")
    line = error_line(capsys, ["train", "--config", str(config)])
    assert line.endswith(
        "eval.subjects: ceval has no subject 'computer_netwrk'. Did you mean "
        "'computer_network'? Run `layerfreeze eval --benchmark ceval --list-subjects` for all "
        "52 names."
    ), line
    assert not out.exists()


@pytest.mark.parametrize("data_dir", ["real", None])
def test_validate_checks_eval_subjects(ckpt, tmp_path, capsys, eval_data_dir, data_dir):
    """validate once said OK to a config whose eval.subjects train would refuse; the subject
    list comes from the data folder's mapping, or the built-in table with data_dir null."""
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({
        "model": {"path": str(ckpt)},
        "data": {"paths": ["@bundled"]},
        "plan": {"spec": "freeze_deep"},
        "eval": {"data_dir": str(eval_data_dir) if data_dir else None,
                 "benchmarks": ["ceval", "cmmlu"],
                 "subjects": {"ceval": ["computer_network"], "cmmlu": ["world_histroy"]}},
    }), encoding="utf-8")
    line = error_line(capsys, ["validate", "--config", str(config)])
    # CMMLU has 67 subjects (the released mapping and the paper).
    assert line.endswith(
        "eval.subjects: cmmlu has no subject 'world_histroy'. Did you mean 'world_history'? "
        "Run `layerfreeze eval --benchmark cmmlu --list-subjects` for all 67 names."
    ), line
