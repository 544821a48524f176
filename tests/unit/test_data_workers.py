"""The data path at scale: byte-range pieces of large files, multi-process tokenisation identical
to one process, globs over many files, bounded memory, and the config fields."""

from __future__ import annotations

import json
import random
import tracemalloc

import numpy as np
import pytest
import sentencepiece as spm

from layerfreeze.data import (
    DataConfig,
    build_token_cache,
    default_corpus_files,
    iter_documents,
    load_tokenizer,
    resolve_files,
    train_tokenizer,
)
from layerfreeze.data.cache import sentencepiece_model_of
from layerfreeze.data.corpus import split_file
from layerfreeze.errors import ConfigError
from layerfreeze.utils.schema import from_dict


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(["@bundled"], d / "tok", vocab_size=1500)
    return d / "tok"


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(str(tok_dir))


def _awkward_text(seed: int, n: int = 300) -> str:
    """Paragraphs separated by blank, whitespace-only and CRLF lines; lone CRs; CJK text."""
    r = random.Random(seed)
    words = ["天气", "很好", "hello", "world", "数学", "3.14", "<s>", "</s>", "é", "  "]
    seps = ["\n\n", "\n \n", "\r\n\r\n", "\n\t\n\n", "\n\u3000\n"]
    paras = []
    for _ in range(n):
        lines = [
            " ".join(r.choice(words) for _ in range(r.randint(1, 12)))
            for _ in range(r.randint(1, 4))
        ]
        nl = r.choice(["\n", "\r\n", "\r"])
        paras.append(nl.join(lines))
    out = paras[0]
    for p in paras[1:]:
        out += r.choice(seps) + p
    return out + "\n"


@pytest.mark.parametrize("mode", ["paragraph", "line"])
@pytest.mark.parametrize("chunk", [1, 37, 500, 4096, 10**9])
def test_byte_ranges_yield_the_whole_files_documents(tmp_path, mode, chunk):
    f = tmp_path / "a.txt"
    f.write_bytes(_awkward_text(1).encode("utf-8"))
    ranges = split_file(f, chunk, txt_documents=mode)
    size = f.stat().st_size
    assert ranges[0][0] == 0 and ranges[-1][1] == size
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:], strict=False))
    if chunk < size:
        assert len(ranges) > 1
    whole = list(iter_documents(f, txt_documents=mode))
    pieces = [d for r in ranges for d in iter_documents(f, txt_documents=mode, byte_range=r)]
    assert pieces == whole and len(whole) > 100


def test_byte_ranges_of_jsonl(tmp_path):
    f = tmp_path / "a.jsonl"
    docs = [f"第{i}篇 document {i} " * (i % 7 + 1) for i in range(400)]
    lines = [json.dumps({"text": d}, ensure_ascii=False) for d in docs]
    f.write_text(
        "\n".join(lines[:200]) + "\n\n" + "\r\n".join(lines[200:]) + "\n", encoding="utf-8"
    )
    for chunk in (1, 100, 3000):
        ranges = split_file(f, chunk)
        got = [d for r in ranges for d in iter_documents(f, byte_range=r)]
        assert got == [d.strip() for d in docs]


def _build_pair(files, tok, tmp_path, **kw):
    one = build_token_cache(files, tok, tmp_path / "one", **kw)
    many = build_token_cache(files, tok, tmp_path / "many", num_workers=2, chunk_bytes=20_000, **kw)
    return one, many


@pytest.mark.parametrize("mode", ["paragraph", "line"])
def test_workers_build_the_same_cache_as_one_process(tok, tok_dir, tmp_path, mode):
    awkward = tmp_path / "in" / "awkward.txt"
    awkward.parent.mkdir()
    awkward.write_bytes(_awkward_text(2, 900).encode("utf-8"))
    files = [*default_corpus_files(), awkward]  # 4 files, 3 larger than one 20 kB piece
    one, many = _build_pair([str(f) for f in files], tok, tmp_path, txt_documents=mode)
    assert many.path.name == one.path.name  # the number of workers is not part of the key
    assert (one.path / "tokens.bin").read_bytes() == (many.path / "tokens.bin").read_bytes()
    i1, i2 = (json.loads((c.path / "index.json").read_text()) for c in (one, many))
    i1.pop("created"), i2.pop("created")
    assert i1 == i2
    assert not list(many.path.glob("part-*"))
    # Independent implementation: the raw SentencePiece processor, document by document.
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    want = [
        t
        for f in files
        for d in iter_documents(f, txt_documents=mode)
        for t in (1, *sp.encode(d), 2)
    ]
    assert np.asarray(many.tokens, dtype=np.int64).tolist() == want
    assert [r["documents"] for r in i2["files"]] == [
        sum(1 for _ in iter_documents(f, txt_documents=mode)) for f in files
    ]


def test_a_cache_built_by_one_process_is_reused_by_workers(tok, tmp_path):
    one = build_token_cache(["@bundled"], tok, tmp_path)
    mtime = (one.path / "index.json").stat().st_mtime_ns
    again = build_token_cache(["@bundled"], tok, tmp_path, num_workers=2, chunk_bytes=10_000)
    assert again.path == one.path
    assert (again.path / "index.json").stat().st_mtime_ns == mtime
    assert len(list(tmp_path.iterdir())) == 1


