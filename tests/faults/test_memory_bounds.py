"""Pathological input keeps memory bounded: one huge line is tokenized (and trained on) in pieces.

A document longer than the cut budget (``cache._CUT_CHARS`` characters) is encoded in pieces cut
just before a space (else a newline, else at the budget) and its ids are written piece by piece,
so peak memory follows the budget, not the document. A normal document's ids are unchanged, and
at a cut before a space the ids equal the whole document's (whitespace-split tokenizers never put
a token across a space). Tokenizer training cuts lines above SentencePiece's sentence limit
instead of letting SentencePiece drop them.
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import sentencepiece as spm

from layerfreeze.data import build_token_cache, load_tokenizer, train_tokenizer
from layerfreeze.data import cache as cache_mod

WORDS = ["alpha", "beta", "天气", "gamma", "delta", "123", "的", "shop", "Zürich", "snow,"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer(["@bundled"], d, vocab_size=1500)
    return d


def _words(n_chars: int, seed: int) -> str:
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_chars:
        w = rng.choice(WORDS)
        parts.append(w)
        size += len(w) + 1
    return " ".join(parts)


_CHILD = textwrap.dedent(
    """
    import json, sys
    from layerfreeze.data import build_token_cache, load_tokenizer
    tok = load_tokenizer(sys.argv[1])
    cache = build_token_cache([sys.argv[2]], tok, sys.argv[3], encoder=sys.argv[4])
    status = open("/proc/self/status").read().split("\\n")
    hwm = next(int(l.split()[1]) for l in status if l.startswith("VmHWM:"))  # kB
    print(json.dumps({"peak_mb": hwm / 1024, "tokens": cache.num_tokens}))
    """
)


def _peak_mb(tok_dir, text_file, cache_dir, encoder) -> tuple[float, int]:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tok_dir), str(text_file), str(cache_dir), encoder],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["peak_mb"], out["tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ["auto", "hf"])
def test_one_huge_line_tokenizes_in_bounded_memory(tok_dir, tmp_path, encoder):
    # 4 MB on one line: the old code peaked about 900 MB above the tiny-file baseline (~200x
    # the line) because the whole document went to the encoder at once.
    tiny, huge = tmp_path / "tiny.txt", tmp_path / "huge.txt"
    tiny.write_text("hello world\n", encoding="utf-8")
    huge.write_text(_words(4_000_000, seed=1) + "\n", encoding="utf-8")
    base_mb, _ = _peak_mb(tok_dir, tiny, tmp_path / "c0", encoder)
    peak_mb, tokens = _peak_mb(tok_dir, huge, tmp_path / "c1", encoder)
    assert tokens > 1_000_000
    # the line itself is held once as text (about 4-16 MB); the encoder sees 512K characters
    assert peak_mb - base_mb < 150, f"peak {peak_mb:.0f} MB vs baseline {base_mb:.0f} MB"


@pytest.mark.parametrize("encoder", ["auto", "hf"])
def test_long_document_cut_at_spaces_gives_the_whole_documents_ids(tok_dir, tmp_path, encoder):
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    tok = load_tokenizer(tok_dir)
    long_doc = _words(5 * cache_mod._CUT_CHARS + 123, seed=2)
    short = "a short document 天气很好"
    f = tmp_path / "docs.txt"
    f.write_text(f"{short}\n\n{long_doc}\n\n{short}\n", encoding="utf-8")
    cache = build_token_cache([f], tok, tmp_path / "cache", encoder=encoder)
    # independent reference: SentencePiece on each whole document
    want = []
    for doc in (short, long_doc, short):
        want += [1, *sp.encode(doc), 2]
    assert np.array_equal(np.asarray(cache.tokens, dtype=np.int64), np.array(want))
    assert cache.num_documents == 3


def test_run_without_spaces_is_cut_without_losing_or_adding_text(tok_dir, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    tok = load_tokenizer(tok_dir)
    rng = random.Random(3)
    # Chinese without a space for 3.5 budgets, then a paragraph whose lines are cut at "\n"
    run = "".join(rng.choice("天气很好我们去公园的人今天学校") for _ in range(int(3.5 * cache_mod._CUT_CHARS)))
    lines = "\n".join(run[i : i + 5000] for i in range(0, len(run), 5000))
    f = tmp_path / "zh.txt"
    f.write_text(f"{run}\n\n{lines}\n", encoding="utf-8")
    for workers in (1, 2):
        cache = build_token_cache(
            [f], tok, tmp_path / f"cache{workers}", num_workers=workers, chunk_bytes=1 << 16
        )
        ids = np.asarray(cache.tokens, dtype=np.int64).tolist()
        eos = [i for i, t in enumerate(ids) if t == 2]
        assert len(eos) == 2 and ids[0] == 1 and ids[eos[0] + 1] == 1
        # nothing lost, nothing injected: each document decodes to exactly its text
        assert sp.decode(ids[1 : eos[0]]) == run
        assert sp.decode(ids[eos[0] + 2 : eos[1]]) == lines
        # cut before a newline: no piece of a layerfreeze tokenizer holds one, so the ids are
        # exactly the whole document's
        assert ids[eos[0] + 2 : eos[1]] == sp.encode(lines)
        # a cut splits at most a token or two per piece
        assert abs(eos[0] - 1 - len(sp.encode(run))) <= 2 * 4


def test_tokenizer_training_cuts_an_over_long_line_and_says_so(tmp_path, caplog):
    # one 1 MB line: SentencePiece skips sentences over max_sentence_length, so training on it
    # used to fail with "[!sentences_.empty()]" (and a long line beside others was dropped silently)
    f = tmp_path / "one_line.txt"
    f.write_text(_words(1_000_000, seed=4) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="layerfreeze"):
        out = train_tokenizer([f], tmp_path / "tok", vocab_size=400, model_type="bpe")
    notes = [r.getMessage() for r in caplog.records if "longer than" in r.getMessage()]
    assert len(notes) == 1, [r.getMessage() for r in caplog.records]
    assert "1 line" in notes[0] and str(f) in notes[0], notes[0]
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert "▁Zürich" in {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
