"""Hostile inputs to resize_for_new_tokens: each is refused with one error naming the argument,
and the model is left unchanged."""

from __future__ import annotations

import pytest
import torch

from layerfreeze.data.vocab_extend import extend_tokenizer
from layerfreeze.vocab_resize import resize_for_new_tokens
from tests.helpers.tiny_models import build_tiny_model
from tests.helpers.tokenizer_fixtures import build_llama2_style, build_qwen_style, bundled


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("rows")
    base = build_llama2_style(root / "base")
    extend_tokenizer(base, [bundled("zh.txt")], root / "out", vocab_size=900, max_new=10)
    other = build_qwen_style(root / "qwen")
    return tuple(AutoTokenizer.from_pretrained(str(p)) for p in (base, root / "out", other))


def _model(n):
    return build_tiny_model("llama", num_layers=2, hidden=32, num_heads=2, num_kv_heads=1,
                            vocab_size=n)


def _refused(model, old, new, match, **kw):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        resize_for_new_tokens(model, old, new, **kw)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unknown_init(toks):
    old, new, _ = toks
    _refused(_model(len(old)), old, new, r"^init: unknown init 'zeros'\. Valid: subtoken_mean, mean",
             init="zeros")


def test_swapped_tokenizers(toks):
    old, new, _ = toks
    _refused(_model(len(old)), new, old, r"^new_tokenizer: has \d+ tokens, fewer than")


def test_unrelated_tokenizer_moves_old_ids(toks):
    old, _, qwen = toks
    assert len(qwen) >= len(old)
    _refused(_model(len(old)), old, qwen, r"^new_tokenizer: old token .* keeps every old id")


def test_embedding_smaller_than_old_tokenizer(toks):
    old, new, _ = toks
    _refused(_model(len(old) - 3), old, new, r"^model: the embedding has \d+ rows, fewer than")


# ----------------------------------------------------------------- plan part new_rows


def test_plan_from_id_past_the_vocabulary_is_refused_before_training():
    from layerfreeze.apply import apply_plan
    from layerfreeze.errors import ConfigError

    model = _model(128)
    with pytest.raises(ConfigError, match=r"plan\.embeddings: new_rows from_id=128 is out of range "
                                          r"for 128 rows \(valid 0-127\)"):
        apply_plan(model, "0:full,embeddings:new_rows(from_id=128)", log=False)
    assert not any("new_rows" in n for n, _ in model.named_parameters())


def test_plan_two_from_ids_in_one_schedule_are_refused():
    from layerfreeze.apply import apply_plan
    from layerfreeze.errors import ConfigError

    model = _model(128)
    with pytest.raises(ConfigError, match=r"install\[0\]\.embeddings: new_rows\(from_id=90\) "
                                          r"differs from from_id=100 in plan\.embeddings"):
        apply_plan(model, "embeddings:new_rows(from_id=100)",
                   install=["embeddings:new_rows(from_id=90)"], log=False)
    assert not any("new_rows" in n for n, _ in model.named_parameters())


def test_peft_export_carries_new_rows_instead_of_dropping_them(tmp_path):
    """A PEFT export of a new-rows plan never drops the trained vocabulary rows: they travel as
    PEFT's trainable_token_indices (issue #18; tests/unit/test_peft_new_rows.py loads them in
    PEFT), next to a README saying the base must be resized first."""
    import json

    from safetensors.torch import load_file

    from layerfreeze.apply import apply_plan
    from layerfreeze.interop.peft import export_peft

    applied = apply_plan(_model(128), "0:lora(r=2),embeddings:new_rows(from_id=100)", log=False)
    out = export_peft(applied, tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["trainable_token_indices"] == list(range(100, 128))
    rows = load_file(str(out / "adapter_model.safetensors"))[
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert torch.equal(rows, applied.model.get_input_embeddings().new_rows_weight.detach())
    assert "vocab_size=128" in (out / "README.md").read_text()


def test_cli_plan_from_id_out_of_range_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys

    _model(128).save_pretrained(str(tmp_path / "m"))
    r = subprocess.run(
        [sys.executable, "-m", "layerfreeze", "plan", "--model", str(tmp_path / "m"), "--plan",
         "0:full,embeddings:new_rows(from_id=200)", "--count"],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 2, r.stderr
    errors = [x for x in r.stderr.splitlines() if "ERROR" in x or "error" in x.lower()]
    assert len(errors) == 1 and "plan.embeddings: new_rows from_id=200 is out of range for 128 " \
        "rows (valid 0-127)" in errors[0]
    assert "Traceback" not in r.stderr


def test_schedule_mixing_new_rows_and_full_on_one_part_is_refused():
    from layerfreeze.apply import apply_plan
    from layerfreeze.errors import ConfigError

    model = _model(128)
    with pytest.raises(ConfigError, match=r"plan\.embeddings: new_rows cannot share a schedule "
                                          r"with embeddings: full \(in install\[0\]\)"):
        apply_plan(model, "embeddings:new_rows(from_id=100)", install=["embeddings:full"],
                   log=False)
    assert not any("new_rows" in n for n, _ in model.named_parameters())
