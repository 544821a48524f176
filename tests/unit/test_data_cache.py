"""Token cache: exact content, reuse vs rebuild, dtype, atomicity, bad input, multi-rank build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import sentencepiece as spm

from layerfreeze.data import (
    TokenCache,
    build_token_cache,
    default_corpus_files,
    iter_documents,
    load_tokenizer,
    train_tokenizer,
)
from layerfreeze.errors import ConfigError


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(["@bundled"], d / "tok", vocab_size=1500)
    return d / "tok"


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(str(tok_dir))


def _expected_stream(files, sp, *, bos, eos, **kw) -> np.ndarray:
    """Independent implementation: the raw SentencePiece processor, document by document."""
    out: list[int] = []
    for f in files:
        for doc in iter_documents(f, **kw):
            out += ([bos] if bos is not None else []) + sp.encode(doc) + [eos]
    return np.array(out, dtype=np.int64)


def _write_docs(path, docs):
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")


def test_stream_equals_documents_with_bos_eos(tok, tok_dir, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    cache = build_token_cache(["@bundled"], tok, tmp_path)
    files = default_corpus_files()
    expected = _expected_stream(files, sp, bos=1, eos=2)
    assert cache.tokens.dtype == np.uint16
    assert np.array_equal(np.asarray(cache.tokens, dtype=np.int64), expected)
    assert cache.num_tokens == expected.size
    assert cache.num_documents == sum(1 for f in files for _ in iter_documents(f))
    assert (cache.bos_id, cache.eos_id, cache.vocab_size) == (1, 2, 1500)
    index = json.loads((cache.path / "index.json").read_text())
    assert [r["path"] for r in index["files"]] == [str(f) for f in files]
    assert sum(r["tokens"] for r in index["files"]) == expected.size
    # add_bos=False: only EOS separators; line mode changes the documents.
    no_bos = build_token_cache(["@bundled"], tok, tmp_path, add_bos=False, txt_documents="line")
    assert no_bos.bos_id is None
    want = _expected_stream(files, sp, bos=None, eos=2, txt_documents="line")
    assert np.array_equal(np.asarray(no_bos.tokens, dtype=np.int64), want)
    assert no_bos.path != cache.path


def test_literal_special_token_text_stays_text(tok, tok_dir, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    f = tmp_path / "in" / "html.txt"
    f.parent.mkdir()
    _write_docs(f, ["a </s> inside <s> text", "second"])
    cache = build_token_cache([f], tok, tmp_path / "cache")
    stream = np.asarray(cache.tokens, dtype=np.int64)
    assert int((stream == 2).sum()) == 2 and int((stream == 1).sum()) == 2  # only the separators
    assert np.array_equal(stream, _expected_stream([f], sp, bos=1, eos=2))


def test_reuse_and_rebuild_on_change(tok, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _write_docs(data / "a.txt", ["one doc here", "another doc"])
    (data / "b.jsonl").write_text(json.dumps({"text": "json doc", "body": "other"}) + "\n")
    cache_dir = tmp_path / "cache"
    first = build_token_cache([data], tok, cache_dir)
    inode = os.stat(first.path / "tokens.bin").st_ino
    again = build_token_cache([data], tok, cache_dir)
    assert again.path == first.path
    assert os.stat(again.path / "tokens.bin").st_ino == inode  # reused, not rewritten

    keys = {first.path.name}
    # Option change -> new key.
    keys.add(build_token_cache([data], tok, cache_dir, text_key="body").path.name)
    # Tokenizer change -> new key.
    tok2 = load_tokenizer(str(first_tok_model(tmp_path)))
    keys.add(build_token_cache([data], tok2, cache_dir).path.name)
    # File change (content, size, mtime) -> new key with the new text.
    _write_docs(data / "a.txt", ["one doc here", "another doc", "a third one"])
    changed = build_token_cache([data], tok, cache_dir)
    keys.add(changed.path.name)
    assert changed.num_documents == 4 and first.num_documents == 3
    # New file in a directory -> new key.
    _write_docs(data / "c.txt", ["more"])
    keys.add(build_token_cache([data], tok, cache_dir).path.name)
    assert len(keys) == 5
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted(keys)  # no temp leftovers


def first_tok_model(tmp_path):
    """A different tokenizer (smaller vocab) trained on the same text."""
    out = tmp_path / "tok_small"
    if not out.exists():
        train_tokenizer([default_corpus_files()[0]], out, vocab_size=400)
    return out / "tokenizer.model"


def test_uint32_for_large_vocabularies(tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    big = TokenizersBackend(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", bos_token=None)
    f = tmp_path / "w.txt"
    _write_docs(f, ["w69999 w5 w65534", "w65535 nope"])
    cache = build_token_cache([f], big, tmp_path / "cache")
    assert cache.tokens.dtype == np.uint32 and cache.bos_id is None
    assert cache.tokens.tolist() == [70001, 7, 65536, 1, 65537, 0, 1]


def test_damaged_cache_is_rebuilt(tok, tmp_path):
    f = tmp_path / "a.txt"
    _write_docs(f, ["some text to cache", "more text"])
    good = build_token_cache([f], tok, tmp_path / "cache")
    expected = np.array(good.tokens)
    with open(good.path / "tokens.bin", "r+b") as fh:
        fh.truncate(4)
    with pytest.raises(ValueError, match="not a usable token cache .*tokens.bin has 4 bytes"):
        TokenCache.open(good.path)
    rebuilt = build_token_cache([f], tok, tmp_path / "cache")
    assert rebuilt.path == good.path and np.array_equal(np.array(rebuilt.tokens), expected)


def test_failure_mid_build_leaves_nothing(tok, tmp_path):
    f = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": f"document number {i}"}) for i in range(1000)]
    lines.insert(900, "{broken")  # after several encode batches were already written
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cache_dir = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"docs.jsonl:901: not valid JSON"):
        build_token_cache([f], tok, cache_dir)
    assert not cache_dir.exists()  # no empty cache directory left behind either
    del lines[900]
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert build_token_cache([f], tok, cache_dir).num_documents == 1000


@pytest.mark.slow
def test_killed_build_is_never_trusted(tok_dir, tmp_path, repo_root):
    """SIGKILL a real build mid-way: only a temp dir remains, and the next build ignores it."""
    big = tmp_path / "big.txt"
    text = "\n\n".join(d for f in default_corpus_files() for d in iter_documents(f))
    big.write_text("\n\n".join([text] * 8), encoding="utf-8")
    cache_dir = tmp_path / "cache"
    script = textwrap.dedent(
        f"""
        from layerfreeze.data import build_token_cache, load_tokenizer
        build_token_cache([{str(big)!r}], load_tokenizer({str(tok_dir)!r}), {str(cache_dir)!r})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=repo_root)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            tmps = list(cache_dir.glob(".*.tmp/tokens.bin")) if cache_dir.exists() else []
            if tmps and tmps[0].stat().st_size > 0:
                break
            assert proc.poll() is None, "the build finished before it could be interrupted"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    left = list(cache_dir.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".") and left[0].name.endswith(".tmp")
    assert not (left[0] / "index.json").exists()
    with pytest.raises(ValueError, match="no index.json"):
        TokenCache.open(left[0])
    cache = build_token_cache([big], load_tokenizer(str(tok_dir)), cache_dir)
    assert cache.num_documents == 8 * sum(1 for f in default_corpus_files() for _ in iter_documents(f))
    assert cache.path.name == left[0].name[1:].split(".")[0]


