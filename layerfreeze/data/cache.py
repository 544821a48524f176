"""Tokenize a corpus once into a memory-mapped token file, cached by what produced it.

Layout of ``<cache_dir>/<key>/`` (the key is a SHA-256 prefix, see :func:`cache_key`):

- ``tokens.bin``: every document's ids back to back, ``[BOS] doc [EOS]`` (BOS only when
  ``add_bos`` and the tokenizer has one), as little-endian ``uint16`` when the vocabulary has
  fewer than 65536 ids, else ``uint32``.
- ``index.json``: format version, key, dtype, token and document counts, special ids, the
  tokenizer fingerprint, the options, and per input file its path, size, mtime, documents and
  tokens.

A cache directory is built under a temporary name and renamed into place only when complete,
so a crash or an error never leaves a directory under a key name; temporary directories
(``.<key>.*.tmp``) are never read. When two processes race to build the same key, the first
rename wins and the other discards its copy. Under ``torch.distributed`` only local rank 0
builds; other ranks wait and then open the finished cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from layerfreeze.data.corpus import iter_documents, resolve_files
from layerfreeze.data.tokenizer import run_on_local_rank0, tokenizer_fingerprint
from layerfreeze.utils.logging import get_logger, log_rank0

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = get_logger(__name__)

__all__ = ["TokenCache", "build_token_cache", "cache_key", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_TOKENS = "tokens.bin"
_INDEX = "index.json"
_ENCODE_BATCH = 256


@dataclass
class TokenCache:
    """An opened token cache: the memory-mapped stream plus its index.

    Attributes:
        path: the cache directory.
        tokens: read-only ``np.memmap`` of the token stream.
        index: the parsed ``index.json``.
    """

    path: Path
    tokens: np.ndarray
    index: dict[str, Any]

    @property
    def num_tokens(self) -> int:
        return int(self.index["num_tokens"])

    @property
    def num_documents(self) -> int:
        return int(self.index["num_documents"])

    @property
    def eos_id(self) -> int:
        return int(self.index["eos_id"])

    @property
    def bos_id(self) -> int | None:
        return self.index["bos_id"] if self.index["add_bos"] else None

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])

    @property
    def files(self) -> list[str]:
        return [f["path"] for f in self.index["files"]]

    @classmethod
    def open(cls, path: str | Path) -> TokenCache:
        """Open a finished cache directory.

        Raises:
            ValueError: the directory is not a complete cache of this format (index missing or
                unreadable, wrong version, or a token file whose size disagrees with the index).
        """
        path = Path(path)
        problem = _check_cache_dir(path)
        if problem:
            raise ValueError(f"{path}: not a usable token cache ({problem}). Delete it to rebuild.")
        index = json.loads((path / _INDEX).read_text(encoding="utf-8"))
        n = int(index["num_tokens"])
        tokens = np.memmap(path / _TOKENS, dtype=np.dtype(index["dtype"]), mode="r", shape=(n,))
        return cls(path=path, tokens=tokens, index=index)


def _check_cache_dir(path: Path) -> str | None:
    """Why ``path`` is not a complete cache, or None when it is."""
    try:
        index = json.loads((path / _INDEX).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no index.json"
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"unreadable index.json: {e}"
    if not isinstance(index, dict) or index.get("version") != FORMAT_VERSION:
        found = index.get("version") if isinstance(index, dict) else None
        return f"format version {found}, expected {FORMAT_VERSION}"
    try:
        expected = int(index["num_tokens"]) * np.dtype(index["dtype"]).itemsize
        actual = (path / _TOKENS).stat().st_size
    except (KeyError, TypeError, ValueError) as e:
        return f"index.json lacks a valid field ({e})"
    except FileNotFoundError:
        return "no tokens.bin"
    if actual != expected:
        return f"tokens.bin has {actual} bytes, index.json says {expected}"
    return None


def _file_record(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(
    files: Sequence[Path], tokenizer: PreTrainedTokenizerBase, options: dict[str, Any]
) -> str:
    """Key of a cache: input files (path, size, mtime), tokenizer fingerprint, options, format."""
    payload = {
        "version": FORMAT_VERSION,
        "files": [_file_record(Path(f)) for f in files],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "options": options,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _batches(docs: Iterable[str], size: int) -> Iterable[list[str]]:
    batch: list[str] = []
    for d in docs:
        batch.append(d)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    # split_special_tokens: text such as "<s>" inside a document is text, not a control token.
    out = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)
    return out["input_ids"]


def _write_cache(
    tmp: Path,
    files: Sequence[Path],
    tokenizer: PreTrainedTokenizerBase,
    key: str,
    options: dict[str, Any],
) -> dict[str, Any]:
    vocab_size = len(tokenizer)
    dtype = np.dtype("<u2") if vocab_size < 2**16 else np.dtype("<u4")
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if options["add_bos"] else None
    prefix = [bos] if bos is not None else []
    records = []
    total_tokens = total_docs = 0
    with (tmp / _TOKENS).open("wb") as out:
        for path in files:
            rec = _file_record(path)
            docs = tokens = 0
            stream = iter_documents(
                path, text_key=options["text_key"], txt_documents=options["txt_documents"]
            )
            for batch in _batches(stream, _ENCODE_BATCH):
                ids = _encode(tokenizer, batch)
                flat = np.fromiter(
                    (t for seq in ids for t in (*prefix, *seq, eos)),
                    dtype=np.int64,
                )
                out.write(flat.astype(dtype).tobytes())
                docs += len(batch)
                tokens += flat.size
            rec.update(documents=docs, tokens=tokens)
            records.append(rec)
            total_docs += docs
            total_tokens += tokens
        out.flush()
        os.fsync(out.fileno())
    if total_docs == 0:
        raise ValueError(
            f"data.paths: the corpus has no text: {', '.join(str(f) for f in files)} hold 0 non-empty "
            "documents. Add text to these files or point data.paths at other ones."
        )
    return {
        "version": FORMAT_VERSION,
        "key": key,
        "dtype": dtype.str,
        "num_tokens": total_tokens,
        "num_documents": total_docs,
        "vocab_size": vocab_size,
        "bos_id": tokenizer.bos_token_id,
        "eos_id": eos,
        "add_bos": bos is not None,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "tokenizer_name": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
        "text_key": options["text_key"],
        "txt_documents": options["txt_documents"],
        "files": records,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _make_parents(path: Path) -> list[Path]:
    """``mkdir -p path``; return the directories this call created, outermost first."""
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def _build(final: Path, files: Sequence[Path], tokenizer, key: str, options: dict[str, Any]) -> None:
    created = _make_parents(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=final.parent))
    try:
        index = _write_cache(tmp, files, tokenizer, key, options)
        # index.json is the last file written: a directory without it is never complete.
        with (tmp / _INDEX).open("w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, final)
        except OSError:
            if _check_cache_dir(final) is not None:  # not a finished cache another process won with
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return
        with contextlib.suppress(OSError):
            fd = os.open(final.parent, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        log_rank0(
            logger, "tokenized %d documents (%d tokens) from %d files into %s",
            index["num_documents"], index["num_tokens"], len(files), final,
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in reversed(created):  # leave no empty cache directories behind a failed build
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def build_token_cache(
    paths: Sequence[str | Path],
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: str | Path,
    *,
    text_key: str = "text",
    txt_documents: str = "paragraph",
    add_bos: bool = True,
) -> TokenCache:
    """Tokenize ``paths`` once (or reuse the cache) and open the memory-mapped result.

    A cache is reused when nothing that produced it changed: the resolved input files (path,
    size, mtime), the tokenizer (fingerprint of its serialization), ``text_key``,
    ``txt_documents`` and ``add_bos``. Any change gives a new key and a new build. A directory
    under the key that is incomplete (e.g. deleted files) is replaced.

    Under ``torch.distributed`` local rank 0 builds; every rank then waits in a collective and
    opens the cache. A failure while building is raised on all ranks.

    Args:
        paths: ``.txt`` / ``.jsonl`` files or directories, or ``@bundled``.
        tokenizer: an HF tokenizer (``load_tokenizer`` gives one); needs an EOS token.
        cache_dir: parent directory of the per-key cache directories.
        text_key: JSONL field with the text.
        txt_documents: ``paragraph`` or ``line`` (how ``.txt`` files split into documents).
        add_bos: start each document with BOS when the tokenizer has one.

    Returns:
        The opened :class:`TokenCache`.

    Raises:
        ConfigError: missing/unsupported input paths (naming ``data.paths[i]``).
        ValueError: no EOS token, no text in the corpus, or unreadable input (naming the file).
    """
    files = resolve_files(paths, key="data.paths")
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "tokenizer.path: the tokenizer has no EOS token, which separates packed documents. "
            "Use a tokenizer with an eos_token (tokenizers trained by layerfreeze have '</s>')."
        )
    options = {"text_key": text_key, "txt_documents": txt_documents, "add_bos": bool(add_bos)}
    key = cache_key(files, tokenizer, options)
    final = Path(cache_dir).expanduser() / key

    def build() -> None:
        problem = _check_cache_dir(final)
        if problem is None:
            log_rank0(logger, "reusing token cache %s", final)
            return
        if final.exists():  # a stale or damaged directory under our key: replace it
            log_rank0(logger, "rebuilding token cache %s (%s)", final, problem)
            shutil.rmtree(final)
        _build(final, files, tokenizer, key, options)

    run_on_local_rank0(build)
    return TokenCache.open(final)
