"""`layerfreeze tokenizer extend`: a Llama-2-style SentencePiece and a Qwen-style byte-level BPE
tokenizer, both trained here on English only, extended with the bundled Chinese corpus."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from layerfreeze.cli import main
from layerfreeze.data.vocab_extend import _HAN, REPORT_FILE, extend_tokenizer
from tests.helpers.tokenizer_fixtures import (
    build_llama2_style,
    build_llama3_style,
    build_qwen_style,
    bundled,
)

KINDS = {"sentencepiece": build_llama2_style, "byte_level_bpe": build_qwen_style}
# base fixture -> (builder, kind, class AutoTokenizer loads)
BASES = {
    "llama2": (build_llama2_style, "sentencepiece", "LlamaTokenizer"),
    "qwen2": (build_qwen_style, "byte_level_bpe", "Qwen2Tokenizer"),
    "llama3": (build_llama3_style, "byte_level_bpe", "TokenizersBackend"),
}
MIXED = [
    "混合文本：Hello 世界, layerfreeze 训练 2026 年 — the quick brown fox 跳过 13 只 lazy dogs!",
    "长颈鹿的脖子很长，可以吃到高处的树叶。 The giraffe's neck is long.\n夏天的时候，天气很热。",
    "两个空格  and tabs\there，数字 3.14 与 emoji 🙂 以及 ｆｕｌｌ－ｗｉｄｔｈ。",
]
# (No text starts with a space: transformers' LlamaTokenizer built from a tokenizer.model already
# encodes leading spaces differently from SentencePiece and drops one in decode, before extension.)


def _zh_docs(n: int = 200) -> list[str]:
    text = bundled("zh.txt").read_text(encoding="utf-8")
    return [p for p in text.split("\n\n") if p.strip()][:n]


@pytest.fixture(scope="module", params=sorted(BASES))
def extended(request, tmp_path_factory):
    from transformers import AutoTokenizer

    build, kind, cls = BASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    base = build(root / "base")
    report = extend_tokenizer(base, [bundled("zh.txt")], root / "out", vocab_size=1200)
    return {
        "kind": kind,
        "cls": cls,
        "base_dir": base,
        "out": root / "out",
        "report": report,
        "base": AutoTokenizer.from_pretrained(str(base)),
        "new": AutoTokenizer.from_pretrained(str(root / "out")),
    }


def test_detected_kind_and_class_family(extended):
    base, new, report = extended["base"], extended["new"], extended["report"]
    assert report.kind == extended["kind"]
    assert type(new) is type(base)
    assert type(base).__name__ == extended["cls"]
    assert report.added > 100
    assert len(new) == len(base) + report.added == report.new_size


def test_every_old_id_keeps_its_token(extended):
    base, new = extended["base"], extended["new"]
    n = len(base)
    old_ids = sorted(base.get_vocab().values())
    assert old_ids == list(range(n))
    assert new.convert_ids_to_tokens(old_ids) == base.convert_ids_to_tokens(old_ids)
    assert sorted(set(new.get_vocab().values()) - set(old_ids)) == list(range(n, len(new)))
    assert extended["report"].first_new_id == n
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(new, name) == getattr(base, name), name


def test_english_text_only_changes_where_new_pieces_apply(extended):
    """New merges come after the old ones (new SentencePiece scores below the old): a text that
    uses no new piece encodes exactly as before, one that does takes fewer tokens. (Pieces from
    the Chinese corpus can apply to English text: numbers, Latin words in it.)"""
    base, new, n = extended["base"], extended["new"], len(extended["base"])
    en = [x for x in bundled("en.txt").read_text(encoding="utf-8").splitlines() if x.strip()][:200]
    unchanged = 0
    for text in en:
        old_ids, new_ids = base(text)["input_ids"], new(text)["input_ids"]
        if all(i < n for i in new_ids):
            assert new_ids == old_ids, text
            unchanged += 1
        else:
            assert len(new_ids) < len(old_ids) and new.decode(new_ids) == base.decode(old_ids)
    assert unchanged > 100


def test_new_pieces_appear_in_chinese_text_and_roundtrip(extended):
    new, n = extended["new"], len(extended["base"])
    for text in _zh_docs(50) + MIXED:
        ids = new(text, add_special_tokens=False)["input_ids"]
        assert new.decode(ids) == text
    ids = new(_zh_docs(1)[0], add_special_tokens=False)["input_ids"]
    assert any(i >= n for i in ids)
    # produced by the model itself (BPE merges / SentencePiece pieces), not as added tokens
    added = {t.content for t in new.added_tokens_decoder.values()}
    assert not added & set(extended["report"].sample_new_tokens)


def test_tokens_per_chinese_character_drops_on_held_out(extended):
    report, base, new = extended["report"], extended["base"], extended["new"]
    assert report.held_out_zh_chars > 1000
    assert report.tokens_per_zh_char_after < 0.8 * report.tokens_per_zh_char_before
    # independent of the offset-based count: whole held-out lines take fewer tokens
    held = _zh_docs(10**6)[9::10]  # the documents extend held out (every 10th)
    han = [c for d in held for c in _HAN.findall(d)]
    assert report.held_out_zh_chars == len(han)
    # the English-only base spells each character with its UTF-8 bytes
    utf8 = sum(len(c.encode("utf-8")) for c in han) / len(han)
    assert report.tokens_per_zh_char_before == pytest.approx(utf8, abs=1e-4)
    n_base = sum(len(base(d, add_special_tokens=False)["input_ids"]) for d in held)
    n_new = sum(len(new(d, add_special_tokens=False)["input_ids"]) for d in held)
    assert n_new < 0.8 * n_base


def test_report_file_and_save_reload(extended, tmp_path):
    from transformers import AutoTokenizer

    saved = json.loads((extended["out"] / REPORT_FILE).read_text(encoding="utf-8"))
    assert saved == extended["report"].to_dict()
    new = extended["new"]
    new.save_pretrained(str(tmp_path / "again"))
    again = AutoTokenizer.from_pretrained(str(tmp_path / "again"))
    assert type(again) is type(new) and len(again) == len(new)
    for text in MIXED + _zh_docs(20):
        assert again(text)["input_ids"] == new(text)["input_ids"]


@pytest.mark.parametrize("extended", ["llama2"], indirect=True)
def test_sentencepiece_model_and_tokenizer_json_agree(extended):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    out, n = extended["out"], len(extended["base"])
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((out / "tokenizer.model").read_bytes())
    old = [p for p in proto.pieces[:n] if p.type == 1]
    assert len(proto.pieces) == len(extended["new"])
    assert all(p.type == 1 for p in proto.pieces[n:])  # NORMAL
    assert max(p.score for p in proto.pieces[n:]) < min(p.score for p in old)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    new = extended["new"]
    en = [x for x in bundled("en.txt").read_text(encoding="utf-8").splitlines() if x.strip()]
    for text in _zh_docs(200) + MIXED + en[:100]:
        assert sp.encode(text) == new(text, add_special_tokens=False)["input_ids"], text


@pytest.mark.parametrize("extended", ["llama3", "qwen2"], indirect=True)
def test_byte_level_tokens_are_bpe_entries_with_merges(extended):
    from tokenizers import pre_tokenizers

    base_j = json.loads((extended["base_dir"] / "tokenizer.json").read_text(encoding="utf-8"))
    j = json.loads((extended["out"] / "tokenizer.json").read_text(encoding="utf-8"))
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    n, vocab = len(extended["base"]), j["model"]["vocab"]
    new_tokens = [t for t, i in vocab.items() if i >= n]
    assert len(new_tokens) == extended["report"].added
    assert all(set(t) <= alphabet for t in new_tokens)
    made = {
        a + b
        for a, b in (
            m.split(" ", 1) if isinstance(m, str) else m
            for m in j["model"]["merges"][len(base_j["model"]["merges"]) :]
        )
    }
    assert set(new_tokens) <= made
    assert j["model"]["merges"][: len(base_j["model"]["merges"])] == base_j["model"]["merges"]
    assert j["added_tokens"] == base_j["added_tokens"]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_max_new_and_real_held_out_text(kind, tmp_path, eval_data_dir):
    base = KINDS[kind](tmp_path / "base")
    held = tmp_path / "cmmlu_questions.txt"
    with open(eval_data_dir / "cmmlu" / "test" / "agronomy.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    held.write_text("\n\n".join(r["Question"] for r in rows), encoding="utf-8")
    report = extend_tokenizer(
        base,
        [bundled("zh.txt"), bundled("mixed.jsonl")],
        tmp_path / "out",
        vocab_size=1500,
        max_new=300,
        held_out=[held],
    )
    assert 250 <= report.added <= 300
    assert report.held_out_zh_chars > 2000
    assert report.tokens_per_zh_char_after < report.tokens_per_zh_char_before


def test_cli_extend_prints_summary_and_json(tmp_path, capsys):
    base = build_qwen_style(tmp_path / "base")
    argv = [
        "tokenizer",
        "extend",
        "--base",
        str(base),
        "--corpus",
        str(bundled("zh.txt")),
        "--vocab-size",
        "800",
        "--max-new",
        "100",
    ]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "+100 pieces" in line and "tokens per Chinese character" in line
    assert main([*argv, "--out", str(tmp_path / "b"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["added"] == 100 and data["kind"] == "byte_level_bpe"
    assert data["tokens_per_zh_char_after"] < data["tokens_per_zh_char_before"]
    assert Path(data["out"]) == tmp_path / "b"


def test_layerfreeze_trained_unigram_base(tmp_path):
    """A tokenizer from `layerfreeze tokenizer train` (SentencePiece unigram, TokenizersBackend)
    extends too: old ids kept, tokenizer.model and tokenizer.json agree, Chinese gets shorter."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from layerfreeze.data.tokenizer import train_tokenizer

    base_dir = train_tokenizer([bundled("en.txt")], tmp_path / "base", vocab_size=700)
    report = extend_tokenizer(base_dir, [bundled("zh.txt")], tmp_path / "out", vocab_size=1200)
    base = AutoTokenizer.from_pretrained(str(base_dir))
    new = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert type(new) is type(base) and report.kind == "sentencepiece" and report.added > 100
    ids = list(range(len(base)))
    assert new.convert_ids_to_tokens(ids) == base.convert_ids_to_tokens(ids)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    for text in _zh_docs(100) + MIXED:
        ids = new(text, add_special_tokens=False)["input_ids"]
        assert sp.encode(text) == ids and new.decode(ids) == text
    assert report.tokens_per_zh_char_after < 0.5 * report.tokens_per_zh_char_before
    # the base falls back to bytes for every Han character (runs of them share one offset span
    # in a Unigram model): the count is their UTF-8 length
    held = _zh_docs(10**6)[9::10]
    han = [c for d in held for c in _HAN.findall(d)]
    utf8 = sum(len(c.encode("utf-8")) for c in han) / len(han)
    assert report.tokens_per_zh_char_before == pytest.approx(utf8, abs=1e-4)


