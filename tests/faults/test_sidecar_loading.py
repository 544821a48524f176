"""An export whose adapters cannot be folded into the weights never loads without them.

``export_merged`` keeps gated LoRA, prefixes and their gates in a sidecar. Before: ``layerfreeze
eval`` / ``trace`` / ``prune`` / ``compose`` and every other Hugging Face consumer loaded such an
export as the bare base model, without a word. Now the commands load it through one loader that
re-attaches the sidecar, ``prune`` / ``compose`` carry it (a removed layer's entries go, the rest
are renumbered), and a plain ``from_pretrained`` refuses it (transformers' custom-code
mechanism; ``trust_remote_code=True`` runs the module written into the export, which calls
layerfreeze). Plans that fold fully into the weights still export plain checkpoints.

References are the trained model itself, in memory (the export must reproduce it), and for
prune / compose the same layer surgery done on weights by hand.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from layerfreeze.apply import apply_plan
from layerfreeze.cli import main
from layerfreeze.export import (
    MODELING_FILE,
    PLAN_FILE,
    SIDECAR_FILE,
    export_base_config,
    export_merged,
    load_export,
)
from tests.helpers.cli import error_line
from tests.helpers.tiny_models import TINY_FAMILIES, build_tiny_model, tiny_batch

#: Nothing here merges: gated LoRA, a gated prefix, an ungated prefix, a full layer.
UNMERGEABLE = "0:prefix(tokens=2),1:full,2:lora(r=2,target=mlp,gated),3:prefix(tokens=3,gated)"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train(model, plan):
    applied = apply_plan(model, plan)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # stand-in for training: move every trainable tensor
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return applied


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_plain_from_pretrained_refuses_and_remote_code_gives_the_trained_model(family, tmp_path):
    model = build_tiny_model(family)
    applied = _train(model, UNMERGEABLE)
    ids = tiny_batch(model)
    ref = _logits(model, ids)
    out = export_merged(applied, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "layerfreeze" and (out / MODELING_FILE).is_file()
    assert config["layerfreeze"]["base_model_type"] == model.config.model_type
    # The base weights alone are another model (what a silent load used to give).
    base = AutoModelForCausalLM.from_pretrained(
        str(out), config=export_base_config(out), attn_implementation="eager"
    )
    assert (_logits(base, ids) - ref).abs().max() > 1e-3
    # Plain from_pretrained: transformers refuses (no terminal here to ask), never the base model.
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(str(out))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=False)
    # trust_remote_code=True runs the export's module: the trained model, bit for bit.
    # (eager attention, as the tiny model was built: the kwargs reach the base class)
    remote = AutoModelForCausalLM.from_pretrained(
        str(out), trust_remote_code=True, attn_implementation="eager"
    )
    assert torch.equal(_logits(remote, ids), ref)
    native = load_export(out, attn_implementation="eager")  # the commands' loader
    assert torch.equal(_logits(native, ids), ref)
    # Building the model from its config alone (what a serving engine does before loading the
    # weights itself) would be the base model: refused.
    cfg = AutoConfig.from_pretrained(str(out), trust_remote_code=True)
    with pytest.raises(TypeError, match="built only by from_pretrained"):
        AutoModelForCausalLM.from_config(cfg, trust_remote_code=True)


def test_remote_code_without_layerfreeze_says_so(tmp_path):
    model = build_tiny_model("llama")
    out = export_merged(_train(model, UNMERGEABLE), tmp_path / "export")
    code = (
        "import sys; sys.modules['layerfreeze'] = None\n"  # layerfreeze not installed
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "ImportError: This checkpoint is a layerfreeze export" in proc.stderr
    assert "Install layerfreeze" in proc.stderr


@pytest.mark.parametrize("plan", ["full", "lora_all", "0-1:full,2-3:lora(r=2,target=attn)", "0-3:freeze"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_fully_mergeable_plans_export_a_plain_self_contained_checkpoint(family, plan, tmp_path):
    model = build_tiny_model(family)
    applied = _train(model, plan)
    ids = tiny_batch(model)
    ref = _logits(model, ids)
    out = export_merged(applied, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model.config.model_type
    assert config["architectures"] == [type(model).__name__] and "auto_map" not in config
    assert not (out / MODELING_FILE).exists() and load_file(str(out / SIDECAR_FILE)) == {}
    # no trust_remote_code needed (eager attention, as the tiny model was built)
    plain = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager")
    assert type(plain) is type(model)
    got = _logits(plain, ids)
    if "lora" in plan:  # folded: B A added to W, summed in another order
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got - ref).abs().max()
    else:
        assert torch.equal(got, ref)


# --------------------------------------------------------------------------------------------
# the commands


@pytest.fixture(scope="module")
def hlpt_export(tmp_path_factory):
    """A tiny Llama trained (stand-in) under ``hlpt`` and exported with its tokenizer: nothing
    merges (gated LoRA on layers 0-2, a gated prefix on layer 3)."""
    from tests.helpers.eval_fixtures import build_eval_model, cached_tokenizer

    tok = cached_tokenizer("merged")
    model = build_eval_model(len(tok), num_layers=4, hidden=32, max_positions=512).eval()
    applied = _train(model, "hlpt")
    out = export_merged(applied, tmp_path_factory.mktemp("hlpt") / "export", tokenizer=tok)
    return model.eval(), tok, out


SUBJECTS = "computer_network,college_physics"


@pytest.mark.slow
def test_eval_of_an_hlpt_export_gives_the_trained_models_loglikelihoods(
    hlpt_export, eval_data_dir, tmp_path
):
    from layerfreeze.evaluation.data import load_benchmark
    from layerfreeze.evaluation.runner import evaluate

    model, tok, out = hlpt_export
    bench = load_benchmark("ceval", str(eval_data_dir), None, SUBJECTS.split(","))
    _result, want = evaluate(model, tok, bench, shots=1, batch_size=4, max_questions=3)
    pred = tmp_path / "pred.jsonl"
    assert main(["eval", "--model", str(out), "--benchmark", "ceval", "--data-dir",
                 str(eval_data_dir), "--subjects", SUBJECTS, "--shots", "1", "--limit", "3",
                 "--batch-size", "4", "--predictions", str(pred)]) == 0
    got = [json.loads(line) for line in pred.read_text(encoding="utf-8").splitlines()]
    assert len(got) == len(want) == 6
    assert [g["loglik"] for g in got] == [w["loglik"] for w in want]  # exactly
    base = AutoModelForCausalLM.from_pretrained(str(out), config=export_base_config(out)).eval()
    _r, bare = evaluate(base, tok, bench, shots=1, batch_size=4, max_questions=3)
    pairs = zip(bare, want, strict=True)
    assert max(abs(b["loglik"][k] - w["loglik"][k]) for b, w in pairs for k in "ABCD") > 1e-3


@pytest.mark.slow
def test_trace_of_an_hlpt_export_measures_the_trained_model(hlpt_export, tmp_path, capsys):
    from layerfreeze.commands import trace as trace_cmd
    from layerfreeze.diagnostics.trace import run_trace
    from layerfreeze.evaluation.scoring import default_max_length

    model, tok, out = hlpt_export
    corpus = tmp_path / "probe.txt"
    corpus.write_text("计算机网络 the transport layer 传输层 and TCP 连接 handshake.\n\n" * 40, encoding="utf-8")
    argv = ["--model", str(out), "--probe", str(corpus), "--seq-len", "32", "--max-tokens", "256",
            "--out", str(tmp_path / "trace")]
    parser = argparse.ArgumentParser()
    trace_cmd.add_arguments(parser)
    args = parser.parse_args(argv)
    settings, is_bench = trace_cmd._check(args)
    probe = trace_cmd._build_probe(args, tok, is_bench, default_max_length(model))
    want = json.loads(json.dumps(run_trace(model, probe, settings, progress=False)["layers"]))
    assert main(["trace", *argv]) == 0
    capsys.readouterr()
    got = json.loads((tmp_path / "trace" / "trace.json").read_text(encoding="utf-8"))
    assert got["layers"] == want


def _layer_of(name: str) -> int:
    return int(name.split(".")[2])  # model.layers.<i>.


@pytest.mark.slow
def test_prune_of_an_hlpt_export_keeps_the_other_layers_adapters(hlpt_export, tmp_path, capsys):
    from layerfreeze.diagnostics.prune import remove_layers

    _model, _tok, out = hlpt_export
    pruned = tmp_path / "pruned"
    # deepest: removes layer 2 of 4 (gated LoRA); layer 3 (the prefix) becomes layer 2.
    assert main(["prune", "--model", str(out), "--num-layers", "1", "--strategy", "deepest",
                 "--out", str(pruned), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == [2]
    before, after = load_file(str(out / SIDECAR_FILE)), load_file(str(pruned / SIDECAR_FILE))
    renum = {0: 0, 1: 1, 3: 2}
    want = {
        n.replace(f"layers.{_layer_of(n)}.", f"layers.{renum[_layer_of(n)]}.", 1): t
        for n, t in before.items() if _layer_of(n) != 2
    }
    assert sorted(after) == sorted(want) and all(torch.equal(after[n], want[n]) for n in want)
    plan = json.loads((pruned / PLAN_FILE).read_text())
    assert plan["num_layers"] == 3
    assert [r["policy"] for r in plan["plan"]["rules"]] == ["lora", "lora", "prefix"]
    with pytest.raises(ValueError):
        AutoModelForCausalLM.from_pretrained(str(pruned))  # still guarded
    # Reference: the trained export with layer 2 cut out in memory.
    ref_model = load_export(out)
    remove_layers(ref_model, 2, 1)
    ids = torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(3))
    assert torch.equal(_logits(load_export(pruned), ids), _logits(ref_model, ids))


@pytest.mark.slow
def test_compose_carries_each_layers_sidecar(hlpt_export, tmp_path, capsys):
    model, tok, out = hlpt_export
    plain = tmp_path / "plain"  # another checkpoint of the same shape, without a sidecar
    other = build_tiny_model("llama", num_layers=4, hidden=32, vocab_size=len(tok),
                             max_positions=512, seed=5)
    other.save_pretrained(str(plain))
    composed = tmp_path / "composed"
    assert main(["compose", "--base", "A", "--model", f"A={out}", "--model", f"B={plain}",
                 "--layers", "0-1:B,2-3:A,4:A@3", "--out", str(composed), "--json"]) == 0
    capsys.readouterr()
    side = load_file(str(composed / SIDECAR_FILE))
    assert {_layer_of(n) for n in side} == {2, 3, 4}  # A's layers 2, 3 and 3 again
    src = load_file(str(out / SIDECAR_FILE))
    for n, t in side.items():
        i = _layer_of(n)
        assert torch.equal(t, src[n.replace(f"layers.{i}.", f"layers.{min(i, 3)}.", 1)])
    # Reference for layers 0-3: the trained model with B's layer 0-1 weights copied in and A's
    # LoRA there switched off (lora_b = 0 adds exactly 0).
    ref = load_export(out)
    mine = dict(ref.named_parameters())
    with torch.no_grad():
        for n, p in other.named_parameters():
            if n.startswith(("model.layers.0.", "model.layers.1.")):
                mine[n].copy_(p)
        for n, p in mine.items():
            if n.startswith(("model.layers.0.", "model.layers.1.")) and n.endswith("lora_b"):
                p.zero_()
    four = tmp_path / "four"
    assert main(["compose", "--base", "A", "--model", f"A={out}", "--model", f"B={plain}",
                 "--layers", "0-1:B,2-3:A", "--out", str(four), "--json"]) == 0
    ids = torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(3))
    assert torch.equal(_logits(load_export(four), ids), _logits(ref, ids))
    assert json.loads((composed / "config.json").read_text())["num_hidden_layers"] == 5
    load_export(composed)  # five layers, the sidecar fits


def test_commands_refuse_a_marked_export_without_its_sidecar(hlpt_export, tmp_path, capsys,
                                                             eval_data_dir):
    import shutil

    _model, _tok, out = hlpt_export
    broken = tmp_path / "copied_without_sidecar"
    shutil.copytree(out, broken)
    (broken / SIDECAR_FILE).unlink()
    line = error_line(capsys, ["eval", "--model", str(broken), "--benchmark", "ceval",
                               "--data-dir", str(eval_data_dir), "--subjects", "computer_network",
                               "--limit", "1"])
    assert SIDECAR_FILE in line and "Copy the whole export directory" in line
    line = error_line(capsys, ["prune", "--model", str(broken), "--num-layers", "1",
                               "--strategy", "deepest", "--out", str(tmp_path / "p")])
    assert SIDECAR_FILE in line and not (tmp_path / "p").exists()


def test_training_from_an_export_with_a_sidecar_is_refused(hlpt_export):
    from layerfreeze.config import ModelConfig
    from layerfreeze.errors import ConfigError
    from layerfreeze.modeling import hf_model_config

    _model, _tok, out = hlpt_export
    with pytest.raises(ConfigError, match="model.path: .* is a layerfreeze export"):
        hf_model_config(ModelConfig(path=str(out)))


def test_trace_zero3_refuses_an_export_with_a_sidecar(hlpt_export, tmp_path, capsys):
    _model, _tok, out = hlpt_export
    corpus = tmp_path / "probe.txt"
    corpus.write_text("the transport layer 传输层.\n\n" * 20, encoding="utf-8")
    line = error_line(capsys, ["trace", "--model", str(out), "--zero3", "--probe", str(corpus),
                               "--seq-len", "16", "--max-tokens", "64", "--out", str(tmp_path / "t")])
    assert "--zero3" in line and SIDECAR_FILE in line and not (tmp_path / "t").exists()


@pytest.mark.slow
def test_lm_evaluation_harness_scores_the_trained_model_or_refuses(hlpt_export):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tok, out = hlpt_export
    ctx, cont = "计算机网络 question: the transport layer is", " TCP"
    # Reference: the trained model's log-probability of the continuation tokens.
    whole, n_ctx = tok(ctx + cont)["input_ids"], len(tok(ctx)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    want = sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))
    request = Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=0)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        HFLM(pretrained=str(out), device="cpu", batch_size=1, dtype="float32")
    lm = HFLM(pretrained=str(out), trust_remote_code=True, device="cpu", batch_size=1,
              dtype="float32")
    [(got, _greedy)] = lm.loglikelihood([request])
    assert got == pytest.approx(want, abs=1e-4)


def test_prune_keeps_every_schedule_phases_adapters(tmp_path):
    # A plan schedule installs later phases' adapters too; the sidecar plan.json lists them under
    # "install". Pruning must renumber those as well.
    from layerfreeze.diagnostics.prune import prune_checkpoint, remove_layers

    model = build_tiny_model("qwen2")
    applied = apply_plan(model, "0-1:lora(r=2,gated)", install=["1-3:prefix(tokens=2)"])
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "prefix_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    out = export_merged(applied, tmp_path / "export")
    prune_checkpoint(out, 1, tmp_path / "pruned", strategy="deepest")  # removes layer 2
    meta = json.loads((tmp_path / "pruned" / PLAN_FILE).read_text())
    assert [r["policy"] for r in meta["install"][0]["rules"]] == ["freeze", "prefix", "prefix"]
    ref = load_export(out, attn_implementation="eager")
    remove_layers(ref, 2, 1)
    ids = tiny_batch(model)
    got = load_export(tmp_path / "pruned", attn_implementation="eager")
    assert torch.equal(_logits(got, ids), _logits(ref, ids))


def test_an_unmarked_older_export_without_its_sidecar_is_refused(tmp_path):
    # Exports written before the config marking: plain config.json, plan.json naming adapters.
    # With the sidecar they load with it (load_export); copied without it, they are refused.
    model = build_tiny_model("llama")
    out = export_merged(_train(model, UNMERGEABLE), tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    config["model_type"] = config["layerfreeze"]["base_model_type"]
    config["architectures"] = config["layerfreeze"]["base_architectures"]
    for key in ("layerfreeze", "auto_map"):
        del config[key]
    (out / "config.json").write_text(json.dumps(config))
    (out / MODELING_FILE).unlink()
    ids = tiny_batch(model)
    assert torch.equal(_logits(load_export(out, attn_implementation="eager"), ids), _logits(model, ids))
    (out / SIDECAR_FILE).unlink()
    with pytest.raises(ValueError, match="Copy the whole export directory"):
        load_export(out)


def test_export_command_refuses_an_export_as_its_base(tmp_path, capsys):
    from layerfreeze.export import save_trainable

    out = export_merged(_train(build_tiny_model("llama"), UNMERGEABLE), tmp_path / "export")
    save_trainable(_train(build_tiny_model("llama"), "0-1:lora(r=2)"), tmp_path / "adapter")
    line = error_line(capsys, ["export", "--model", str(out), "--adapter-dir",
                               str(tmp_path / "adapter"), "--format", "merged",
                               "--out", str(tmp_path / "o")])
    assert "not a base checkpoint" in line and not (tmp_path / "o").exists()
