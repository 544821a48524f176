"""Hostile inputs to the PEFT trainable-tokens path of new vocabulary rows: a base not resized,
index sets new_rows cannot hold, adapters and plans that do not match, tampered files, a head
PEFT would compute wrongly. Each is refused with one message naming the module / key and what
would work; nothing is written or loaded half-way."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from layerfreeze import apply_plan
from layerfreeze.interop.peft import export_peft, load_peft_adapter, peft_plan
from tests.helpers.tiny_models import build_tiny_model

torch.set_num_threads(1)

FROM, VOCAB = 100, 128
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])


def _model(vocab: int = VOCAB, tied: bool = False):
    return build_tiny_model("llama", num_layers=2, hidden=32, num_heads=2, num_kv_heads=1,
                            vocab_size=vocab, tie_word_embeddings=tied).eval()


def _peft_adapter(tmp_path, indices, vocab: int = VOCAB):
    """A real PEFT LoRA + trainable-tokens adapter saved by PEFT itself."""
    pm = get_peft_model(_model(vocab), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                  trainable_token_indices=indices))
    pm.save_pretrained(str(tmp_path / "p"))
    return tmp_path / "p"


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_base_not_resized_is_refused_naming_the_vocab_size(tmp_path):
    """PEFT itself fails with a bare IndexError on a smaller base; peft_plan says to resize."""
    d = _peft_adapter(tmp_path, list(range(FROM, VOCAB)))
    with pytest.raises(ValueError, match=r"vocab_size=128\) but the model has 100 rows there; "
                                         r"load the base resized to 128 rows"):
        peft_plan(_model(FROM), d)


def test_load_into_a_model_with_another_vocab_size_is_refused_and_loads_nothing(tmp_path):
    d = _peft_adapter(tmp_path, list(range(FROM, VOCAB)))
    model = _model(120)
    applied = apply_plan(model, f"0-1:lora(r=4,alpha=8,target=[q_proj]),"
                                f"embeddings:new_rows(from_id={FROM})", log=False)
    before = _state(model)
    with pytest.raises(ValueError, match=r"model.embed_tokens: the adapter's rows end at id 127 "
                                         r"\(vocab_size=128\) but the model has 120 rows"):
        load_peft_adapter(applied, d)
    _unchanged(model, before)


@pytest.mark.parametrize("indices, match", [
    ([5, 7, 100], r"\[5, 7, 100\]\); layerfreeze's new_rows\(from_id=N\) trains the contiguous"),
    ([101, 100], r"is not one ascending run of ids"),
])
def test_indices_new_rows_cannot_hold_are_refused(tmp_path, indices, match):
    d = _peft_adapter(tmp_path, indices)
    with pytest.raises(ValueError, match=r"trainable_token_indices \(a list: model.embed_tokens\)"):
        peft_plan(_model(), d)
    with pytest.raises(ValueError, match=match):
        peft_plan(_model(), d)


def test_a_run_short_of_the_last_row_is_refused(tmp_path):
    """Rows 100-119 of 128: new_rows(from_id=100) would also train 120-127, which PEFT keeps."""
    d = _peft_adapter(tmp_path, list(range(FROM, 120)))
    with pytest.raises(ValueError, match=r"end at id 119 \(vocab_size=120\) but the model has 128"):
        peft_plan(_model(), d)


def test_plan_without_new_rows_is_refused_naming_the_part_to_add(tmp_path):
    d = _peft_adapter(tmp_path, list(range(FROM, VOCAB)))
    model = _model()
    applied = apply_plan(model, "0-1:lora(r=4,alpha=8,target=[q_proj])", log=False)
    before = _state(model)
    with pytest.raises(ValueError, match=r"model.embed_tokens: the adapter carries new rows "
                                         r"100-127 but the plan has no new_rows there; use "
                                         r"embeddings: new_rows\(from_id=100\)"):
        load_peft_adapter(applied, d)
    _unchanged(model, before)


def test_other_from_id_is_refused(tmp_path):
    d = _peft_adapter(tmp_path, {"lm_head": list(range(FROM, VOCAB))})
    model = _model()
    applied = apply_plan(model, "0-1:lora(r=4,alpha=8,target=[q_proj]),"
                                "lm_head:new_rows(from_id=90)", log=False)
    with pytest.raises(ValueError, match=r"lm_head: the adapter's new rows start at id 100, the "
                                         r"plan's new_rows\(from_id=90\); use lm_head: "
                                         r"new_rows\(from_id=100\)"):
        load_peft_adapter(applied, d)


def test_strict_requires_the_plans_new_rows_in_the_adapter(tmp_path):
    pm = get_peft_model(_model(), LORA)
    pm.save_pretrained(str(tmp_path / "plain"))
    model = _model()
    applied = apply_plan(model, f"0-1:lora(r=4,alpha=8,target=[q_proj]),"
                                f"embeddings:new_rows(from_id={FROM})", log=False)
    rows = model.get_input_embeddings().new_rows_weight.detach().clone()
    with pytest.raises(ValueError, match=r"no trainable tokens for the plan's new_rows on "
                                         r"model.embed_tokens; pass strict=False"):
        load_peft_adapter(applied, tmp_path / "plain")
    load_peft_adapter(applied, tmp_path / "plain", strict=False)
    assert torch.equal(model.get_input_embeddings().new_rows_weight.detach(), rows)


@pytest.mark.parametrize("tamper, match", [
    (lambda cfg, t: cfg.update(trainable_token_indices="abc"),
     r"trainable_token_indices must be a list of token ids or a dict"),
    (lambda cfg, t: cfg.update(trainable_token_indices={"embed_tokens": [100, -1]}),
     r"must be a non-empty list of token ids \(ints >= 0\), got \[100, -1\]"),
    (lambda cfg, t: t.update({k: v[:-1] for k, v in t.items() if "token_adapter" in k}),
     r"trainable_tokens_delta has shape \(27, 32\), but trainable_token_indices"),
    (lambda cfg, t: cfg.update(trainable_token_indices=None),
     r"trainable-token tensors for \['model.embed_tokens'\] have no trainable_token_indices in "
     r"the config"),
])
def test_tampered_adapter_is_refused(tmp_path, tamper, match):
    d = _peft_adapter(tmp_path, list(range(FROM, VOCAB)))
    cfg = json.loads((d / "adapter_config.json").read_text())
    tensors = load_file(str(d / "adapter_model.safetensors"))
    tamper(cfg, tensors)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(d / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=match):
        peft_plan(_model(), d)


def test_biased_head_is_refused_on_export_and_nothing_is_written(tmp_path):
    """PEFT's trainable tokens compute the head as F.linear(x, W) without its bias: refuse."""
    model = _model()
    head = nn.Linear(32, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
    model.lm_head = head
    applied = apply_plan(model, f"0-1:lora(r=4,alpha=8,target=[q_proj]),"
                                f"lm_head:new_rows(from_id={FROM})", log=False)
    with pytest.raises(ValueError) as e:
        export_peft(applied, tmp_path / "out")
    lines = [x for x in str(e.value).splitlines() if x.startswith("  - ")]
    assert lines == ["  - lm_head: the output head has a bias, which PEFT's trainable tokens drop "
                     "when they compute the head's logits (F.linear without bias)"]
    assert not (tmp_path / "out").exists()


def test_new_rows_without_lora_is_refused_saying_what_would_work(tmp_path):
    """PEFT's LoraConfig needs target modules (an empty list fails in get_peft_model); the rows
    alone would be another PEFT type, which export_peft does not write: say so, name the part."""
    applied = apply_plan(_model(), f"embeddings:new_rows(from_id={FROM})", log=False)
    with pytest.raises(ValueError) as e:
        export_peft(applied, tmp_path / "out")
    lines = [x for x in str(e.value).splitlines() if x.startswith("  - ")]
    assert len(lines) == 1
    assert lines[0].startswith("  - embeddings: new_rows(from_id=100) without any LoRA adapter")
    assert "TRAINABLE_TOKENS" in lines[0] and "add a lora rule" in lines[0]
    assert not (tmp_path / "out").exists()


def test_indices_without_any_rows_are_refused(tmp_path):
    """A config naming both modules (same ids) with the rows tensor removed: not a tied head
    PEFT saved through the embedding, but an incomplete adapter."""
    d = _peft_adapter(tmp_path, list(range(FROM, VOCAB)))
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["trainable_token_indices"] = {"embed_tokens": list(range(FROM, VOCAB)),
                                      "lm_head": list(range(FROM, VOCAB))}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(d / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "token_adapter" not in k},
              str(d / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"trainable_token_indices\['embed_tokens'\] matches 0 "
                                         r"trainable-token tensors"):
        peft_plan(_model(), d)