def test_training_progress_is_logged(tmp_path, monkeypatch, caplog):
    import logging

    from layerfreeze.data import vocab_extend

    monkeypatch.setattr(vocab_extend, "PROGRESS_SECONDS", 0.0)
    base = build_qwen_style(tmp_path / "base")
    with caplog.at_level(logging.INFO, logger="layerfreeze"):
        extend_tokenizer(base, [bundled("zh.txt")], tmp_path / "out", vocab_size=700)
    progress = [r.getMessage() for r in caplog.records if "training: fed" in r.getMessage()]
    assert len(progress) > 10 and "zh.txt" in progress[-1]
    assert any(r.getMessage().startswith("extended ") for r in caplog.records)


def test_docs_command_shape_runs(tmp_path, capsys):
    """The documented call (docs/data.md), on the local fixtures: --max-new, --held-out, --json."""
    base = build_qwen_style(tmp_path / "base")
    argv = [
        "tokenizer",
        "extend",
        "--base",
        str(base),
        "--corpus",
        str(bundled("zh.txt")),
        str(bundled("mixed.jsonl")),
        "--vocab-size",
        "900",
        "--max-new",
        "80",
        "--held-out",
        str(bundled("mixed.jsonl")),
        "--out",
        str(tmp_path / "tok-zh"),
        "--json",
    ]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["added"] == 80 and data["held_out"].endswith("mixed.jsonl")
