"""Hostile input to `layerfreeze tokenizer extend`: one ERROR line naming the file/option and
what would be valid, exit 2, and nothing written (no output directory, no temp directory)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.cli import error_line
from tests.helpers.tokenizer_fixtures import build_llama2_style, build_qwen_style, bundled


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {"sp": build_llama2_style(root / "sp"), "bl": build_qwen_style(root / "bl")}


def _argv(base, out, corpus=None, *extra) -> list[str]:
    corpus = [str(bundled("zh.txt"))] if corpus is None else corpus
    return [
        "tokenizer",
        "extend",
        "--base",
        str(base),
        "--corpus",
        *corpus,
        "--vocab-size",
        "800",
        "--out",
        str(out),
        *extra,
    ]


def _nothing_written(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_base_without_tokenizer(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    line = error_line(capsys, _argv(tmp_path / "empty", tmp_path / "out"))
    assert (
        "base:" in line and "empty" in line and "no tokenizer.model and no tokenizer.json" in line
    )
    assert "SentencePiece" in line and "byte-level BPE" in line
    _nothing_written(tmp_path, tmp_path / "out")


def test_base_missing(tmp_path, capsys):
    line = error_line(capsys, _argv(tmp_path / "nope", tmp_path / "out"))
    assert "base:" in line and "nope" in line and "not a directory" in line


def test_wordpiece_base_is_refused(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        bundled("en.txt").read_text(encoding="utf-8").splitlines()[:300],
        trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"], show_progress=False),
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(
        str(tmp_path / "wp")
    )
    line = error_line(capsys, _argv(tmp_path / "wp", tmp_path / "out"))
    assert "WordPiece" in line and "Valid bases" in line
    _nothing_written(tmp_path, tmp_path / "out")


def test_corrupt_sentencepiece_model(tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.model").write_bytes(b"\xff\x00 not a proto")
    line = error_line(capsys, _argv(tmp_path / "bad", tmp_path / "out"))
    assert "tokenizer.model" in line and "not a SentencePiece model" in line


def test_corpus_missing_and_empty(bases, tmp_path, capsys):
    line = error_line(capsys, _argv(bases["sp"], tmp_path / "out", [str(tmp_path / "zh.txt")]))
    assert "--corpus" in line and "zh.txt" in line
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    line = error_line(capsys, _argv(bases["bl"], tmp_path / "out", [str(tmp_path / "empty.txt")]))
    assert "--corpus: no text found" in line and "empty.txt" in line
    _nothing_written(tmp_path, tmp_path / "out")


def test_held_out_without_chinese(bases, tmp_path, capsys):
    line = error_line(
        capsys, _argv(bases["sp"], tmp_path / "out", None, "--held-out", str(bundled("en.txt")))
    )
    assert "--held-out: no Chinese characters" in line and "en.txt" in line
    _nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("kind", ["sp", "bl"])
def test_failure_after_training_leaves_nothing(bases, kind, tmp_path, capsys):
    """An English corpus trains fine but its held-out part has no Chinese: the error comes after
    the files were written into the temp directory, which is removed."""
    line = error_line(capsys, _argv(bases[kind], tmp_path / "out", [str(bundled("en.txt"))]))
    assert "--corpus: the held-out documents" in line and "--held-out" in line
    _nothing_written(tmp_path, tmp_path / "out")


def test_existing_output_is_kept(bases, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = error_line(capsys, _argv(bases["sp"], out))
    assert "--out" in line and "--overwrite" in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    ("flag", "value", "expect"),
    [
        ("--vocab-size", "100", "--vocab-size: must be an integer above 260, got 100."),
        ("--max-new", "0", "--max-new: must be a positive integer"),
    ],
)
def test_bad_sizes(bases, tmp_path, capsys, flag, value, expect):
    argv = _argv(bases["bl"], tmp_path / "out")
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    assert expect in error_line(capsys, argv)
    _nothing_written(tmp_path, tmp_path / "out")


def test_vocab_size_too_large_for_the_corpus(bases, tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(bundled("zh.txt").read_text(encoding="utf-8").split("\n\n")[:30]))
    argv = _argv(bases["sp"], tmp_path / "out", [str(small)])
    argv[argv.index("--vocab-size") + 1] = "20000"
    line = error_line(capsys, argv)
    assert "vocab_size: 20000 is too large" in line and "--vocab-size " in line
    _nothing_written(tmp_path, tmp_path / "out")


def test_added_tokens_past_the_sentencepiece_pieces(bases, tmp_path, capsys):
    """A Llama tokenizer.json with a pad token added after the proto's pieces: new pieces would
    take its id."""
    import shutil

    from transformers import AutoTokenizer

    base = tmp_path / "padded"
    shutil.copytree(bases["sp"], base)
    tok = AutoTokenizer.from_pretrained(str(base))
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.save_pretrained(str(base))
    assert json.loads((base / "tokenizer.json").read_text())["added_tokens"][-1]["id"] == 600
    line = error_line(capsys, _argv(base, tmp_path / "out"))
    assert "uses ids up to 600" in line and "600 pieces" in line
    _nothing_written(tmp_path, tmp_path / "out")


def test_broken_tokenizer_json(tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text('{"model": {"type": "BPE", ')
    line = error_line(capsys, _argv(tmp_path / "bad", tmp_path / "out"))
    assert "--base:" in line and "tokenizer.json is not readable JSON" in line
    _nothing_written(tmp_path, tmp_path / "out")
