"""Pruning (Gromov et al.): block choice, layer removal, config fixes, the ``prune`` CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from layerfreeze.cli import main
from layerfreeze.diagnostics.angular import AngularDistances, trace_angular
from layerfreeze.diagnostics.prune import choose_block, remove_layers
from tests.helpers.tiny_models import build_tiny_model, tiny_batch

FAMILIES = ["llama", "qwen2", "gpt2"]
VOCAB = (
    400  # the smallest SentencePiece vocabulary the project trains (4 special + 256 bytes + ...)
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from layerfreeze.data import train_tokenizer
    from layerfreeze.data.corpus import default_corpus_files

    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer([default_corpus_files()[0]], out, vocab_size=VOCAB)
    return out


def zero_layer(model, index: int) -> None:
    """Zero the output projections of a layer: its residual contribution is exactly 0."""
    with torch.no_grad():
        if model.config.model_type == "gpt2":
            block = model.transformer.h[index]
            for lin in (block.attn.c_proj, block.mlp.c_proj):
                lin.weight.zero_()
                lin.bias.zero_()
        else:
            block = model.model.layers[index]
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()


def save_tiny(path, family, tokenizer_dir, zero=None, **kwargs):
    from layerfreeze.data.tokenizer import load_tokenizer

    model = build_tiny_model(family, num_layers=4, vocab_size=VOCAB, **kwargs)
    if zero is not None:
        zero_layer(model, zero)
    model.save_pretrained(str(path))
    load_tokenizer(str(tokenizer_dir)).save_pretrained(str(path))
    return model


def _distances(matrix: list[list[float]]) -> AngularDistances:
    p = len(matrix)
    m = torch.tensor(matrix, dtype=torch.float64)
    m = torch.where(torch.triu(torch.ones(p, p, dtype=torch.bool), 1), m, torch.nan)
    return AngularDistances(p, 10, 2, m, m.clone())


def test_choose_block_angular_and_deepest():
    nan = math.nan
    d = _distances(
        [
            [nan, 0.3, 0.5, 0.6, 0.7],
            [nan, nan, 0.2, 0.4, 0.5],
            [nan, nan, nan, 0.1, 0.3],
            [nan, nan, nan, nan, 0.2],
            [nan, nan, nan, nan, nan],
        ]
    )
    c = choose_block(4, 1, "angular", d)
    assert (c.start, c.end, c.distance) == (2, 3, pytest.approx(0.1))
    assert c.scores == pytest.approx([0.3, 0.2, 0.1, 0.2])
    c = choose_block(4, 2, "angular", d)  # d(0,2)=.5 d(1,2)=.4 d(2,2)=.3
    assert (c.start, c.distance) == (2, pytest.approx(0.3))
    c = choose_block(4, 2, "deepest", d)  # the two layers before the last: 1, 2
    assert (c.start, c.end, c.distance) == (1, 3, pytest.approx(0.4))
    c = choose_block(4, 3, "deepest")
    assert (c.start, c.distance, c.scores) == (0, None, [])
    ties = _distances([[nan, 0.2, 0.9], [nan, nan, 0.2], [nan, nan, nan]])
    assert choose_block(2, 1, "angular", ties).start == 0  # ties: the shallowest block


def test_choose_block_errors():
    with pytest.raises(ValueError, match="valid 1-3"):
        choose_block(4, 4, "deepest")
    with pytest.raises(ValueError, match="valid 1-3"):
        choose_block(4, 0, "deepest")
    with pytest.raises(ValueError, match="needs angular distances"):
        choose_block(4, 1, "angular")
    with pytest.raises(ValueError, match="unknown strategy"):
        choose_block(4, 1, "random")


@pytest.mark.parametrize("family", FAMILIES)
def test_zeroed_layer_is_chosen_and_pruning_keeps_the_logits(family):
    model = build_tiny_model(family, num_layers=4, vocab_size=VOCAB)
    zero_layer(model, 2)
    ids = tiny_batch(model, batch=2, seq=10)
    with torch.no_grad():
        before = model(ids).logits
        gen_before = model.generate(ids[:, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
    dist = trace_angular(model, [ids])
    assert dist.d(2, 1) == 0.0 and dist.d(2, 1, last_token=True) == 0.0
    choice = choose_block(4, 1, "angular", dist)
    assert (choice.start, choice.distance) == (2, 0.0)
    kept = remove_layers(model, choice.start, choice.n)
    assert kept == [0, 1, 3]
    assert model.config.num_hidden_layers == 3
    layers = model.transformer.h if family == "gpt2" else model.model.layers
    attn = [(blk.attn if family == "gpt2" else blk.self_attn) for blk in layers]
    assert [a.layer_idx for a in attn] == [0, 1, 2]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-6)
        # generation with the KV cache indexes layers by layer_idx: same tokens as before
        gen = model.generate(ids[:, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, gen_before)


def test_qwen2_sliding_window_lists_follow_their_layers():
    from transformers import Qwen2Config

    cfg = Qwen2Config(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    zero_layer(model, 1)
    ids = tiny_batch(model, batch=1, seq=12)
    with torch.no_grad():
        before = model(ids).logits
    remove_layers(model, 1, 1)
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert model.config.max_window_layers == 1
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_cli_saves_a_checkpoint_that_reloads_and_generates(
    family, tmp_path, tokenizer_dir, capsys
):
    src, out = tmp_path / "src", tmp_path / "pruned"
    original = save_tiny(src, family, tokenizer_dir, zero=1)
    rc = main(
        [
            "prune",
            "--model",
            str(src),
            "--num-layers",
            "1",
            "--out",
            str(out),
            "--max-tokens",
            "600",
            "--seq-len",
            "40",
        ]
    )
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "removed layers 1-1, distance 0.0000" in stdout and "<- removed" in stdout
    report = json.loads((out / "prune.json").read_text())
    assert report["removed"] == [1] and report["kept"] == [0, 2, 3] and report["distance"] == 0.0
    assert report["num_layers_after"] == 3 and report["probe"]["tokens"] == 600
    assert len(report["scores"]) == 4 and min(report["scores"]) == report["scores"][1] == 0.0
    assert {"tokenizer.json", "config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    pruned = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    assert pruned.config.num_hidden_layers == 3
    ids = tiny_batch(VOCAB, batch=2, seq=9)
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, original(ids).logits, rtol=0, atol=1e-6)
        gen = pruned.generate(ids[:, :3], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert gen.shape == (2, 8)
    assert torch.equal(
        gen, original.generate(ids[:, :3], max_new_tokens=5, do_sample=False, pad_token_id=0)
    )


def test_prune_deepest_without_probe(tmp_path, tokenizer_dir, capsys):
    src, out = tmp_path / "src", tmp_path / "pruned"
    save_tiny(src, "llama", tokenizer_dir)
    assert (
        main(
            [
                "prune",
                "--model",
                str(src),
                "--num-layers",
                "2",
                "--out",
                str(out),
                "--strategy",
                "deepest",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["removed"] == [1, 2] and report["kept"] == [0, 3] and report["distance"] is None
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.num_hidden_layers == 2


def _bad(capsys, tmp_path, args):
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert main(["prune", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing left behind
    return err[0]


def test_bad_input_exits_2_and_writes_nothing(tmp_path, tokenizer_dir, capsys):
    src, out = tmp_path / "src", tmp_path / "pruned"
    save_tiny(src, "llama", tokenizer_dir)
    common = ["--model", str(src), "--out", str(out)]
    msg = _bad(capsys, tmp_path, [*common, "--num-layers", "4"])
    assert "--num-layers" in msg and "valid 1-3" in msg
    msg = _bad(capsys, tmp_path, [*common, "--num-layers", "9", "--strategy", "deepest"])
    assert "--num-layers" in msg
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    msg = _bad(capsys, tmp_path, [*common, "--num-layers", "1", "--probe", str(empty)])
    assert "probe" in msg and "empty" in msg
    msg = _bad(
        capsys, tmp_path, [*common, "--num-layers", "1", "--probe", str(tmp_path / "nope.txt")]
    )
    assert "nope.txt" in msg
    msg = _bad(
        capsys,
        tmp_path,
        ["--model", str(tmp_path / "nomodel"), "--out", str(out), "--num-layers", "1"],
    )
    assert "nomodel" in msg and "config.json" in msg
    msg = _bad(capsys, tmp_path, ["--model", str(src), "--out", str(src), "--num-layers", "1"])
    assert "already exists" in msg


def test_prune_with_a_ceval_probe(tmp_path, eval_data_dir, capsys):
    # The C-Eval probe needs single-token answer letters: the evaluation tests' tokenizer. (The
    # corpus-trained one above spells ' B' as '▁' + 'B'; this test used to pass with it only
    # because AutoTokenizer loaded it next to a qwen2 config as Qwen2Tokenizer, other ids.)
    from tests.helpers.eval_fixtures import cached_tokenizer

    src, out = tmp_path / "src", tmp_path / "pruned"
    model = build_tiny_model("qwen2", num_layers=4, vocab_size=len(cached_tokenizer("merged")))
    zero_layer(model, 2)
    model.save_pretrained(str(src))
    cached_tokenizer("merged").save_pretrained(str(src))
    assert (
        main(
            [
                "prune",
                "--model",
                str(src),
                "--num-layers",
                "1",
                "--out",
                str(out),
                "--json",
                "--probe",
                "ceval",
                "--data-dir",
                str(eval_data_dir),
                "--subjects",
                "computer_network",
                "--max-tokens",
                "2000",
                "--seq-len",
                "100",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["removed"] == [2] and report["distance"] == 0.0
    ident = report["probe"]["identity"]
    assert ident["benchmark"] == "ceval" and report["probe"]["tokens"] <= 2000
    assert report["probe"]["sequences"] >= 2


def test_docs_example_runs(repo_root, tmp_path, monkeypatch):
    import re

    text = (repo_root / "docs" / "diagnostics-prune.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(blocks[0], "docs/diagnostics-prune.md", "exec"), namespace)
    choice = namespace["choice"]
    assert choice.distance == min(choice.scores)
    assert namespace["model"].config.num_hidden_layers == 3
