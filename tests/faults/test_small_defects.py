"""Small defects of issue #14, each checked against an independent fact.

* the end-of-run adapter hint is a real ``layerfreeze export`` command (parsed by its own
  argparser and run), printed only for plans a PEFT adapter can hold;
* ``plan.spec=FILE`` (a config override or YAML value) reads the plan file, as ``layerfreeze
  plan --plan FILE`` does, and the run records the file's content;
* the logit lens values in ``trace.json`` are what their label and docs/diagnostics.md say
  (lens on layer i's output), recomputed from transformers' hidden states;
* PEFT's ``base_model_name_or_path`` is absolute for a local checkpoint, a hub id is kept;
* every file a weight-writing command creates gets the umask's mode (0644 under 022), not
  safetensors' 0600.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from layerfreeze import apply_plan
from layerfreeze.cli import build_parser
from layerfreeze.cli import main as cli_main
from layerfreeze.config import load_config
from layerfreeze.errors import ConfigError
from layerfreeze.export import save_trainable
from layerfreeze.interop.peft import export_peft
from tests.helpers.tiny_models import build_tiny_model

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------
# end-of-run hint


def adapter_export_hint(*args):
    from layerfreeze.train import adapter_export_hint as hint

    return hint(*args)


def _hint_command(hint: str) -> list[str] | None:
    m = re.search(r"`(layerfreeze export [^`]*)`", hint)
    return shlex.split(m.group(1)) if m else None


def test_adapter_hint_is_a_command_export_accepts_and_runs(tmp_path, capsys):
    base = tmp_path / "base dir"  # a space: the command must quote it
    model = build_tiny_model("llama", num_layers=2)
    model.save_pretrained(str(base))
    applied = apply_plan(model, "lora_all")
    adapter = tmp_path / "run" / "adapter"
    save_trainable(applied, adapter)
    hint = adapter_export_hint(applied, adapter, str(base))
    argv = _hint_command(hint)
    assert argv is not None and argv[:2] == ["layerfreeze", "export"], hint
    args = build_parser().parse_args(argv[1:])  # exits 2 on an unknown option such as --base-model
    assert args.format == "peft" and Path(args.model) == base and Path(args.adapter_dir) == adapter
    assert cli_main(argv[1:]) == 0
    out = Path(capsys.readouterr().out.strip())
    assert (out / "adapter_config.json").is_file()


@pytest.mark.parametrize("plan", ["0:lora(gated=true),1:freeze", "0:prefix,1:freeze"])
def test_adapter_hint_names_no_peft_command_for_plans_peft_cannot_hold(tmp_path, plan):
    model = build_tiny_model("llama", num_layers=2)
    model.save_pretrained(str(tmp_path / "base"))  # a real base: only the plan rules it out
    applied = apply_plan(model, plan)
    hint = adapter_export_hint(applied, tmp_path / "adapter", str(tmp_path / "base"))
    assert "adapter (trained tensors + plan)" in hint and "peft" not in hint, hint


def test_adapter_hint_without_a_base_checkpoint_names_no_command(tmp_path):
    applied = apply_plan(build_tiny_model("llama", num_layers=2), "lora_all")
    hint = adapter_export_hint(applied, tmp_path / "adapter", None)
    assert _hint_command(hint) is None and str(tmp_path / "adapter") in hint


# --------------------------------------------------------------------------------------------
# plan.spec=FILE


def _run_yaml(tmp_path) -> Path:
    arch = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump({"model": {"architecture": arch}, "plan": {"spec": "freeze_deep"}}))
    return p


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_plan_spec_override_reads_a_plan_file(tmp_path, suffix):
    content = {"rules": [{"layers": "0-1", "policy": "full"},
                         {"layers": "2-3", "policy": "lora", "r": 4}]}
    f = tmp_path / f"plan{suffix}"
    f.write_text(json.dumps(content) if suffix == ".json" else yaml.safe_dump(content))
    cfg = load_config(_run_yaml(tmp_path), [f"plan.spec={f}"])
    assert cfg.plan.spec == content  # what the run records (config.yaml is to_dict(cfg))
    # the same through the YAML config, and through the validate command
    data = yaml.safe_load(_run_yaml(tmp_path).read_text())
    data["plan"]["spec"] = str(f)
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(data))
    assert load_config(tmp_path / "b.yaml").plan.spec == content
    assert cli_main(["validate", "--config", str(_run_yaml(tmp_path)), f"plan.spec={f}"]) == 0


def test_plan_spec_file_with_phases_becomes_the_schedule(tmp_path):
    phases = [{"plan": "full", "until_step": 2}, {"plan": "freeze_deep", "until_step": None}]
    f = tmp_path / "phases.yaml"
    f.write_text(yaml.safe_dump(phases))
    cfg = load_config(_run_yaml(tmp_path), [f"plan.spec={f}"])
    assert cfg.plan.spec is None and cfg.plan.schedule == phases


def test_plan_spec_file_errors_name_the_key_and_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"plan\.spec: no such plan file, got '.*missing\.yaml'"):
        load_config(_run_yaml(tmp_path), [f"plan.spec={tmp_path / 'missing.yaml'}"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers: [unclosed\n")
    with pytest.raises(ConfigError, match=r"plan\.spec: .*bad\.yaml.* not valid YAML/JSON"):
        load_config(_run_yaml(tmp_path), [f"plan.spec={bad}"])
    # a string that is neither a plan nor a plan file says where files go
    with pytest.raises(ConfigError, match=r"\.yaml, \.yml or \.json"):
        load_config(_run_yaml(tmp_path), ["plan.spec=plans/my_plan.txt"])


# --------------------------------------------------------------------------------------------
# trace.json lens labels vs docs vs the numbers


def test_lens_values_are_layer_outputs_as_labelled_and_documented(tmp_path):
    from layerfreeze.diagnostics import TraceSettings, build_text_probe, run_trace
    from tests.helpers.eval_fixtures import build_eval_model, cached_tokenizer

    tokenizer = cached_tokenizer("merged")
    model = build_eval_model(len(tokenizer), num_layers=3, hidden=32, max_positions=512).eval()
    text = (REPO / "layerfreeze" / "data" / "corpus" / "en.txt").read_text()[:2000]
    (tmp_path / "p.txt").write_text(text)
    probe = build_text_probe([tmp_path / "p.txt"], tokenizer, max_tokens=256, seq_len=64,
                             batch_size=4)
    lens = run_trace(model, probe, TraceSettings(measures=("logit_lens",)))["logit_lens"]

    # independent: transformers' hidden states; hidden_states[i + 1] is layer i's output (the
    # last entry is after the final norm, so the last layer's lens is the model's own logits)
    nll_sum, count = torch.zeros(4, dtype=torch.float64), 0
    with torch.no_grad():
        for batch in probe.batches:
            ids, mask = batch.input_ids, batch.attention_mask
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            hs = out.hidden_states
            logits = [model.lm_head(model.model.norm(h)) for h in hs[:-1]] + [out.logits]
            valid = mask[:, 1:].bool()
            for p, lg in enumerate(logits):
                nll = F.cross_entropy(lg[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                      reduction="none").view_as(valid)
                nll_sum[p] += nll[valid].double().sum()
            count += int(valid.sum())
    want = (nll_sum / count).tolist()
    assert lens["embeddings_loss"] == pytest.approx(want[0], rel=1e-4)
    assert lens["loss"] == pytest.approx(want[1:], rel=1e-4)  # value[i]: layer i's output
    assert "layer i's output" in lens["points"]
    docs = (REPO / "docs" / "diagnostics.md").read_text()
    assert "`logit_lens.loss[i]`" in docs and "layer `i`'s output" in docs


# --------------------------------------------------------------------------------------------
# PEFT base_model_name_or_path


def test_peft_records_an_absolute_base_path_and_keeps_a_hub_id(tmp_path, monkeypatch, capsys):
    model = build_tiny_model("llama", num_layers=2)
    (tmp_path / "ckpt").mkdir()
    model.save_pretrained(str(tmp_path / "ckpt" / "base"))
    applied = apply_plan(model, "lora_all")
    save_trainable(applied, tmp_path / "adapter")
    monkeypatch.chdir(tmp_path)
    assert cli_main(["export", "--model", "ckpt/base", "--adapter-dir", "adapter",
                     "--format", "peft", "--out", "peft"]) == 0
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tmp_path / "ckpt" / "base")
    out = export_peft(applied, tmp_path / "hub", base_model_name_or_path="org/model-7b")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "org/model-7b"
    )


# --------------------------------------------------------------------------------------------
# file modes


def _wrong_modes(root: Path, umask: int) -> list[str]:
    want = 0o666 & ~umask
    bad = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            mode = stat.S_IMODE(p.stat().st_mode)
            if mode & want != want:  # missing read/write bits a plain open() would give
                bad.append(f"{oct(mode)} {p.relative_to(root)}")
    return bad


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o022
    os.umask(old)


def test_export_prune_compose_and_tokenizer_outputs_get_the_umask_mode(tmp_path, umask_022):
    from layerfreeze.data import train_tokenizer
    from layerfreeze.data.corpus import default_corpus_files
    from layerfreeze.data.tokenizer import load_tokenizer

    tok = train_tokenizer([default_corpus_files()[0]], tmp_path / "tok", vocab_size=400)
    base = tmp_path / "base"
    model = build_tiny_model("llama", num_layers=4, vocab_size=400, max_positions=256)
    model.save_pretrained(str(base))
    load_tokenizer(str(tok)).save_pretrained(str(base))
    os.chmod(base / "model.safetensors", 0o644)  # transformers' own write: not ours to judge
    applied = apply_plan(model, "lora_all")
    save_trainable(applied, tmp_path / "adapter")
    for fmt in ("peft", "merged"):
        assert cli_main(["export", "--model", str(base), "--adapter-dir", str(tmp_path / "adapter"),
                         "--format", fmt, "--out", str(tmp_path / f"export_{fmt}")]) == 0
    assert cli_main(["prune", "--model", str(base), "--num-layers", "1", "--out",
                     str(tmp_path / "pruned"), "--max-tokens", "300", "--seq-len", "30"]) == 0
    assert cli_main(["compose", "--base", "A", "--model", f"A={base}", "--layers",
                     "0-1:A,2-3:A@0-1", "--out", str(tmp_path / "composed")]) == 0
    assert _wrong_modes(tmp_path, umask_022) == []


# --------------------------------------------------------------------------------------------
# the real `layerfreeze train` (DeepSpeed, one rank): checkpoints, adapter, merged export, hint,
# plan.spec=FILE recorded as its content


@pytest.mark.slow
def test_train_run_outputs_modes_hint_and_plan_file(tmp_path, umask_022, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.e2e.test_train_cli import TINY_ARCH, _config, _train, _write

    base = tmp_path / "base"
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(
        AutoConfig.for_model(**dict(TINY_ARCH, vocab_size=1000))
    ).save_pretrained(base)
    os.chmod(base / "model.safetensors", 0o644)  # transformers' write, not ours
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump({"preset": "lora_all"}))
    out = tmp_path / "run"
    cfg = _config(out, tmp_path / "cache")
    cfg["model"] = {"path": str(base)}
    cfg["train"].update(steps=2, grad_accum_steps=1)
    cfg["checkpoint"] = {"every_steps": 1}
    cfg["logging"].pop("wandb_project")
    proc = _train(_write(tmp_path / "run.yaml", cfg), f"plan.spec={plan_file}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["plan"]["spec"] == {"preset": "lora_all"}  # the file's content, not its name
    hint = next(line for line in proc.stderr.splitlines() if "adapter (trained tensors" in line)
    argv = _hint_command(hint)
    assert argv is not None, hint
    build_parser().parse_args(argv[1:])
    assert cli_main(argv[1:]) == 0
    peft_dir = Path(capsys.readouterr().out.strip())
    assert (peft_dir / "adapter_model.safetensors").is_file()
    assert list(out.glob("checkpoints/step_*/**/*.safetensors"))
    assert _wrong_modes(tmp_path, umask_022) == []
