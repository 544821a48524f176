"""``layerfreeze plan``: meta-device planning from a checkpoint dir or a config.json."""

from __future__ import annotations

import json

import pytest

from layerfreeze.apply import apply_plan
from layerfreeze.cli import main
from tests.helpers.tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    build_tiny_model("llama", num_layers=8).save_pretrained(str(path))
    return path


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_json_matches_a_real_model(ckpt, capsys):
    data = _json(capsys, ["plan", "--model", str(ckpt), "--preset", "hlpt", "--preset-arg", "r=4",
                          "--preset-arg", "tokens=2", "--json"])
    real = apply_plan(build_tiny_model("llama", num_layers=8), "hlpt(r=4,tokens=2)").summary().to_dict()
    assert data["num_layers"] == 8
    assert data["total_params"] == real["total_params"] and data["trainable_params"] == real["trainable_params"]
    assert [r["index"] for r in data["layers"]] == list(range(8))
    for got, want in zip(data["layers"], real["layers"]):
        assert {k: got[k] for k in ("index", "policy", "trainable_params", "total_params")} == \
               {k: want[k] for k in ("index", "policy", "trainable_params", "total_params")}
    for part in ("embeddings", "final_norm", "lm_head"):
        assert data[part]["total_params"] == real[part]["total_params"] and data[part]["policy"] == "freeze"
    assert data["layers"][0]["policy"].startswith("lora(") and data["layers"][7]["policy"].startswith("prefix(")


def test_config_json_and_plan_string_table(ckpt, capsys):
    assert main(["plan", "--model", str(ckpt / "config.json"), "--plan", "0-3:full,embeddings:full"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: 0-3:full,embeddings:full")
    assert "layer" in out.splitlines()[1] and out.rstrip().splitlines()[-1].startswith("total")


def test_plan_file_and_schedule(ckpt, tmp_path, capsys):
    f = tmp_path / "plan.yaml"
    f.write_text("rules:\n  - {layers: '0-1', policy: lora, r: 2}\nembeddings: full\n")
    data = _json(capsys, ["plan", "--model", str(ckpt), "--plan", str(f), "--json"])
    assert data["embeddings"]["trainable_params"] == data["embeddings"]["total_params"] > 0
    s = tmp_path / "sched.yaml"
    s.write_text("- {plan: full, until_step: 100}\n- {plan: freeze_deep, until_step: null}\n")
    data = _json(capsys, ["plan", "--model", str(ckpt), "--plan", str(s), "--json"])
    assert [p["until_step"] for p in data["phases"]] == [100, None]
    assert data["phases"][0]["trainable_params"] == data["phases"][0]["total_params"]


def test_large_config_on_meta(tmp_path, capsys):
    cfg = dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
               num_key_value_heads=8, intermediate_size=28672, vocab_size=32000)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    data = _json(capsys, ["plan", "--model", str(tmp_path / "config.json"), "--preset", "freeze_deep", "--json"])
    h, kv, i, v = 8192, 8 * 128, 28672, 32000
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # hand count of a Llama-2-70B layer
    assert data["num_layers"] == 80 and data["layers"][0]["total_params"] == layer
    assert data["total_params"] == 80 * layer + 2 * v * h + h
    assert data["trainable_params"] == 40 * layer + v * h


@pytest.mark.parametrize("argv,needle", [
    (["--preset", "hlptt"], "unknown preset 'hlptt'"),
    (["--plan", "0-99:full"], "out of range for a 8-layer model"),
    (["--plan", "missing.yaml"], "no such file"),
    (["--plan", "0-1:full", "--preset-arg", "x=1"], "only valid with --preset"),
])
def test_errors_exit_2(ckpt, argv, needle, caplog):
    import logging

    records = []
    h = logging.Handler()
    h.emit = records.append
    logging.getLogger("layerfreeze.plan").addHandler(h)
    try:
        assert main(["plan", "--model", str(ckpt), *argv]) == 2
    finally:
        logging.getLogger("layerfreeze.plan").removeHandler(h)
    assert any(needle in r.getMessage() for r in records), [r.getMessage() for r in records]


def test_bad_model_path(tmp_path):
    assert main(["plan", "--model", str(tmp_path / "nope"), "--preset", "full"]) == 2
    (tmp_path / "c.json").write_text("{}")
    assert main(["plan", "--model", str(tmp_path / "c.json"), "--preset", "full"]) == 2


@pytest.mark.parametrize(
    ("model_type", "hint"),
    [("lama", "Did you mean 'llama'?"),
     ("nonexistent_arch", "Use a decoder-only type such as llama, qwen2, mistral or gpt2.")],
)
def test_unknown_model_type_in_a_config_file_is_one_short_line(tmp_path, capsys, model_type, hint):
    """An unknown model_type once printed transformers' list of ~900 types on one line."""
    import transformers

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": model_type, "num_hidden_layers": 2}), encoding="utf-8")
    assert main(["plan", "--model", str(cfg), "--preset", "full"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(
        f"--model {cfg}: unknown model_type {model_type!r} (transformers "
        f"{transformers.__version__} has no config class for it). {hint}"
    ), err
