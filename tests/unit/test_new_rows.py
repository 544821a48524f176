"""resize_for_new_tokens: a tiny real Llama (tied and untied head) grown to a tokenizer extended
with layerfreeze.data.vocab_extend on the bundled Chinese text; new rows against a separate
computation (another tokenizer path, a weight copy taken before the resize), old rows exact."""

from __future__ import annotations

import pytest
import torch

from layerfreeze.data.vocab_extend import extend_tokenizer
from layerfreeze.vocab_resize import resize_for_new_tokens
from tests.helpers.tiny_models import build_tiny_model
from tests.helpers.tokenizer_fixtures import build_llama2_style, build_qwen_style, bundled

BASES = {"llama2": build_llama2_style, "qwen2": build_qwen_style}


@pytest.fixture(scope="module", params=sorted(BASES))
def tokenizers(request, tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp(request.param)
    base = BASES[request.param](root / "base")
    extend_tokenizer(base, [bundled("zh.txt")], root / "out", vocab_size=900, max_new=40)
    old = AutoTokenizer.from_pretrained(str(base))
    new = AutoTokenizer.from_pretrained(str(root / "out"))
    assert len(new) > len(old)
    return request.param, old, new


def _model(n_vocab: int, tied: bool):
    return build_tiny_model(
        "llama", num_layers=2, hidden=32, num_heads=2, num_kv_heads=1,
        vocab_size=n_vocab, tie_word_embeddings=tied,
    )


def _subtokens(old, new, i: int) -> list[int]:
    # A different path from the module's decode/encode: piece -> string -> __call__.
    text = new.convert_tokens_to_string([new.convert_ids_to_tokens(i)])
    return old(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("init", ["subtoken_mean", "mean"])
def test_new_rows_initialised_old_rows_exact(tokenizers, tied, init):
    _, old, new = tokenizers
    n_old, n_new = len(old), len(new)
    model = _model(n_old, tied)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    head0 = model.get_output_embeddings().weight.detach().clone()

    report = resize_for_new_tokens(model, old, new, init=init)

    emb = model.get_input_embeddings().weight.detach()
    head = model.get_output_embeddings().weight.detach()
    assert emb.shape == (n_new, 32) and head.shape == (n_new, 32)
    assert model.config.vocab_size == n_new
    assert (head.data_ptr() == emb.data_ptr()) == tied
    assert torch.equal(emb[:n_old], emb0) and torch.equal(head[:n_old], head0)
    assert report.first_new_id == n_old and report.initialised == n_new - n_old
    assert report.tied == tied and report.init == init
    for i in range(n_old, n_new):
        if init == "mean":
            ids = list(range(n_old))
        else:
            ids = _subtokens(old, new, i)
            assert ids, f"id {i} has no sub-tokens"
        exp_e = sum(emb0[j].double() for j in ids) / len(ids)
        exp_h = sum(head0[j].double() for j in ids) / len(ids)
        torch.testing.assert_close(emb[i].double(), exp_e, rtol=0, atol=1e-6)
        torch.testing.assert_close(head[i].double(), exp_h, rtol=0, atol=1e-6)
    assert report.fallback_to_mean == (() if init == "subtoken_mean" else tuple(range(n_old, n_new)))


def test_subtokens_are_the_utf8_bytes_for_an_english_only_base(tokenizers):
    """The English-only bases have no Chinese pieces: a new Chinese token's sub-tokens are its
    UTF-8 bytes (byte fallback <0xNN> for SentencePiece, byte-level symbols for BPE)."""
    from layerfreeze.vocab_resize import subtoken_ids

    kind, old, new = tokenizers
    i = next(i for i in range(len(old), len(new)) if "\u4e00" <= new.decode([i]).strip()[:1] <= "\u9fff")
    text = new.decode([i])
    ids = subtoken_ids(old, new, i)
    pieces = old.convert_ids_to_tokens(ids)
    raw = text.strip().encode("utf-8")
    if kind == "llama2":
        byte_pieces = [p for p in pieces if p.startswith("<0x")]
        assert bytes(int(p[3:5], 16) for p in byte_pieces) == raw
    else:
        assert old.convert_tokens_to_string(pieces).encode("utf-8") == text.encode("utf-8")
        assert len(ids) >= len(text.strip())  # no Chinese merges in an English-only BPE


def test_padded_embedding_reuses_rows_without_growing(tokenizers):
    """An embedding already larger than the new vocabulary (padded) keeps its shape; the new
    ids' rows are written, the old ids' and the padding rows past the new vocabulary stay."""
    _, old, new = tokenizers
    n_old, n_new = len(old), len(new)
    model = _model(n_new + 5, tied=False)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    report = resize_for_new_tokens(model, old, new, init="mean")
    emb = model.get_input_embeddings().weight.detach()
    assert emb.shape[0] == n_new + 5 and report.new_rows == n_new + 5
    assert torch.equal(emb[:n_old], emb0[:n_old]) and torch.equal(emb[n_new:], emb0[n_new:])
    torch.testing.assert_close(emb[n_old], emb0[:n_old].mean(0), rtol=0, atol=1e-6)
