"""SentencePiece tokenizer training, the AutoTokenizer form, and load_tokenizer."""

from __future__ import annotations

import os

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from layerfreeze.data import (
    TokenizerConfig,
    default_corpus_files,
    load_tokenizer,
    prepare_tokenizer,
    train_tokenizer,
)
from layerfreeze.errors import ConfigError
from layerfreeze.utils.schema import from_dict

# Mixed Chinese/English probes, with characters the corpus never contains (emoji, rare hanzi,
# accents, full-width forms) and every whitespace shape that normalization could disturb.
PROBES = [
    "",
    " ",
    "我们今天学习 machine learning，天气很好。",
    "The capital of France is Paris. 法国的首都是巴黎。",
    "  two leading spaces and   three inside  ",
    "tab\tand\nnewline 换行\n\n两个换行",
    "emoji 😀🚀 ünïcödé 龘龖 ＡＢＣ１２３，！",
    "12345 + 67890 = 80235",
    "<s> literal control text </s> <pad> <unk> <0x41>",
    "熊猫喜欢吃竹子。Pandas like bamboo.",
]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """The first ~60 KB of each bundled .txt file, so training takes about a second."""
    d = tmp_path_factory.mktemp("corpus")
    for f in default_corpus_files():
        if f.suffix == ".txt":
            text = f.read_text(encoding="utf-8")[:20000]
            (d / f.name).write_text(text, encoding="utf-8")
    return d


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def trained(request, small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"tok_{request.param}") / "tok"
    train_tokenizer([small_corpus], out, vocab_size=1200, model_type=request.param)
    return out


