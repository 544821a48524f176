"""``layerfreeze train`` with ``tokenizer.extend_from``: extend, resize, ``new_rows(from_id=auto)``.

A tiny Llama (untied head) saved with a Llama-2-style SentencePiece tokenizer trained on English
only is the base; the run extends the tokenizer on the bundled Chinese text, resizes the model,
trains the new rows and layer 0, checkpoints, resumes, and exports. Expected rows come from the
subtoken-mean formula written here (old tokenizer's sub-tokens of each new id's string).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from layerfreeze.config import load_config
from tests.faults._train import last_line, tiny_config, train, write_config
from tests.helpers.tokenizer_fixtures import build_llama2_style, build_qwen_style, bundled

ARCH = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128,
)


def make_base(root: Path, build=build_llama2_style, tie: bool = False) -> Path:
    """A tiny base checkpoint whose tokenizer (saved beside it) knows English only."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    base = build(root / "base")
    tok = AutoTokenizer.from_pretrained(str(base))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), tie_word_embeddings=tie, **ARCH))
    model.save_pretrained(str(base))
    return base


def run_config(root: Path, base: Path, **sections) -> Path:
    cfg = tiny_config(root / "run", root / "cache")
    cfg["model"] = {"path": str(base), "attn_implementation": "eager"}
    cfg["tokenizer"] = {"extend_from": str(base), "vocab_size": 1200}
    cfg["data"]["paths"] = [str(bundled("zh.txt"))]
    cfg["plan"] = {
        "spec": "0:full,embeddings:new_rows(from_id=auto),lm_head:new_rows(from_id=auto)"
    }
    cfg["checkpoint"].update({"export_final": True, "every_steps": 2})
    cfg["train"]["steps"] = 2
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return write_config(root / "run.yaml", cfg)


def subtoken_mean(weight: torch.Tensor, old, new, i: int) -> torch.Tensor:
    ids = old.encode(new.decode([i]), add_special_tokens=False)
    return weight[ids].float().mean(0) if ids else weight[: len(old)].float().mean(0)