def test_bad_input_errors(tok, tmp_path):
    cache_dir = tmp_path / "cache"
    with pytest.raises(ConfigError, match=r"data.paths\[0\]: no such file or directory, got '.*nope.txt'"):
        build_token_cache([tmp_path / "nope.txt"], tok, cache_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("\n\n  \n", encoding="utf-8")
    (empty / "b.jsonl").write_text('{"text": ""}\n\n', encoding="utf-8")
    nested = cache_dir / "sub" / "dir"
    with pytest.raises(ValueError, match=r"data.paths: the corpus has no text: .*a.txt, .*b.jsonl hold 0"):
        build_token_cache([empty], tok, nested)
    assert not cache_dir.exists()  # the directories the failed build created are gone
    (tmp_path / "kept").mkdir()
    with pytest.raises(ValueError, match=r"the corpus has no text"):
        build_token_cache([empty], tok, tmp_path / "kept")
    assert (tmp_path / "kept").is_dir() and list((tmp_path / "kept").iterdir()) == []


def test_tokenizer_without_eos_is_rejected(tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    backend = Tokenizer(WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    no_eos = TokenizersBackend(tokenizer_object=backend, unk_token="<unk>", eos_token=None, bos_token=None)
    (tmp_path / "a.txt").write_text("a a\n")
    with pytest.raises(ValueError, match="tokenizer.path: the tokenizer has no EOS token"):
        build_token_cache([tmp_path / "a.txt"], no_eos, tmp_path / "cache")


def _rank_builds(rank, world_size, tok_dir, data, blank, cache_dir):
    from layerfreeze.data import build_token_cache, load_tokenizer

    tok = load_tokenizer(tok_dir)
    cache = build_token_cache([data], tok, cache_dir)
    try:
        build_token_cache([blank], tok, cache_dir)
        err = "no error"
    except Exception as e:  # the test checks what each rank saw
        err = f"{type(e).__name__}: {e}"
    return str(cache.path), np.asarray(cache.tokens).tolist(), err


@pytest.mark.slow
def test_two_ranks_share_one_build(tok_dir, tmp_path):
    from tests.helpers.dist import run_distributed

    data = tmp_path / "d.txt"
    _write_docs(data, [f"document {i} 文档" for i in range(50)])
    (tmp_path / "blank.txt").write_text("\n\n")
    cache_dir = tmp_path / "cache"
    results = run_distributed(
        _rank_builds, 2, args=(str(tok_dir), str(data), str(tmp_path / "blank.txt"), str(cache_dir))
    )
    assert results[0][:2] == results[1][:2]
    assert [p.name for p in cache_dir.iterdir()] == [os.path.basename(results[0][0])]
    # A build error on local rank 0 reaches rank 1 too (no rank hangs in a barrier).
    assert results[0][2].startswith("ValueError: data.paths: the corpus has no text")
    assert results[1][2].startswith("RuntimeError: rank 0 failed") and "the corpus has no text" in results[1][2]
