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

Memory stays bounded by the work unit, never by the corpus: documents stream from the files in
batches of at most 256 documents and ``_BATCH_CHARS`` characters, and their ids are appended to
``tokens.bin`` as they come. A document longer than ``_CUT_CHARS`` characters (one huge line) is
encoded in pieces of at most that many characters and its ids are written piece by piece, so
memory follows the budget, not the document (an encoder needs about 100 times the text it is
given). Cuts go just before a space (else a newline, else at the budget); a piece after a cut is
encoded behind an anchor character whose ids are then dropped, so it is encoded as text that
continues (no start-of-text marker such as SentencePiece's dummy ``▁``): cut before a space, the
ids equal the whole document's for tokenizers that never put a token across a space (SentencePiece,
byte-level BPE); cut inside a word, that word's tokens split at the cut. With ``num_workers >
1`` the inputs are cut into pieces (whole files, and files above ``chunk_bytes`` into byte ranges
at document boundaries, :func:`~layerfreeze.data.corpus.split_file`); worker processes tokenize
the pieces into part files, and the parent appends the parts to ``tokens.bin`` in input order
and deletes each, so the file is byte-identical to a one-process build (and has the same key:
the number of workers is not part of it).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from layerfreeze.data.corpus import iter_documents, resolve_files, split_file
from layerfreeze.data.tokenizer import run_on_local_rank0, tokenizer_fingerprint
from layerfreeze.utils.logging import get_logger, log_rank0

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = get_logger(__name__)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "FORMAT_VERSION",
    "TokenCache",
    "build_token_cache",
    "cache_key",
    "resolve_num_workers",
    "sentencepiece_model_of",
]

FORMAT_VERSION = 1
_TOKENS = "tokens.bin"
_INDEX = "index.json"
_ENCODE_BATCH = 256
# Documents longer than this many characters are encoded in pieces (see _cut_document).
_CUT_CHARS = 1 << 16
# Characters given to the encoder in one call at most (documents, or pieces of one document).
_BATCH_CHARS = 1 << 19
# Prefixed to a piece that continues a document, its ids then dropped: a private-use character no
# vocabulary has a piece for (it falls back to bytes or <unk>), so no token spans it.
_ANCHOR = "\ue000"
DEFAULT_CHUNK_BYTES = 64 << 20


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