@pytest.fixture(scope="module")
def extended_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("extend_run")
    base = make_base(root)
    config = run_config(root, base)
    first = train(config, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    return root, base, config, first


def test_auto_from_id_is_base_length(tmp_path):
    """``from_id=auto`` resolves to len(base tokenizer) in the run's schedule (and validate)."""
    from transformers import AutoTokenizer

    from layerfreeze.train import build_schedule

    base = make_base(tmp_path)
    cfg = load_config(run_config(tmp_path, base))
    plan = build_schedule(cfg).plans[0].resolve(2, path="plan.spec")
    n = len(AutoTokenizer.from_pretrained(str(base)))
    assert plan.embeddings.options.from_id == n
    assert plan.lm_head.options.from_id == n


@pytest.mark.slow
def test_train_extends_resizes_and_trains_new_rows(extended_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, base, _config, _ = extended_run
    out = root / "run"
    old = AutoTokenizer.from_pretrained(str(base))
    new = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    n_old, n_new = len(old), len(new)
    assert n_new > n_old  # the tokenizer grew
    assert all(new.get_vocab()[t] == i for t, i in old.get_vocab().items())  # old ids kept
    report = json.loads((out / "tokenizer" / "layerfreeze_vocab_extend.json").read_text())
    assert report["first_new_id"] == n_old and report["new_size"] == n_new
    assert report["tokens_per_zh_char_after"] < report["tokens_per_zh_char_before"]

    base_model = AutoModelForCausalLM.from_pretrained(str(base))
    export = AutoModelForCausalLM.from_pretrained(str(out / "export"))
    exp_tok = AutoTokenizer.from_pretrained(str(out / "export"))
    assert exp_tok.get_vocab() == new.get_vocab()  # the extended tokenizer beside the weights
    assert export.config.vocab_size == n_new
    for get in ("get_input_embeddings", "get_output_embeddings"):
        before = getattr(base_model, get)().weight.detach()
        after = getattr(export, get)().weight.detach()
        assert after.shape[0] == n_new
        assert torch.equal(after[:n_old], before)  # old rows bit-identical after training
        init = torch.stack([subtoken_mean(before, old, new, i) for i in range(n_old, n_new)])
        moved = (after[n_old:].float() - init).abs().amax(dim=1)
        assert (moved > 0).float().mean() > 0.9  # the new rows trained
        assert moved.max() < 0.1  # ... from the subtoken-mean start (2 steps, lr 3e-3)
    # layer 1 frozen, layer 0 trained
    sd_b, sd_e = base_model.state_dict(), export.state_dict()
    up = "model.layers.{}.mlp.up_proj.weight"
    assert torch.equal(sd_b[up.format(1)], sd_e[up.format(1)])
    assert not torch.equal(sd_b[up.format(0)], sd_e[up.format(0)])


@pytest.mark.slow
def test_resume_reuses_tokenizer_and_resized_model(extended_run):
    """A restart with more steps reuses <out>/tokenizer (not retrained) and resumes from the
    step-2 checkpoint onto the same resized model."""
    root, _base, config, _ = extended_run
    tok_dir = root / "run" / "tokenizer"
    stamp = {p.name: p.stat().st_mtime_ns for p in tok_dir.iterdir()}
    again = train(config, "train.steps=3", timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing the tokenizer extended earlier" in again.stderr
    assert "resumed from" in again.stderr and "at step 2" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in tok_dir.iterdir()} == stamp


@pytest.mark.slow
def test_restart_with_other_extension_settings_refused(extended_run):
    root, _base, config, _ = extended_run
    r = train(config, "train.steps=4", "tokenizer.vocab_size=1300", timeout=600)
    assert r.returncode == 2
    line = last_line(r.stderr)
    assert "tokenizer.vocab_size:" in line and "vocab_size=1200" in line and "1300" in line


@pytest.mark.slow
def test_qwen_style_base_tied_head_mean_init(tmp_path):
    """Byte-level BPE base, tied head, resize_init=mean: every new row starts at the old rows'
    mean; old rows stay bit-identical through training and export."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = make_base(tmp_path, build=build_qwen_style, tie=True)
    config = run_config(
        tmp_path, base, tokenizer={"resize_init": "mean"},
        plan={"spec": "0:full,embeddings:new_rows(from_id=auto)"},
        checkpoint={"every_steps": 0},
    )
    r = train(config, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "run"
    old = AutoTokenizer.from_pretrained(str(base))
    new = AutoTokenizer.from_pretrained(str(out / "export"))
    n_old = len(old)
    assert len(new) > n_old
    before = AutoModelForCausalLM.from_pretrained(str(base)).get_input_embeddings().weight
    export = AutoModelForCausalLM.from_pretrained(str(out / "export"))
    after = export.get_input_embeddings().weight
    assert export.get_output_embeddings().weight.data_ptr() == after.data_ptr()  # still tied
    assert torch.equal(after[:n_old], before.detach())
    mean = before.detach().float().mean(0)
    moved = (after[n_old:].detach().float() - mean).abs().amax(dim=1)
    assert (moved > 0).all() and moved.max() < 0.1


@pytest.mark.slow
def test_resume_with_other_resize_init_refused(extended_run):
    """The checkpoint records the resize (the extended vocabulary and its init): frozen rows of
    a resumed run come from model.path + resize, so another init must not slip in."""
    root, _base, config, _ = extended_run
    r = train(config, "train.steps=5", "tokenizer.resize_init=mean", timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    line = last_line(r.stderr)
    assert line.count("vocab_resize_init") >= 1 and "subtoken_mean" in line and "'mean'" in line


@pytest.mark.slow
def test_export_loads_through_layerfreeze_loader(extended_run):
    """The merged export of a new-rows plan is self-contained (rows merged, sidecar empty):
    ``layerfreeze eval`` / ``trace`` load it (load_causal_lm), not refuse it as missing adapters."""
    from layerfreeze.export import sidecar_info
    from layerfreeze.modeling import load_causal_lm

    export = extended_run[0] / "run" / "export"
    assert sidecar_info(export) == (0, None)
    from transformers import AutoTokenizer

    model = load_causal_lm(export)
    n_new = len(AutoTokenizer.from_pretrained(str(export)))
    assert model.get_input_embeddings().weight.shape[0] == n_new


@pytest.mark.slow
def test_zero3_run_keeps_old_rows(tmp_path):
    """ZeRO-3 partitions the model after the resize: the export still has old rows
    bit-identical and the extended vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = make_base(tmp_path)
    config = run_config(tmp_path, base, checkpoint={"every_steps": 0})
    r = train(config, "deepspeed.zero_optimization.stage=3", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    export = tmp_path / "run" / "export"
    n_old = len(AutoTokenizer.from_pretrained(str(base)))
    n_new = len(AutoTokenizer.from_pretrained(str(export)))
    before = AutoModelForCausalLM.from_pretrained(str(base))
    after = AutoModelForCausalLM.from_pretrained(str(export))
    for get in ("get_input_embeddings", "get_output_embeddings"):
        w0, w1 = getattr(before, get)().weight.detach(), getattr(after, get)().weight.detach()
        assert w1.shape[0] == n_new > n_old
        assert torch.equal(w1[:n_old], w0)
