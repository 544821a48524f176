"""Saving the trainable state and exporting merged checkpoints, on every tiny family."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from layerfreeze.apply import apply_plan
from layerfreeze.export import (
    ADAPTER_FILE,
    PLAN_FILE,
    SIDECAR_FILE,
    export_base_config,
    export_merged,
    load_trainable,
    save_trainable,
)
from tests.helpers.tiny_models import TINY_FAMILIES, build_tiny_model, tiny_batch

PLAN = "0:lora(r=2,target=all),1:full,2:lora(r=2,target=mlp,gated),3:prefix(tokens=3,gated),embeddings:full"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _trained(family, plan=PLAN, install=()):
    model = build_tiny_model(family)
    applied = apply_plan(model, plan, install=install)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # stand-in for training: move every trainable tensor
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model, applied


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_save_and_reload_reproduces_logits_exactly(family, tmp_path):
    model, applied = _trained(family)
    ids = tiny_batch(model)
    with torch.no_grad():
        ref = model(ids).logits
    out = save_trainable(applied, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_FILE, PLAN_FILE]
    saved = load_file(str(out / ADAPTER_FILE))
    assert set(saved) == set(applied.trainable_state_dict())
    assert not any(n.startswith(("model.layers.3.mlp.", "transformer.h.3.mlp.", "gpt_neox.layers.3.mlp."))
                   for n in saved)  # frozen base weights are not saved
    meta = json.loads((out / PLAN_FILE).read_text())
    assert meta["num_layers"] == 4 and meta["model_type"] == model.config.model_type
    fresh = build_tiny_model(family)
    with torch.no_grad():
        assert not torch.equal(fresh(ids).logits, ref)
    reloaded = load_trainable(fresh, out)
    assert reloaded.plan == applied.plan
    assert reloaded.trainable_names() == applied.trainable_names()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, ref)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_export_merged_loads_with_from_pretrained(family, tmp_path):
    model, applied = _trained(family)
    ids = tiny_batch(model)
    with torch.no_grad():
        ref = model(ids).logits
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = export_merged(applied, tmp_path / "merged")
    # The applied model is left exactly as it was.
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", SIDECAR_FILE, PLAN_FILE} <= names and any(n.endswith(".safetensors") and n != SIDECAR_FILE for n in names)
    # The base architecture's weights (config.json is marked: see tests/faults/test_sidecar_loading.py),
    # merged, no adapter names.
    plain = AutoModelForCausalLM.from_pretrained(str(out), config=export_base_config(out))
    assert not [n for n, _ in plain.named_parameters() if "lora_" in n or "prefix_" in n]
    assert type(plain) is type(model)
    sidecar = load_file(str(out / SIDECAR_FILE))
    # Ungated LoRA (layer 0) is merged; gated LoRA, its gate and the prefix stay in the sidecar.
    layer0 = applied.layout.layers[0].name + "."
    assert sidecar and not any(n.startswith(layer0) for n in sidecar)
    assert any("lora_gate" in n for n in sidecar) and any("prefix_key" in n for n in sidecar)
    assert all("lora_" in n or "prefix_" in n for n in sidecar)
    # Without the sidecar, layer 0's LoRA is already in the weights; the rest is missing.
    restored = load_trainable(plain, out)
    assert restored.resolved.layers[0].name == "freeze" and restored.resolved.layers[3].name == "prefix"
    with torch.no_grad():
        got = plain(ids).logits
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()


def test_export_merged_without_unmergeable_parts(tmp_path):
    model, applied = _trained("llama", plan="lora_all")
    ids = tiny_batch(model)
    with torch.no_grad():
        ref = model(ids).logits
    out = export_merged(applied, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, ref, atol=1e-4, rtol=1e-4)
    assert load_file(str(out / SIDECAR_FILE)) == {}


def test_schedule_state_round_trip(tmp_path):
    phases = ["0-1:lora(r=2)", "0-1:full,2-3:prefix(tokens=2)"]
    model, applied = _trained("qwen2", plan=phases[0], install=phases[1:])
    applied.switch_plan(phases[1])
    ids = tiny_batch(model)
    with torch.no_grad():
        ref = model(ids).logits
    save_trainable(applied, tmp_path / "s")
    meta = json.loads((tmp_path / "s" / PLAN_FILE).read_text())
    assert len(meta["install"]) == 1
    fresh = build_tiny_model("qwen2")
    reloaded = load_trainable(fresh, tmp_path / "s")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, ref)
    assert set(reloaded.trainable_names()) == set(applied.trainable_names())


def test_atomic_failure_leaves_nothing(tmp_path):
    model, applied = _trained("llama")

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        export_merged(applied, tmp_path / "m", tokenizer=BrokenTokenizer())
    assert not (tmp_path / "m").exists() and list(tmp_path.iterdir()) == []
    assert not any(getattr(m, "merged", False) for m in model.modules())  # unmerged after failure


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="plan.json: not found"):
        load_trainable(build_tiny_model("llama"), tmp_path)
    _model, applied = _trained("llama")
    save_trainable(applied, tmp_path / "c")
    with pytest.raises(ValueError) as e:
        load_trainable(build_tiny_model("llama", num_layers=2), tmp_path / "c")
    assert "out of range for a 2-layer model" in str(e.value)