def _cut_document(text: str, budget: int) -> Iterator[str]:
    """``text`` in consecutive pieces of at most ``budget`` characters (concatenated: ``text``).

    A cut goes just before the last space in the second half of the budget (before the first
    space of a run of spaces), else just before the last newline there, else at the budget. A
    Python string is cut between code points, never inside a UTF-8 character.
    """
    start, n = 0, len(text)
    while n - start > budget:
        end = start + budget
        cut = text.rfind(" ", start + budget // 2, end + 1)
        if cut > start:
            while cut - 1 > start and text[cut - 1] == " ":
                cut -= 1
        else:
            cut = text.rfind("\n", start + budget // 2, end + 1)
            if cut <= start:
                cut = end
        yield text[start:cut]
        start = cut
    yield text[start:]


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    # split_special_tokens: text such as "<s>" inside a document is text, not a control token.
    out = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)
    return out["input_ids"]


def sentencepiece_model_of(tokenizer: PreTrainedTokenizerBase) -> Path | None:
    """The SentencePiece ``.model`` this HF tokenizer is exactly the conversion of, or None.

    Looks for ``tokenizer.model`` in the tokenizer's directory (``name_or_path``), converts it
    with :func:`~layerfreeze.data.tokenizer.sentencepiece_to_hf` and accepts it only when the
    conversion's fingerprint (the full serialization) equals the tokenizer's. Tokenizers
    trained by layerfreeze qualify; the SentencePiece processor then encodes the same ids about
    ten times faster than the HF pipeline (``bench/data_pipeline.py``).
    """
    from layerfreeze.data.tokenizer import sentencepiece_to_hf

    name = str(getattr(tokenizer, "name_or_path", "") or "")
    if not name:
        return None
    candidate = Path(name) / "tokenizer.model" if Path(name).is_dir() else Path(name)
    if candidate.suffix != ".model" or not candidate.is_file():
        return None
    try:
        converted = sentencepiece_to_hf(candidate)
    except (ValueError, OSError):
        return None
    if tokenizer_fingerprint(converted) != tokenizer_fingerprint(tokenizer):
        return None
    return candidate


class _Encoder:
    """Documents -> ids without special tokens: the SentencePiece processor when the tokenizer
    is provably its conversion (checked again on each piece's first batch), else HF."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, sp_model: Path | None):
        self.tokenizer = tokenizer
        self.sp_model = sp_model
        self._sp = None
        self._anchor_ids: list[int] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {
            "tokenizer": self.tokenizer, "sp_model": self.sp_model, "_sp": None,
            "_anchor_ids": None,
        }

    def first_batch_checks(self) -> Iterable[bool]:
        """Per batch of a piece: whether to cross-check against HF (the first batch only)."""
        yield True
        while True:
            yield False

    def __call__(self, texts: list[str], check: bool) -> list[list[int]]:
        if self.sp_model is None:
            return _encode(self.tokenizer, texts)
        if self._sp is None:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=str(self.sp_model))
        ids = self._sp.encode(texts)
        if check:
            reference = _encode(self.tokenizer, texts)
            if ids != reference:
                logger.warning(
                    "SentencePiece and the HF tokenizer disagree on this corpus; tokenizing with "
                    "the HF tokenizer (slower)"
                )
                self.sp_model = None
                return reference
        return ids

    def continued(self, pieces: list[str], check: bool) -> list[list[int]]:
        """Ids of ``pieces`` that each continue a document after a cut (see the module doc).

        Each piece is encoded as ``_ANCHOR + piece`` and the anchor's own ids are dropped; a
        piece whose encoding does not start with them (the anchor merged into a token) is
        encoded on its own instead, and so is every piece when the tokenizer folds runs of
        unknown characters into one id (the anchor could swallow the piece's first one).
        """
        if not pieces:
            return []
        if self._anchor_ids is None:
            one, two = _encode(self.tokenizer, [_ANCHOR, _ANCHOR * 2])
            # A tokenizer that folds a run of unknown characters into one <unk> would swallow a
            # piece's leading unknown character with the anchor: then encode pieces plainly.
            self._anchor_ids = one if len(two) > len(one) and two[: len(one)] == one else []
        if not self._anchor_ids:
            return self(pieces, check)
        k = len(self._anchor_ids)
        out = []
        for piece, ids in zip(pieces, self([_ANCHOR + p for p in pieces], check), strict=True):
            out.append(ids[k:] if ids[:k] == self._anchor_ids else self([piece], False)[0])
        return out


def _pack(ids: list[list[int]], bos: int | None, eos: int, dtype: np.dtype) -> np.ndarray:
    """``[BOS] doc [EOS]`` for every document, back to back, as one array of ``dtype``."""
    lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    extra = 1 if bos is None else 2
    out = np.empty(int(lens.sum()) + extra * len(ids), dtype=dtype)
    ends = np.cumsum(lens + extra)  # one past each document's EOS
    keep = np.ones(out.size, dtype=bool)
    keep[ends - 1] = False
    out[ends - 1] = eos
    if bos is not None:
        starts = ends - lens - 2
        keep[starts] = False
        out[starts] = bos
    out[keep] = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lens.sum()))
    return out


def _tokenize_piece(
    encoder: _Encoder,
    path: Path,
    byte_range: tuple[int, int] | None,
    options: dict[str, Any],
    out,
    dtype: np.dtype,
) -> tuple[int, int]:
    """Stream the documents of one file (or byte range) into ``out``; (documents, tokens)."""
    tokenizer = encoder.tokenizer
    bos = tokenizer.bos_token_id if options["add_bos"] else None
    eos = tokenizer.eos_token_id
    docs = tokens = chars = 0
    stream = iter_documents(
        path,
        text_key=options["text_key"],
        txt_documents=options["txt_documents"],
        byte_range=byte_range,
    )
    checks = encoder.first_batch_checks()
    batch: list[str] = []

    def flush() -> None:
        nonlocal tokens, chars
        if batch:
            flat = _pack(encoder(batch, next(checks)), bos, eos, dtype)
            out.write(flat.tobytes())
            tokens += flat.size
            batch.clear()
        chars = 0

    for doc in stream:
        docs += 1
        if len(doc) > _CUT_CHARS:
            flush()
            tokens += _write_long_document(encoder, doc, bos, eos, out, dtype, checks)
            continue
        batch.append(doc)
        chars += len(doc)
        if len(batch) == _ENCODE_BATCH or chars >= _BATCH_CHARS:
            flush()
    flush()
    return docs, tokens


def _write_long_document(
    encoder: _Encoder,
    doc: str,
    bos: int | None,
    eos: int,
    out,
    dtype: np.dtype,
    checks: Iterator[bool],
) -> int:
    """Write ``[BOS] doc [EOS]`` encoding ``doc`` in pieces (module doc); returns the tokens."""
    written = 0

    def write(ids: Iterable[int]) -> None:
        nonlocal written
        arr = np.fromiter(ids, dtype=dtype)
        out.write(arr.tobytes())
        written += arr.size

    if bos is not None:
        write([bos])
    first = True

    def emit(group: list[str]) -> None:
        nonlocal first
        if first:  # the first piece starts the text, as the whole document does
            ids = encoder(group[:1], next(checks)) + encoder.continued(group[1:], False)
            first = False
        else:
            ids = encoder.continued(group, next(checks))
        write(itertools.chain.from_iterable(ids))

    group: list[str] = []
    size = 0
    for piece in _cut_document(doc, _CUT_CHARS):
        group.append(piece)
        size += len(piece)
        if size + _CUT_CHARS > _BATCH_CHARS:
            emit(group)
            group, size = [], 0
    if group:
        emit(group)
    write([eos])
    return written


# Worker-process state: the tokenizer, the options and the directory for part files.
_WORKER: dict[str, Any] = {}


def _worker_init(encoder: _Encoder, options: dict[str, Any], dtype: str, tmp: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    _WORKER.update(encoder=encoder, options=options, dtype=np.dtype(dtype), tmp=Path(tmp))


def _worker_piece(job: tuple[int, str, tuple[int, int] | None]) -> tuple[int, int, int]:
    """Tokenize piece ``i`` into ``<tmp>/part-<i>.bin``; returns (i, documents, tokens)."""
    i, path, byte_range = job
    part = _WORKER["tmp"] / f"part-{i:08d}.bin"
    try:
        with part.open("wb") as out:
            docs, tokens = _tokenize_piece(
                _WORKER["encoder"],
                Path(path),
                byte_range,
                _WORKER["options"],
                out,
                _WORKER["dtype"],
            )
    except ValueError:
        if byte_range is None:
            raise
        # Line numbers of a byte range count from its start: read the whole file as one
        # process would, to raise the same error (file and line) a one-worker build gives.
        opts = _WORKER["options"]
        for _ in iter_documents(
            path, text_key=opts["text_key"], txt_documents=opts["txt_documents"]
        ):
            pass
        raise
    return i, docs, tokens


def resolve_num_workers(num_workers: int) -> int:
    """``num_workers`` with 0 meaning one per CPU this process may use."""
    if num_workers == 0:
        return (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1
        )
    return num_workers


def _write_cache(
    tmp: Path,
    files: Sequence[Path],
    tokenizer: PreTrainedTokenizerBase,
    key: str,
    options: dict[str, Any],
    num_workers: int = 1,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    encoder: str = "auto",
) -> dict[str, Any]:
    enc = _Encoder(tokenizer, sentencepiece_model_of(tokenizer) if encoder == "auto" else None)
    vocab_size = len(tokenizer)
    dtype = np.dtype("<u2") if vocab_size < 2**16 else np.dtype("<u4")
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if options["add_bos"] else None
    records = [_file_record(path) | {"documents": 0, "tokens": 0} for path in files]
    with (tmp / _TOKENS).open("wb") as out:
        if num_workers <= 1:
            for rec, path in zip(records, files, strict=True):
                rec["documents"], rec["tokens"] = _tokenize_piece(
                    enc, path, None, options, out, dtype
                )
        else:
            _write_parallel(tmp, files, records, enc, options, out, dtype, num_workers, chunk_bytes)
        out.flush()
        os.fsync(out.fileno())
    total_docs = sum(r["documents"] for r in records)
    total_tokens = sum(r["tokens"] for r in records)
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


def _write_parallel(
    tmp: Path,
    files: Sequence[Path],
    records: list[dict[str, Any]],
    encoder: _Encoder,
    options: dict[str, Any],
    out,
    dtype: np.dtype,
    num_workers: int,
    chunk_bytes: int,
) -> None:
    """Tokenize pieces of ``files`` in ``num_workers`` processes; append their parts in order."""
    jobs, owner = [], []
    for f_idx, path in enumerate(files):
        size = path.stat().st_size
        ranges = (
            split_file(path, chunk_bytes, txt_documents=options["txt_documents"])
            if size > chunk_bytes
            else [None]
        )
        for r in ranges:
            jobs.append((len(jobs), str(path), r))
            owner.append(f_idx)
    # fork: workers start at once with the tokenizer already loaded (no re-import of torch);
    # they only read files and write part files.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    workers = min(num_workers, len(jobs))
    with ctx.Pool(
        workers, initializer=_worker_init, initargs=(encoder, options, dtype.str, str(tmp))
    ) as pool:
        for i, docs, tokens in pool.imap(_worker_piece, jobs, chunksize=1):
            part = tmp / f"part-{i:08d}.bin"
            with part.open("rb") as src:
                shutil.copyfileobj(src, out, 16 << 20)
            part.unlink()
            rec = records[owner[i]]
            rec["documents"] += docs
            rec["tokens"] += tokens


def _make_parents(path: Path) -> list[Path]:
    """``mkdir -p path``; return the directories this call created, outermost first."""
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def _build(
    final: Path,
    files: Sequence[Path],
    tokenizer,
    key: str,
    options: dict[str, Any],
    num_workers: int = 1,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    encoder: str = "auto",
) -> None:
    created = _make_parents(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=final.parent))
    try:
        index = _write_cache(tmp, files, tokenizer, key, options, num_workers, chunk_bytes, encoder)
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
            logger,
            "tokenized %d documents (%d tokens) from %d files into %s",
            index["num_documents"],
            index["num_tokens"],
            len(files),
            final,
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
    num_workers: int = 1,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    encoder: str = "auto",
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
        num_workers: tokenizing processes (0: one per CPU). The result is byte-identical for any
            value, and the cache key does not depend on it.
        chunk_bytes: with several workers, files larger than this are cut into pieces of about
            this size (at document boundaries) so one large file spreads over the workers.
        encoder: ``auto`` encodes with the SentencePiece processor when the tokenizer is exactly
            the conversion of a ``tokenizer.model`` in its directory (see
            :func:`sentencepiece_model_of`; same ids, about ten times faster), else with the HF
            tokenizer; ``hf`` always uses the HF tokenizer. Not part of the cache key.

    Returns:
        The opened :class:`TokenCache`.

    Raises:
        ConfigError: missing/unsupported input paths (naming ``data.paths[i]``).
        ValueError: no EOS token, no text in the corpus, unreadable input (naming the file), or
            a negative ``num_workers`` / non-positive ``chunk_bytes``.
    """
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(
            f"data.num_workers: must be 0 (one per CPU) or a positive integer, got {num_workers!r}."
        )
    if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes: must be a positive integer, got {chunk_bytes!r}.")
    if encoder not in ("auto", "hf"):
        raise ValueError(f"encoder: must be 'auto' or 'hf', got {encoder!r}.")
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
        _build(
            final,
            files,
            tokenizer,
            key,
            options,
            resolve_num_workers(num_workers),
            chunk_bytes,
            encoder,
        )

    run_on_local_rank0(build)
    return TokenCache.open(final)