def test_autotokenizer_encodes_like_sentencepiece(trained):
    sp = spm.SentencePieceProcessor(model_file=str(trained / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(str(trained))
    assert len(hf) == sp.get_piece_size() == 1200
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    for text in PROBES:
        ids = sp.encode(text)
        assert hf.encode(text, add_special_tokens=False, split_special_tokens=True) == ids, text
        # Default call adds BOS only.
        assert hf(text, split_special_tokens=True)["input_ids"] == [1, *ids], text
        # Byte fallback + identity normalization: decoding gives the text back exactly.
        assert hf.decode(ids) == sp.decode(ids) == text, text
    assert sp.unk_id() not in sp.encode("😀龘")


def test_corpus_documents_encode_identically(trained):
    from layerfreeze.data import iter_documents

    sp = spm.SentencePieceProcessor(model_file=str(trained / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(str(trained))
    docs = [d for f in default_corpus_files() for d in iter_documents(f)][::7]
    got = hf(docs, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert got == [sp.encode(d) for d in docs]


def test_load_tokenizer_accepts_dir_model_file_and_config(trained):
    sp = spm.SentencePieceProcessor(model_file=str(trained / "tokenizer.model"))
    from_dir = load_tokenizer(TokenizerConfig(path=str(trained)))
    from_model = load_tokenizer(str(trained / "tokenizer.model"))
    for tok in (from_dir, from_model):
        assert tok.eos_token_id == 2 and tok.bos_token_id == 1
        for text in PROBES:
            assert tok.encode(text, add_special_tokens=False, split_special_tokens=True) == sp.encode(text)


def test_foreign_sentencepiece_model_with_nfkc_and_whitespace_cleanup(small_corpus, tmp_path):
    """A .model trained elsewhere with SentencePiece's defaults (NFKC, extra-space removal)."""
    text = "\n".join((small_corpus / "zh.txt").read_text().splitlines() + (small_corpus / "en.txt").read_text().splitlines())
    (tmp_path / "lines.txt").write_text(text, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "lines.txt"), model_prefix=str(tmp_path / "m"), vocab_size=1200,
        byte_fallback=True, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    tok = load_tokenizer(str(tmp_path / "m.model"))
    for probe in PROBES:
        if "<s>" in probe:  # control pieces in text: SentencePiece treats them as text too
            continue
        assert tok.encode(probe, add_special_tokens=False) == sp.encode(probe), probe


def test_cli_train_writes_an_autotokenizer_dir(small_corpus, tmp_path):
    from layerfreeze.cli import main

    out = tmp_path / "cli_tok"
    argv = ["tokenizer", "train", "--input", str(small_corpus / "zh.txt"), str(small_corpus / "en.txt"),
            "--vocab-size", "1000", "--out", str(out), "--model-type", "bpe",
            "--character-coverage", "0.99"]
    assert main(argv) == 0
    assert {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"} <= set(os.listdir(out))
    hf = AutoTokenizer.from_pretrained(str(out))
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert len(hf) == 1000
    assert hf.encode(PROBES[2], add_special_tokens=False) == sp.encode(PROBES[2])


def test_training_is_deterministic(small_corpus, tmp_path):
    a = train_tokenizer([small_corpus / "en.txt"], tmp_path / "a", vocab_size=400)
    b = train_tokenizer([small_corpus / "en.txt"], tmp_path / "b", vocab_size=400)
    assert (a / "tokenizer.model").read_bytes() == (b / "tokenizer.model").read_bytes()


def test_prepare_tokenizer_trains_once_then_reuses(small_corpus, tmp_path):
    cfg = TokenizerConfig(vocab_size=400)
    out = tmp_path / "run_tok"
    tok = prepare_tokenizer(cfg, [small_corpus / "en.txt"], out)
    stamp = (out / "tokenizer.json").stat().st_mtime_ns
    again = prepare_tokenizer(cfg, [small_corpus / "en.txt"], out)
    assert (out / "tokenizer.json").stat().st_mtime_ns == stamp
    assert again.encode("hello world") == tok.encode("hello world")
    assert len(tok) == 400
    with pytest.raises(ConfigError, match=r"tokenizer.vocab_size: .* trained with vocab_size=400, got 500"):
        prepare_tokenizer(TokenizerConfig(vocab_size=500), [small_corpus / "en.txt"], out)


# ---- bad input -------------------------------------------------------------------------------


def test_missing_input_names_the_entry(tmp_path):
    with pytest.raises(ConfigError, match=r"input\[1\]: no such file or directory, got '.*nope.txt'"):
        train_tokenizer([default_corpus_files()[0], tmp_path / "nope.txt"], tmp_path / "out", vocab_size=300)
    assert not (tmp_path / "out").exists()


def test_empty_input_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n   \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"input: no text found in .*empty.txt"):
        train_tokenizer([tmp_path / "empty.txt"], tmp_path / "out", vocab_size=300)
    assert not (tmp_path / "out").exists()


def test_vocab_too_large_suggests_a_size_that_works(small_corpus, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("previous tokenizer")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text((small_corpus / "en.txt").read_text()[:3000], encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab_size: 5000 is too large .*Use --vocab-size (\d+) or less") as err:
        train_tokenizer([tiny], tmp_path / "out", vocab_size=5000)
    # Nothing half-written: the old directory is untouched and no temp dirs remain.
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out", "tiny.txt"]
    suggested = int(str(err.value).split("--vocab-size ")[1].split()[0])
    out = train_tokenizer([tiny], tmp_path / "ok", vocab_size=suggested)
    assert len(load_tokenizer(out)) == suggested


def test_vocab_too_small_for_the_characters(small_corpus, tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size: 300 is too small.*Use --vocab-size \d+ or more"):
        train_tokenizer([small_corpus / "zh.txt"], tmp_path / "out", vocab_size=300, character_coverage=1.0)


def test_bad_options(tmp_path):
    with pytest.raises(ConfigError) as err:
        train_tokenizer(default_corpus_files(), tmp_path / "o", vocab_size=100, model_type="word")
    assert len(err.value.problems) == 2
    assert "model_type: must be one of unigram, bpe, got 'word'" in str(err.value)
    assert "vocab_size: must be an integer above 260" in str(err.value)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer.path: no tokenizer given"):
        load_tokenizer(TokenizerConfig())
    with pytest.raises(ConfigError, match="tokenizer.path: no such file or directory, got '.*missing'"):
        load_tokenizer(TokenizerConfig(path=str(tmp_path / "missing")))
    (tmp_path / "junk.model").write_bytes(b"\x00\x01not a model")
    with pytest.raises(ConfigError, match="tokenizer.path: .*junk.model: not a SentencePiece model"):
        load_tokenizer(str(tmp_path / "junk.model"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ConfigError, match="tokenizer.path: '.*emptydir' holds no tokenizer"):
        load_tokenizer(str(tmp_path / "emptydir"))


def test_tokenizer_config_validation():
    with pytest.raises(ConfigError) as err:
        from_dict(TokenizerConfig, {"vocab_size": 10, "character_coverage": 1.5, "model_typ": "bpe"})
    msg = str(err.value)
    assert "model_typ: unknown key. Did you mean 'model_type'?" in msg
    with pytest.raises(ConfigError) as err:
        from_dict(TokenizerConfig, {"vocab_size": 10, "character_coverage": 1.5})
    assert any(p.startswith("tokenizer.vocab_size: must be above 260") for p in err.value.problems)
    assert any(p.startswith("tokenizer.character_coverage: must be in (0, 1]") for p in err.value.problems)
    with pytest.raises(ConfigError, match="model_type: must be one of 'unigram', 'bpe'"):
        from_dict(TokenizerConfig, {"model_type": "word"})


def test_fingerprint_is_stable_across_loads_and_separates_tokenizers(trained, small_corpus, tmp_path):
    from layerfreeze.data import tokenizer_fingerprint

    a = tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(trained)))
    b = tokenizer_fingerprint(load_tokenizer(str(trained)))
    assert a == b
    other = train_tokenizer([small_corpus / "en.txt"], tmp_path / "other", vocab_size=400)
    assert tokenizer_fingerprint(load_tokenizer(str(other))) != a


def test_prepare_tokenizer_needs_a_path_or_an_out_dir(small_corpus):
    with pytest.raises(ConfigError, match="tokenizer.path: no tokenizer given and nowhere to train one"):
        prepare_tokenizer(TokenizerConfig(), [small_corpus], None)


def test_prepare_tokenizer_names_the_run_config_keys_in_vocab_size_errors(small_corpus, tmp_path):
    """Under `layerfreeze train` the advice names tokenizer.* keys, not the tokenizer CLI flags."""
    cfg = TokenizerConfig(vocab_size=300, character_coverage=1.0)
    with pytest.raises(ValueError) as err:
        prepare_tokenizer(cfg, [small_corpus / "zh.txt"], tmp_path / "tok")
    msg = str(err.value)
    assert msg.startswith("tokenizer.vocab_size: 300 is too small:"), msg
    assert "lower tokenizer.character_coverage" in msg and "--" not in msg
    assert not (tmp_path / "tok").exists()
    # The size it suggests is one the text supports.
    need = int(msg.split("Use tokenizer.vocab_size=")[1].split()[0])
    tok = prepare_tokenizer(TokenizerConfig(vocab_size=need, character_coverage=1.0),
                            [small_corpus / "zh.txt"], tmp_path / "ok")
    assert len(tok) == need
