"""Vocabulary extension for continued pre-training: add pieces trained on a corpus to a tokenizer.

Two kinds of base tokenizer are supported, detected from the files in the base directory:

- ``sentencepiece`` (Llama-2, Mistral): a ``tokenizer.model`` SentencePiece ``ModelProto``,
  usually with the fast ``tokenizer.json`` built from it. New pieces are trained with
  SentencePiece (the base's model type) on the corpus; those the base lacks are appended to the
  proto as ``NORMAL`` pieces with scores below every existing piece (the Chinese-LLaMA merge,
  but scored below, so English text keeps its segmentation), and the same pieces, with their
  merges for a BPE model, are appended to ``tokenizer.json`` so both files encode alike.
- ``byte_level_bpe`` (Llama-3, Qwen): a ``tokenizer.json`` whose model is BPE behind a
  ``ByteLevel`` pre-tokenizer. A SentencePiece piece has no merge path in the byte alphabet and
  may cross the base's pre-tokenizer splits, so the pieces are trained with the ``tokenizers``
  BPE trainer behind the base's own normalizer and pre-tokenizer; the merges the base lacks are
  appended (after the existing ones) with their tokens as BPE vocabulary entries, so ordinary
  tokenization produces them (not ``added_tokens``).

Existing ids never change: new ids start after the highest id in use (vocabulary and added
tokens). The result is written atomically and loaded back with ``AutoTokenizer`` before it is
moved into place: same class as the base, every old id the same token. The report gives the
tokens per Chinese character of held-out text before and after.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from layerfreeze.errors import ConfigError
from layerfreeze.utils.io import atomic_directory, atomic_write_json
from layerfreeze.utils.logging import get_logger, log_rank0

logger = get_logger(__name__)

__all__ = [
    "ExtendReport",
    "KINDS",
    "detect_kind",
    "extend_tokenizer",
    "tokens_per_zh_char",
]

KINDS = ("sentencepiece", "byte_level_bpe")
REPORT_FILE = "layerfreeze_vocab_extend.json"
# Tokenizer files copied from the base (the two model files are rewritten). vocab.json /
# merges.txt (slow GPT-2 style files) are left out: they would disagree with tokenizer.json.
_COPIED = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
# Han ideographs (CJK unified, extension A, compatibility, extensions B-F).
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef]")
# Every HELD_OUT_EVERY-th corpus document is held out when no --held-out file is given.
HELD_OUT_EVERY = 10
_HELD_OUT_MAX_CHARS = 2_000_000
_SPACE_MARKERS = ("▁", "Ġ", " ")
_BYTE_PIECE = re.compile("<0x[0-9A-Fa-f]{2}>")
# Seconds between progress lines while the corpus is fed to the trainer.
PROGRESS_SECONDS = 30.0
_NORMAL, _SP_BPE, _SP_UNIGRAM = 1, 2, 1


@dataclass
class ExtendReport:
    """What :func:`extend_tokenizer` did (also written as ``layerfreeze_vocab_extend.json``)."""

    kind: str
    base: str
    out: str
    tokenizer_class: str
    base_size: int
    new_size: int
    added: int
    first_new_id: int
    trained_pieces: int
    corpus: list[str]
    held_out: str
    held_out_zh_chars: int
    tokens_per_zh_char_before: float
    tokens_per_zh_char_after: float
    sample_new_tokens: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    """What decides the new pieces besides the corpus: ``vocab_size``, ``max_new``, ``seed`` and
    ``base_fingerprint`` (:func:`~layerfreeze.data.tokenizer.tokenizer_fingerprint` of the base);
    a run with ``tokenizer.extend_from`` reuses the tokenizer only when they match."""

    def summary(self) -> str:
        """One human line."""
        return (
            f"extended {self.base} ({self.kind}, {self.tokenizer_class}) into {self.out}: "
            f"+{self.added} pieces (ids {self.first_new_id}-{self.first_new_id + self.added - 1}, "
            f"{self.base_size} -> {self.new_size}); tokens per Chinese character on held-out text "
            f"({self.held_out_zh_chars} characters): {self.tokens_per_zh_char_before:.3f} -> "
            f"{self.tokens_per_zh_char_after:.3f}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _unsupported(base: Path, what: str) -> ValueError:
    return ValueError(
        f"--base: {base} holds {what}. Valid bases: a SentencePiece tokenizer (tokenizer.model, "
        "Llama-2/Mistral style) or a byte-level BPE tokenizer.json (ByteLevel pre-tokenizer + "
        "BPE model, Llama-3/Qwen style)."
    )


def _has_byte_level(pre: Any) -> bool:
    if not isinstance(pre, dict):
        return False
    if pre.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(p) for p in pre.get("pretokenizers") or [])


def detect_kind(base: str | Path) -> str:
    """``"sentencepiece"`` or ``"byte_level_bpe"``: the kind of tokenizer in ``base``.

    Raises:
        ValueError: ``base`` is not a directory, holds no tokenizer, or one of another kind
            (WordPiece, a Unigram ``tokenizer.json`` without its ``tokenizer.model`` ...).
    """
    base = Path(base)
    if not base.is_dir():
        raise ValueError(
            f"--base: {str(base)!r} is not a directory. Give a tokenizer directory (tokenizer.model "
            "and/or tokenizer.json + tokenizer_config.json)."
        )
    if (base / "tokenizer.model").is_file():
        from layerfreeze.data.tokenizer import _load_proto

        try:
            _load_proto(base / "tokenizer.model")
        except ValueError as e:
            raise ValueError(
                f"--base: {e} Give a tokenizer directory whose tokenizer.model is a "
                "SentencePiece model (or remove it next to a byte-level BPE "
                "tokenizer.json)."
            ) from None
        return "sentencepiece"
    tj = base / "tokenizer.json"
    if not tj.is_file():
        raise _unsupported(base, "no tokenizer.model and no tokenizer.json")
    data = _read_json(tj)
    model = data.get("model") or {}
    mtype = model.get("type")
    if mtype == "BPE" and _has_byte_level(data.get("pre_tokenizer")):
        return "byte_level_bpe"
    desc = (
        f"a {mtype} tokenizer.json" if mtype != "BPE" else "a BPE tokenizer.json without ByteLevel"
    )
    raise _unsupported(base, desc + " (no tokenizer.model next to it)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"--base: {path} is not readable JSON ({e}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"--base: {path} is not a tokenizer.json (top level is not an object).")
    return data


def tokens_per_zh_char(tokenizer: Any, docs: Sequence[str]) -> tuple[float, int]:
    """Tokens that cover a Han character, per Han character, over ``docs``.

    A token counts when its character span (the fast tokenizer's offsets) holds at least one Han
    character, so English words in mixed text are left out, and each byte-fallback piece of a
    character counts (when a run of unknown characters falls back to bytes with the run's span,
    the bytes of its Han characters). A lone space marker (the ``▁`` dummy prefix, whose offsets
    point at the first character) is not counted.

    Returns:
        ``(tokens per character, number of Han characters)``; ``(nan, 0)`` without any.
    """
    tokens = chars = 0
    for doc in docs:
        n = len(_HAN.findall(doc))
        if not n:
            continue
        chars += n
        enc = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)
        pieces = tokenizer.convert_ids_to_tokens(enc["input_ids"])
        spans = zip(enc["offset_mapping"], pieces, strict=True)
        for (s, e), group in itertools.groupby(spans, key=lambda sp: tuple(sp[0])):
            group = [piece for _, piece in group]
            span = doc[s:e]
            if not _HAN.search(span):
                continue
            if len(group) > 1 and all(_BYTE_PIECE.fullmatch(g) for g in group):
                # byte fallback of a run of unknown characters: every byte token carries the
                # whole run's span; count the bytes of its Han characters only
                tokens += sum(len(c.encode("utf-8")) for c in _HAN.findall(span))
            else:
                tokens += sum(1 for g in group if g not in _SPACE_MARKERS)
    return (tokens / chars if chars else float("nan")), chars


class _Corpus:
    """Training lines of the corpus documents, every ``HELD_OUT_EVERY``-th one held out."""

    def __init__(self, files: Sequence[Path], text_key: str, txt_documents: str, hold_out: bool):
        self.files, self.text_key, self.txt_documents = files, text_key, txt_documents
        self.hold_out = hold_out
        self.held: list[str] = []
        self.documents = 0

    def __iter__(self) -> Iterator[str]:
        from layerfreeze.data.corpus import iter_documents
        from layerfreeze.data.tokenizer import _MAX_SENTENCE_BYTES, _cut_line

        held_chars = lines = size = 0
        self.held, self.documents = [], 0
        start = last = time.monotonic()
        for path in self.files:
            for doc in iter_documents(
                path, text_key=self.text_key, txt_documents=self.txt_documents
            ):
                self.documents += 1
                if self.hold_out and self.documents % HELD_OUT_EVERY == 0:
                    if held_chars < _HELD_OUT_MAX_CHARS:
                        self.held.append(doc)
                        held_chars += len(doc)
                    continue
                for line in doc.splitlines():
                    if line.strip():
                        yield from (p for p in _cut_line(line, _MAX_SENTENCE_BYTES) if p.strip())
                        lines += 1
                        size += len(line)
                now = time.monotonic()
                if now - last >= PROGRESS_SECONDS:
                    last = now
                    log_rank0(
                        logger,
                        "training: fed %d lines (%.1f M characters, %d documents) from "
                        "%s in %.0f s",
                        lines,
                        size / 1e6,
                        self.documents,
                        path.name,
                        now - start,
                    )


def _read_held_out(files: Sequence[Path], text_key: str, txt_documents: str) -> list[str]:
    from layerfreeze.data.corpus import iter_documents

    docs, chars = [], 0
    for path in files:
        for doc in iter_documents(path, text_key=text_key, txt_documents=txt_documents):
            docs.append(doc)
            chars += len(doc)
            if chars >= _HELD_OUT_MAX_CHARS:
                return docs
    return docs


def _first_line(lines: Iterator[str], files: Sequence[Path], key: str) -> Iterator[str]:
    it = iter(lines)
    first = next(it, None)
    if first is None:
        raise ValueError(
            f"{key}: no text found in {', '.join(str(f) for f in files)}. Give .txt/.jsonl files "
            "with non-empty documents."
        )

    def gen() -> Iterator[str]:
        yield first
        yield from it

    return gen()


# ---------------------------------------------------------------- SentencePiece (Llama-2 style)


def _train_sp_pieces(lines: Iterator[str], proto: Any, vocab_size: int, seed: int) -> Any:
    import io

    import sentencepiece as spm

    from layerfreeze.data.tokenizer import _explain_training_error

    spec, norm = proto.trainer_spec, proto.normalizer_spec
    model_type = {_SP_BPE: "bpe"}.get(spec.model_type, "unigram")
    buf = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_writer=buf,
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=0.9995,
            byte_fallback=True,
            split_digits=spec.split_digits,
            normalization_rule_name="identity",
            remove_extra_whitespaces=norm.remove_extra_whitespaces,
            add_dummy_prefix=norm.add_dummy_prefix,
            allow_whitespace_only_pieces=True,
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise _explain_training_error(e, vocab_size) from None
    from sentencepiece import sentencepiece_model_pb2

    trained = sentencepiece_model_pb2.ModelProto()
    trained.ParseFromString(buf.getvalue())
    return trained


def _select_sp(proto: Any, trained: Any, max_new: int | None) -> list[tuple[str, float]]:
    """New pieces (with scores) from ``trained`` for ``proto``, in the trained order.

    A multi-character piece of a BPE model is kept only when its characters are pieces (added
    first when missing) and it splits into two pieces, so both SentencePiece and the
    ``tokenizers`` BPE reach it. A piece that is one half of a split of an existing piece is
    left out: its merge would turn a new pair into an old piece, which a merge list appended
    after the old ones does not reproduce.
    """
    old = {p.piece for p in proto.pieces}
    bpe = proto.trainer_spec.model_type == _SP_BPE
    cands = [(p.piece, p.score) for p in trained.pieces if p.type == _NORMAL and p.piece not in old]
    cand_set = {c for c, _ in cands}
    if bpe:
        risky = set()
        for p in proto.pieces:
            s = p.piece
            for i in range(1, len(s)):
                left, right = s[:i], s[i:]
                if left in cand_set and (right in old or right in cand_set):
                    risky.add(left)
                if right in cand_set and (left in old or left in cand_set):
                    risky.add(right)
        cands = [c for c in cands if c[0] not in risky]
    score_of = dict(cands)
    chosen: dict[str, float] = {}
    limit = max_new if max_new is not None else len(cands)
    for piece, score in cands:
        if len(chosen) >= limit:
            break
        if piece in chosen:
            continue
        need = []
        if bpe and len(piece) > 1:
            need = [c for c in dict.fromkeys(piece) if c not in old and c not in chosen]
            if any(c not in score_of for c in need):
                continue  # a character the trained model has no piece for
            vocab = old.union(chosen, need)
            if not any(piece[:i] in vocab and piece[i:] in vocab for i in range(1, len(piece))):
                continue
        if len(chosen) + len(need) + 1 > limit:
            continue
        for c in need:
            chosen[c] = score_of[c]
        chosen[piece] = score
    if not chosen:
        return []
    floor = min((p.score for p in proto.pieces if p.type == _NORMAL), default=0.0)
    shift = floor - max(chosen.values()) - 1.0
    return [(p, s + shift) for p, s in chosen.items()]


def _merges_format(merges: list) -> str:
    return "str" if merges and isinstance(merges[0], str) else "pair"


def _pair(m: Any) -> tuple[str, str]:
    if isinstance(m, str):
        a, b = m.split(" ", 1)
        return a, b
    return m[0], m[1]


def _extend_sp(
    base: Path, tmp: Path, corpus: Iterator[str], vocab_size: int, max_new: int | None, seed: int
) -> tuple[int, int, list[str]]:
    from layerfreeze.data.tokenizer import _load_proto

    proto = _load_proto(base / "tokenizer.model")
    if proto.trainer_spec.model_type not in (_SP_BPE, _SP_UNIGRAM):
        raise _unsupported(
            base,
            f"a SentencePiece model of type {proto.trainer_spec.model_type} (only bpe and unigram)",
        )
    tj = _read_json(base / "tokenizer.json") if (base / "tokenizer.json").is_file() else None
    first_id = len(proto.pieces)
    if tj is not None:
        used = _used_ids(tj)
        if used and max(used) >= first_id:
            raise ValueError(
                f"--base: {base / 'tokenizer.json'} uses ids up to {max(used)} but tokenizer.model "
                f"has {first_id} pieces: new pieces would take ids already in use. Extend a "
                "tokenizer whose tokenizer.json has no added tokens past the SentencePiece pieces."
            )
    log_rank0(logger, "training up to %d SentencePiece pieces on the corpus", vocab_size)
    t0 = time.monotonic()
    trained = _train_sp_pieces(corpus, proto, vocab_size, seed)
    log_rank0(logger, "trained %d pieces in %.1f s", len(trained.pieces), time.monotonic() - t0)
    new = _select_sp(proto, trained, max_new)
    from sentencepiece import sentencepiece_model_pb2

    for piece, score in new:
        p = sentencepiece_model_pb2.ModelProto.SentencePiece()
        p.piece, p.score, p.type = piece, score, _NORMAL
        proto.pieces.append(p)
    (tmp / "tokenizer.model").write_bytes(proto.SerializeToString())
    if tj is not None:
        model = tj["model"]
        if model.get("type") == "Unigram":
            model["vocab"].extend([[p, s] for p, s in new])
        elif model.get("type") == "BPE":
            vocab = model["vocab"]
            for i, (piece, _) in enumerate(new):
                vocab[piece] = first_id + i
            rank = {p.piece: i for i, p in enumerate(proto.pieces)}
            fmt = _merges_format(model["merges"])
            added = []
            for piece, _ in new:  # merge order = score order = the order of `new`
                splits = [
                    (piece[:i], piece[i:])
                    for i in range(1, len(piece))
                    if piece[:i] in vocab and piece[i:] in vocab
                ]
                splits.sort(key=lambda lr: (rank[lr[0]], rank[lr[1]]))
                added += [f"{a} {b}" if fmt == "str" else [a, b] for a, b in splits]
            model["merges"].extend(added)
        else:
            raise _unsupported(
                base, f"a tokenizer.json with a {model.get('type')} model next to tokenizer.model"
            )
        atomic_write_json(tmp / "tokenizer.json", tj)
    return first_id, len(trained.pieces), [p for p, _ in new]


# ---------------------------------------------------------------- byte-level BPE (Qwen style)


def _used_ids(tj: dict[str, Any]) -> list[int]:
    vocab = tj["model"].get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    return ids + [t["id"] for t in tj.get("added_tokens") or []]


def _extend_byte_level(
    base: Path, tmp: Path, corpus: Iterator[str], vocab_size: int, max_new: int | None
) -> tuple[int, int, list[str]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tj = _read_json(base / "tokenizer.json")
    model = tj["model"]
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise _unsupported(base, "a byte-level BPE with subword prefix/suffix markers")
    vocab: dict[str, int] = model["vocab"]
    base_tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = base_tok.normalizer
    trainer_tok.pre_tokenizer = base_tok.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    log_rank0(logger, "training up to %d byte-level BPE tokens on the corpus", vocab_size)
    t0 = time.monotonic()
    trainer_tok.train_from_iterator(corpus, trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    log_rank0(logger, "trained %d tokens in %.1f s", len(trained["vocab"]), time.monotonic() - t0)
    used = _used_ids(tj)
    first_id = max(used) + 1 if used else 0
    specials = {t["content"] for t in tj.get("added_tokens") or []}
    # Added tokens past the BPE vocabulary (Qwen's <|endoftext|> ...) would leave a hole below
    # the new ids; tokenizers gives the next added token the vocabulary *count* as its id, and
    # Qwen2Tokenizer re-adds its specials that way on load, which would collide with the last
    # new token. They enter the vocabulary under their own ids (no merge produces them, and
    # added tokens are matched before the model, so encoding is unchanged).
    in_vocab = set(vocab.values())
    for t in tj.get("added_tokens") or []:
        if t["id"] not in in_vocab and t["content"] not in vocab:
            vocab[t["content"]] = t["id"]
            in_vocab.add(t["id"])
    holes = len(set(range(first_id)) - in_vocab)
    if holes:
        raise _unsupported(base, f"a tokenizer.json with {holes} unused ids below {first_id}")
    old_pairs = {_pair(m) for m in model["merges"]}
    fmt = _merges_format(model["merges"])
    limit = max_new if max_new is not None else len(trained["merges"])
    new: list[str] = []
    for m in trained["merges"]:
        if len(new) >= limit:
            break
        a, b = _pair(m)
        tok = a + b
        if tok in vocab or tok in specials or (a, b) in old_pairs:
            continue
        if a not in vocab or b not in vocab:
            continue
        vocab[tok] = first_id + len(new)
        new.append(tok)
        model["merges"].append(f"{a} {b}" if fmt == "str" else [a, b])
    atomic_write_json(tmp / "tokenizer.json", tj)
    return first_id, len(trained["vocab"]), new


# ---------------------------------------------------------------- the command


def extend_tokenizer(
    base: str | Path,
    corpus: Sequence[str | Path],
    out: str | Path,
    *,
    vocab_size: int = 8000,
    max_new: int | None = None,
    held_out: Sequence[str | Path] | None = None,
    text_key: str = "text",
    txt_documents: str = "paragraph",
    seed: int = 0,
    overwrite: bool = True,
) -> ExtendReport:
    """Train pieces on ``corpus`` and write ``base`` extended with the new ones into ``out``.

    Args:
        base: tokenizer directory (see the module docstring for the two supported kinds).
        corpus: ``.txt`` / ``.jsonl`` files or directories, or ``@bundled``.
        out: output directory, written atomically (nothing is left on failure).
        vocab_size: size of the vocabulary trained on the corpus (pieces the base already has
            are not added again).
        max_new: add at most this many pieces (None: every new trained piece).
        held_out: files whose text measures tokens per Chinese character; None holds out every
            ``HELD_OUT_EVERY``-th corpus document (not trained on).
        text_key: JSONL field with the text.
        txt_documents: ``paragraph`` or ``line``: documents of ``.txt`` files.
        seed: SentencePiece's random seed.
        overwrite: replace an existing ``out`` (callers check with ``check_output_path``).

    Returns:
        The :class:`ExtendReport` (also written to ``out/layerfreeze_vocab_extend.json``).

    Raises:
        ValueError: a bad option, an unsupported or missing base tokenizer, a missing or empty
            corpus / held-out file, or a trained vocabulary size the corpus cannot support.
    """
    from layerfreeze.data.corpus import resolve_files
    from layerfreeze.data.tokenizer import auto_tokenizer

    problems = []
    if not isinstance(vocab_size, int) or vocab_size <= 260:
        problems.append(f"--vocab-size: must be an integer above 260, got {vocab_size!r}.")
    if max_new is not None and (not isinstance(max_new, int) or max_new < 1):
        problems.append(
            f"--max-new: must be a positive integer (or left out: all), got {max_new!r}."
        )
    if problems:
        raise ConfigError(problems)
    base, out = Path(base), Path(out)
    kind = detect_kind(base)
    files = resolve_files(corpus, key="--corpus")
    held_files = resolve_files(held_out, key="--held-out") if held_out is not None else None
    try:
        base_tok = auto_tokenizer(base)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"--base: AutoTokenizer cannot load {base} ({' '.join(str(e).split())}). Give a "
            "directory that AutoTokenizer.from_pretrained loads."
        ) from None
    base_cls = type(base_tok).__name__
    if not getattr(base_tok, "is_fast", False):
        raise _unsupported(base, f"a {base_cls} (not a fast tokenizer)")
    held_docs = _read_held_out(held_files, text_key, txt_documents) if held_files else None
    if held_files is not None and not any(_HAN.search(d) for d in held_docs):
        raise ValueError(
            f"--held-out: no Chinese characters in {', '.join(map(str, held_files))}. Give "
            "held-out text in the language the pieces are for."
        )
    stream = _Corpus(files, text_key, txt_documents, hold_out=held_files is None)
    lines = _first_line(iter(stream), files, "--corpus")

    with atomic_directory(out, overwrite=overwrite) as tmp:
        for name in _COPIED:
            if (base / name).is_file():
                shutil.copyfile(base / name, tmp / name)
        for extra in sorted(base.glob("chat_template*")):
            if extra.is_file():
                shutil.copyfile(extra, tmp / extra.name)
        if kind == "sentencepiece":
            first_id, trained, new = _extend_sp(base, tmp, lines, vocab_size, max_new, seed)
        else:
            first_id, trained, new = _extend_byte_level(base, tmp, lines, vocab_size, max_new)
        if held_docs is None:
            held_docs = stream.held
        if not any(_HAN.search(d) for d in held_docs):
            raise ValueError(
                f"--corpus: the held-out documents (every {HELD_OUT_EVERY}th of "
                f"{stream.documents}) hold no Chinese characters. Give --held-out with Chinese "
                "text."
            )
        new_tok = auto_tokenizer(tmp)
        _check(base_tok, new_tok, tmp, len(new))
        before, chars = tokens_per_zh_char(base_tok, held_docs)
        after, _ = tokens_per_zh_char(new_tok, held_docs)
        report = ExtendReport(
            kind=kind,
            base=str(base),
            out=str(out),
            tokenizer_class=type(new_tok).__name__,
            base_size=len(base_tok),
            new_size=len(new_tok),
            added=len(new),
            first_new_id=first_id,
            trained_pieces=trained,
            corpus=[str(f) for f in files],
            held_out=", ".join(map(str, held_files))
            if held_files
            else f"every {HELD_OUT_EVERY}th corpus document ({len(held_docs)} documents)",
            held_out_zh_chars=chars,
            tokens_per_zh_char_before=round(before, 4),
            tokens_per_zh_char_after=round(after, 4),
            sample_new_tokens=new[:20],
            settings=_settings(base_tok, vocab_size, max_new, seed),
        )
        atomic_write_json(tmp / REPORT_FILE, report.to_dict())
    log_rank0(logger, "%s", report.summary())
    return report


def _settings(base_tok: Any, vocab_size: int, max_new: int | None, seed: int) -> dict[str, Any]:
    from layerfreeze.data.tokenizer import tokenizer_fingerprint

    return {
        "vocab_size": vocab_size,
        "max_new": max_new,
        "seed": seed,
        "base_fingerprint": tokenizer_fingerprint(base_tok),
    }


def _check(base_tok: Any, new_tok: Any, where: Path, added: int) -> None:
    """The merged tokenizer loads as the base's class, with every old id the same token."""
    if type(new_tok) is not type(base_tok):
        raise ValueError(
            f"{where}: AutoTokenizer loads the extended tokenizer as {type(new_tok).__name__}, "
            f"the base as {type(base_tok).__name__}; nothing written."
        )
    if len(new_tok) != len(base_tok) + added:
        raise ValueError(
            f"{where}: the extended tokenizer has {len(new_tok)} ids, expected "
            f"{len(base_tok)} + {added}; nothing written."
        )
    old, got = base_tok.get_vocab(), new_tok.get_vocab()
    moved = [t for t, i in old.items() if got.get(t) != i]
    if moved:
        raise ValueError(
            f"{where}: {len(moved)} existing tokens changed id (e.g. {moved[:3]}); nothing written."
        )
