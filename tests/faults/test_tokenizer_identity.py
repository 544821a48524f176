"""A tokenizer saved next to a model loads as itself through ``AutoTokenizer`` on every family.

The project's own SentencePiece tokenizer (``train_tokenizer``) is exported next to tiny Llama,
Qwen2 and Mistral models built from configs. transformers replaces the recorded tokenizer class
for some model types (5.25 loads anything next to a ``qwen2`` config as ``Qwen2Tokenizer``,
which re-derives a byte-level BPE from the vocabulary and produces other ids), so ``trace`` and
``eval`` on the export would measure garbage. The expected ids come from the SentencePiece
processor itself (an independent implementation), BOS prepended.
"""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from layerfreeze.apply import apply_plan
from layerfreeze.data.tokenizer import load_tokenizer, train_tokenizer
from layerfreeze.diagnostics.prune import save_checkpoint
from layerfreeze.export import export_merged
from tests.helpers.tiny_models import build_tiny_model

TEXT = "混合文本：Hello 世界, layerfreeze 训练 2026 年 — the quick brown fox 跳过 13 只 lazy dogs!"
FAMILIES = ["llama", "qwen2", "mistral"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    para = (
        "今天天气很好，我们去公园散步。The quick brown fox jumps over the lazy dog.\n\n"
        "机器学习 model training 深度学习, layer freeze 2026 年 12 月。\n\n"
        "大型语言模型的继续预训练 continued pre-training of large language models.\n\n"
    )
    (d / "corpus.txt").write_text(para * 60, encoding="utf-8")
    out = train_tokenizer([d / "corpus.txt"], d / "tokenizer", vocab_size=392)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    return load_tokenizer(out), [sp.bos_id()] + sp.encode(TEXT)


def _model(family, vocab):
    return build_tiny_model(family, num_layers=2, hidden=32, vocab_size=vocab)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_merged_tokenizer_loads_as_itself(family, trained, tmp_path):
    tok, want = trained
    assert tok(TEXT)["input_ids"] == want  # the training tokenizer is the SentencePiece model
    applied = apply_plan(_model(family, len(tok)), "full")
    out = export_merged(applied, tmp_path / "export", tokenizer=tok)
    loaded = AutoTokenizer.from_pretrained(str(out))
    assert type(loaded).__name__ == type(tok).__name__ == "TokenizersBackend"
    assert loaded(TEXT)["input_ids"] == want
    assert loaded.decode(want, skip_special_tokens=True) == TEXT
    recorded = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert recorded["tokenizer_class"] == "TokenizersBackend"
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_export_tokenizer_loads_as_itself(family, trained, tmp_path):
    from contextlib import nullcontext

    tok, want = trained
    applied = apply_plan(_model(family, len(tok)), "full")
    out = export_merged(applied, tmp_path / "export", tokenizer=tok, gather=lambda names: nullcontext())
    loaded = AutoTokenizer.from_pretrained(str(out))
    assert type(loaded).__name__ == "TokenizersBackend" and loaded(TEXT)["input_ids"] == want


def test_pruned_checkpoint_tokenizer_loads_as_itself(trained, tmp_path):
    tok, want = trained
    model = _model("qwen2", len(tok))
    model.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")  # an older export: tokenizer saved plainly
    out = save_checkpoint(model, tmp_path / "out", tokenizer_from=tmp_path / "src")
    loaded = AutoTokenizer.from_pretrained(str(out))
    assert type(loaded).__name__ == "TokenizersBackend" and loaded(TEXT)["input_ids"] == want


def test_trust_remote_code_loads_the_same_ids(trained, tmp_path):
    # lm-evaluation-harness and vLLM are often run with trust_remote_code=True.
    tok, want = trained
    applied = apply_plan(_model("qwen2", len(tok)), "full")
    out = export_merged(applied, tmp_path / "export", tokenizer=tok)
    loaded = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    assert loaded(TEXT)["input_ids"] == want


def test_directory_saved_before_the_pin_loads_with_its_recorded_class(trained, tmp_path):
    # An export written by an older layerfreeze: tokenizer_config.json records TokenizersBackend,
    # AutoTokenizer alone gives Qwen2Tokenizer; eval / trace / prune load it through auto_tokenizer.
    from layerfreeze.data.tokenizer import auto_tokenizer

    tok, want = trained
    _model("qwen2", len(tok)).save_pretrained(tmp_path / "old")
    tok.save_pretrained(tmp_path / "old")
    assert type(AutoTokenizer.from_pretrained(str(tmp_path / "old"))).__name__ == "Qwen2Tokenizer"
    loaded = auto_tokenizer(tmp_path / "old")
    assert type(loaded).__name__ == "TokenizersBackend" and loaded(TEXT)["input_ids"] == want