def test_a_bad_line_in_a_later_piece_names_the_file_line(tok, tmp_path):
    f = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": f"document {i} " * 20}) for i in range(300)]
    lines[250] = '{"text": 5}'
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    msgs = []
    for kw in ({}, {"num_workers": 2, "chunk_bytes": 2000}):
        with pytest.raises(ValueError) as e:
            build_token_cache([f], tok, tmp_path / "c", **kw)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1] == f"{f}:251: field 'text' must be a string, got int."
    assert not any((tmp_path / "c").glob("*"))  # nothing half-written


def test_globs_select_many_files_in_sorted_order(tmp_path):
    for sub in ("b", "a/x", "a"):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
    made = []
    for rel in ("a/2.txt", "a/x/1.jsonl", "b/3.txt", "b/skip.csv", "top.txt"):
        (tmp_path / rel).write_text("x\n", encoding="utf-8")
        made.append(tmp_path / rel)
    assert resolve_files([str(tmp_path / "**" / "*.txt")]) == sorted(
        [tmp_path / "a/2.txt", tmp_path / "b/3.txt", tmp_path / "top.txt"]
    )
    assert resolve_files([str(tmp_path / "[ab]")]) == [
        tmp_path / "a/2.txt",
        tmp_path / "a/x/1.jsonl",
        tmp_path / "b/3.txt",
    ]
    with pytest.raises(
        ConfigError, match=r"data.paths\[0\]: the pattern '.*\*.parquet' matches no"
    ):
        resolve_files([str(tmp_path / "*.parquet")])


def _peak_python_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_stays_bounded_by_the_batch_not_the_corpus(tok, tmp_path):
    """Python-side peak allocation while caching does not grow with the corpus: 8x the text
    (~3.5 MB, over a million tokens) peaks about as high as 1x, below the text or its ids."""
    one = _awkward_text(3, 5_000)
    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    small.write_text(one, encoding="utf-8")
    big.write_text(one * 8, encoding="utf-8")
    build = lambda f, d: build_token_cache([f], tok, tmp_path / d)  # noqa: E731
    build(small, "warm")  # imports and one-off allocations outside the measurement
    p_small = _peak_python_bytes(lambda: build(small, "s"))
    p_big = _peak_python_bytes(lambda: build(big, "b"))
    n_big = TokenCacheLike(tmp_path / "b").num_tokens
    assert big.stat().st_size > 3e6 and n_big > 1e6
    assert p_big < 1.25 * p_small + (256 << 10), (p_small, p_big)
    assert p_big < min(big.stat().st_size, 8 * n_big) / 1.5, (p_big, big.stat().st_size)


class TokenCacheLike:
    """The single cache directory under ``root``."""

    def __init__(self, root):
        (self.path,) = [d for d in root.iterdir() if not d.name.startswith(".")]
        self.num_tokens = json.loads((self.path / "index.json").read_text())["num_tokens"]


def test_config_fields():
    cfg = from_dict(DataConfig, {"num_workers": 0, "chunk_mb": 8})
    assert (cfg.num_workers, cfg.chunk_mb) == (0, 8)
    with pytest.raises(ConfigError, match=r"data.num_workers: must be 0 \(one per CPU\).*got -1"):
        DataConfig(num_workers=-1)
    with pytest.raises(ConfigError, match=r"data.chunk_mb: must be at least 1 \(MiB\), got 0"):
        DataConfig(chunk_mb=0)
    with pytest.raises(ValueError, match=r"data.num_workers: must be 0 \(one per CPU\)"):
        build_token_cache(["@bundled"], None, "/nonexistent", num_workers=-2)


def test_sentencepiece_fast_path_equals_the_hf_tokenizer(tok, tok_dir, tmp_path):
    assert sentencepiece_model_of(tok) == tok_dir / "tokenizer.model"
    text = tmp_path / "t.txt"
    text.write_bytes(_awkward_text(5, 600).encode("utf-8"))
    files = [*default_corpus_files(), text]
    fast = build_token_cache(files, tok, tmp_path / "fast", num_workers=2, chunk_bytes=50_000)
    slow = build_token_cache(files, tok, tmp_path / "slow", encoder="hf")
    assert fast.path.name == slow.path.name
    assert (fast.path / "tokens.bin").read_bytes() == (slow.path / "tokens.bin").read_bytes()


def test_sentencepiece_fast_path_only_for_the_exact_conversion(tok_dir, tmp_path):
    from transformers import AutoTokenizer

    changed = AutoTokenizer.from_pretrained(str(tok_dir))
    changed.add_tokens(["天气很好"])  # now encodes differently from tokenizer.model
    assert sentencepiece_model_of(changed) is None
    f = tmp_path / "a.txt"
    f.write_text("今天天气很好。\n\n天气很好 hello\n", encoding="utf-8")
    cache = build_token_cache([f], changed, tmp_path / "c")
    new_id = changed.convert_tokens_to_ids("天气很好")
    assert new_id in np.asarray(cache.tokens).tolist()
