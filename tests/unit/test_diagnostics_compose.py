"""Hybrid models: layer maps, compatibility checks, the ``compose`` CLI on Llama, Qwen2, GPT-2."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from layerfreeze.cli import main
from layerfreeze.diagnostics.compose import LayerOrigin, parse_layer_map
from layerfreeze.errors import ConfigError
from tests.helpers.tiny_models import build_tiny_model, tiny_batch

FAMILIES = ["llama", "qwen2", "gpt2"]


def _blocks(model):
    return model.transformer.h if model.config.model_type == "gpt2" else model.model.layers


def _save(path, family, seed, **kwargs):
    model = build_tiny_model(family, num_layers=4, seed=seed, **kwargs)
    model.save_pretrained(str(path))
    return model


def test_parse_layer_map():
    sizes = {"A": 4, "B": 4}
    o = parse_layer_map("0-1:A,2-3:B", sizes)
    assert o == [LayerOrigin("A", 0), LayerOrigin("A", 1), LayerOrigin("B", 2), LayerOrigin("B", 3)]
    o = parse_layer_map("0-3:A, 4-5:B@0-1", sizes)
    assert [(x.source, x.index) for x in o] == [
        ("A", 0),
        ("A", 1),
        ("A", 2),
        ("A", 3),
        ("B", 0),
        ("B", 1),
    ]
    o = parse_layer_map(
        [{"layers": "0-1", "from": "B"}, {"layers": "2", "from": "A", "source_layers": "3"}], sizes
    )
    assert [(x.source, x.index) for x in o] == [("B", 0), ("B", 1), ("A", 3)]


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("0-2:A,2-3:B", r"output layer 2 is also given by --layers\[0\] 0-2:A"),
        ("0-1:A,3:B", r"output layers \[2\] are not given"),
        ("0-1:A,2-3:C", r"unknown source 'C'. Named sources: A, B"),
        ("0-1:A,2-3:B@0-2", "2 output layers but 3 source layers"),
        ("0-1:A,2-5:B", r"source B has 4 layers \(valid 0-3\), got layer 5"),
        ("0-1A", "expected RANGE:SOURCE"),
        ("3-1:A", "before its start"),
        ("", "empty"),
    ],
)
def test_parse_layer_map_errors(spec, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_layer_map(spec, {"A": 4, "B": 4})


@pytest.mark.parametrize("family", FAMILIES)
def test_compose_two_checkpoints_reloads_and_generates(family, tmp_path, capsys):
    a = _save(tmp_path / "a", family, seed=0)
    b = _save(tmp_path / "b", family, seed=1)
    out = tmp_path / "hybrid"
    rc = main(
        [
            "compose",
            "--base",
            "A",
            "--model",
            f"A={tmp_path / 'a'}",
            "--model",
            f"B={tmp_path / 'b'}",
            "--layers",
            "0-1:A,2-3:B",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "0-1  A" in stdout and "2-3  B" in stdout
    report = json.loads((out / "compose.json").read_text())
    assert [(r["source"], r["source_layer"]) for r in report["layers"]] == [
        ("A", 0),
        ("A", 1),
        ("B", 2),
        ("B", 3),
    ]

    hybrid = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    got = hybrid.state_dict()
    # independent reference: model A with B's layers 2-3 loaded over its own
    ref = build_tiny_model(family, num_layers=4, seed=0)
    for i in (2, 3):
        _blocks(ref)[i].load_state_dict(_blocks(b)[i].state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(got[k], v), k
    ids = tiny_batch(hybrid, batch=2, seq=7)
    with torch.no_grad():
        torch.testing.assert_close(hybrid(ids).logits, ref(ids).logits, rtol=0, atol=1e-6)
        assert not torch.allclose(hybrid(ids).logits, a(ids).logits)
        gen = hybrid.generate(ids[:, :3], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(
            gen, ref.generate(ids[:, :3], max_new_tokens=4, do_sample=False, pad_token_id=0)
        )


def test_depth_upscaling_from_a_map_file(tmp_path, capsys):
    a = _save(tmp_path / "a", "qwen2", seed=0)
    b = _save(tmp_path / "b", "qwen2", seed=1)
    spec = tmp_path / "map.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "base": "A",
                "models": {"A": "a", "B": "b"},
                "layers": [
                    {"layers": "0-3", "from": "A"},
                    {"layers": "4-5", "from": "B", "source_layers": "2-3"},
                    {"layers": "6", "from": "A", "source_layers": "3"},
                ],
            }
        )
    )
    out = tmp_path / "up"
    assert main(["compose", "--map", str(spec), "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_layers"] == 7
    up = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    assert up.config.num_hidden_layers == 7 and len(up.config.layer_types) == 7
    sd = up.state_dict()
    pairs = [(0, a, 0), (3, a, 3), (4, b, 2), (5, b, 3), (6, a, 3)]
    for j, src, i in pairs:
        for k, v in _blocks(src)[i].state_dict().items():
            assert torch.equal(sd[f"model.layers.{j}.{k}"], v), (j, k)
    assert [blk.self_attn.layer_idx for blk in up.model.layers] == list(range(7))
    ids = tiny_batch(up, batch=1, seq=6)
    with torch.no_grad():
        out_ids = up.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out_ids.shape == (1, 9)


def _bad(capsys, tmp_path, args):
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert main(["compose", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    return err[0]


@pytest.mark.parametrize(
    ("other", "key"),
    [
        (dict(family="llama", hidden=32, num_heads=2, num_kv_heads=1), "hidden_size"),
        (dict(family="llama", num_kv_heads=4), "num_key_value_heads"),
        (dict(family="llama", vocab_size=96), "vocab_size"),
        (dict(family="qwen2"), "model_type"),
    ],
)
def test_incompatible_checkpoints_exit_2_naming_both(other, key, tmp_path, capsys):
    _save(tmp_path / "a", "llama", seed=0)
    family = other.pop("family")
    _save(tmp_path / "b", family, seed=1, **other)
    msg = _bad(
        capsys,
        tmp_path,
        [
            "--base",
            "A",
            "--model",
            f"A={tmp_path / 'a'}",
            "--model",
            f"B={tmp_path / 'b'}",
            "--layers",
            "0-1:A,2-3:B",
            "--out",
            str(tmp_path / "h"),
        ],
    )
    assert f"{tmp_path / 'a'}" in msg and f"{tmp_path / 'b'}" in msg and key in msg


def test_bad_input_exits_2(tmp_path, capsys):
    _save(tmp_path / "a", "llama", seed=0)
    a = f"A={tmp_path / 'a'}"
    out = str(tmp_path / "h")
    assert "--base" in _bad(
        capsys, tmp_path, ["--base", "Z", "--model", a, "--layers", "0-3:A", "--out", out]
    )
    assert "gaps" in _bad(
        capsys, tmp_path, ["--base", "A", "--model", a, "--layers", "0-1:A,3:A", "--out", out]
    )
    assert "no config.json" in _bad(
        capsys,
        tmp_path,
        ["--base", "A", "--model", f"A={tmp_path / 'nope'}", "--layers", "0:A", "--out", out],
    )
    assert "NAME=PATH" in _bad(
        capsys, tmp_path, ["--base", "A", "--model", "A", "--layers", "0:A", "--out", out]
    )
    assert "already exists" in _bad(
        capsys,
        tmp_path,
        ["--base", "A", "--model", a, "--layers", "0:A", "--out", str(tmp_path / "a")],
    )
