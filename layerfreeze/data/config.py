"""The ``tokenizer`` and ``data`` sections of the training config (schema only; no torch)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from layerfreeze.errors import ConfigError

__all__ = ["TokenizerConfig", "DataConfig"]


@dataclass
class TokenizerConfig:
    """Which tokenizer the run uses, or how to train one when none is given."""

    path: str | None = None
    """HF tokenizer directory or SentencePiece ``.model`` file. Empty: train a SentencePiece
    tokenizer on ``train_inputs`` (default: the data files) into the run's output directory
    (reused when it is already there)."""

    vocab_size: int = 2000
    """Pieces of a tokenizer trained here (includes 4 special and 256 byte-fallback pieces).
    2000 suits the bundled demo corpus (it supports at most ~2100); use 32000+ for real text."""

    model_type: Literal["unigram", "bpe"] = "unigram"
    """SentencePiece algorithm of a tokenizer trained here."""

    character_coverage: float = 0.9995
    """Fraction of characters a trained tokenizer covers with pieces; rarer ones become bytes."""

    train_inputs: list[str] = field(default_factory=list)
    """Files/directories to train on (``@bundled`` = the bundled corpus). Empty: ``data.paths``."""

    input_sentence_size: int = 0
    """Train on a random sample of this many lines (0: all); e.g. 2000000 for large corpora."""

    extend_from: str | None = None
    """Base tokenizer directory to extend for continued pre-training on a new language (the
    tokenizer of ``model.path``: a SentencePiece ``tokenizer.model`` or a byte-level BPE
    ``tokenizer.json``). The run trains ``vocab_size`` pieces on ``train_inputs`` (default: the
    data files), appends the new ones after every existing id into ``<out_dir>/tokenizer``
    (reused on restart when it was extended with the same settings), resizes the model's
    embedding and head to it (``resize_init``), and ``new_rows(from_id=auto)`` in the plan
    means its first new id. Needs ``model.path``; exclusive with ``path``."""

    max_new: int | None = None
    """With ``extend_from``: add at most this many pieces (null: every new trained piece)."""

    resize_init: Literal["subtoken_mean", "mean"] = "subtoken_mean"
    """With ``extend_from``: a new row starts as the mean of the rows of the old sub-tokens of
    its string (``subtoken_mean``) or of all old rows (``mean``)."""

    def __post_init__(self) -> None:
        problems = []
        if self.path is not None and not str(self.path).strip():
            problems.append(
                "path: must be a path or null, got ''. Remove the key to train a tokenizer."
            )
        if self.vocab_size <= 260:
            problems.append(
                f"vocab_size: must be above 260 (4 special + 256 byte pieces), got {self.vocab_size}. "
                "Use e.g. 8000."
            )
        if self.input_sentence_size < 0:
            problems.append(
                f"input_sentence_size: must be 0 (all lines) or positive, got {self.input_sentence_size}."
            )
        if not 0.0 < self.character_coverage <= 1.0:
            problems.append(
                f"character_coverage: must be in (0, 1], got {self.character_coverage}. "
                "Use 0.9995 for Chinese, 1.0 for small alphabets."
            )
        if self.extend_from is not None:
            if not str(self.extend_from).strip():
                problems.append(
                    "extend_from: must be a tokenizer directory or null, got ''. Remove the key "
                    "to use the base tokenizer as it is."
                )
            elif self.path is not None:
                problems.append(
                    f"extend_from: set together with tokenizer.path, got path={self.path!r} and "
                    f"extend_from={self.extend_from!r}. Remove tokenizer.path: the extended "
                    "tokenizer is written to <out_dir>/tokenizer."
                )
        if self.max_new is not None:
            if isinstance(self.max_new, bool) or not isinstance(self.max_new, int) \
                    or self.max_new < 1:
                problems.append(
                    f"max_new: must be a positive number of pieces or null (all), got "
                    f"{self.max_new!r}. Use e.g. 8000."
                )
            elif self.extend_from is None:
                problems.append(
                    f"max_new: only applies with tokenizer.extend_from, got max_new={self.max_new} "
                    "and no extend_from. Set extend_from or remove max_new."
                )
        if problems:
            raise ConfigError([f"tokenizer.{p}" for p in problems])


@dataclass
class DataConfig:
    """Training text: where it is, how it becomes packed token sequences, how it is ordered."""

    paths: list[str] = field(default_factory=lambda: ["@bundled"])
    """``.txt`` / ``.jsonl`` files or directories (recursive, sorted), in order; ``@bundled`` is
    the small mixed Chinese/English demo corpus shipped with layerfreeze."""

    text_key: str = "text"
    """JSONL field holding a document's text."""

    txt_documents: Literal["paragraph", "line"] = "paragraph"
    """How ``.txt`` files split into documents: ``paragraph`` (separated by blank lines) or
    ``line`` (one document per line)."""

    seq_len: int = 256
    """Tokens per training sequence (each packed window holds ``seq_len + 1`` tokens: inputs
    and labels shifted by one)."""

    add_bos: bool = True
    """Start each document with BOS when the tokenizer has one (EOS always ends a document)."""

    shuffle: bool = True
    """Shuffle sequences each epoch (seeded by ``seed`` and the epoch number)."""

    seed: int | None = None
    """Shuffle seed. Null: the run's seed."""

    cache_dir: str | None = None
    """Where tokenized corpora are cached (one sub-directory per corpus + tokenizer + options).
    Null: ``$LAYERFREEZE_CACHE`` or ``~/.cache/layerfreeze/tokens``."""

    num_workers: int = 1
    """Processes that tokenize the corpus into the cache (0: one per CPU). The cache is
    byte-identical for any value and reused across values; files larger than ``chunk_mb`` are
    split at document boundaries so one big file spreads over the workers."""

    chunk_mb: int = 64
    """Work unit of the tokenizing workers in MiB of text: larger files are cut into pieces of
    about this size. Memory per worker does not grow with it (documents stream in batches)."""

    def __post_init__(self) -> None:
        problems = []
        if not self.paths:
            problems.append(
                "paths: no input given, got []. List .txt/.jsonl files or directories, or '@bundled'."
            )
        for i, p in enumerate(self.paths):
            if not str(p).strip():
                problems.append(
                    f"paths[{i}]: empty path, got {p!r}. Remove it or give a file/directory."
                )
        if not self.text_key:
            problems.append("text_key: must not be empty, got ''. Use the JSONL field with the text.")
        if self.seq_len < 1:
            problems.append(f"seq_len: must be at least 1, got {self.seq_len}. Use e.g. 256.")
        if self.num_workers < 0:
            problems.append(
                f"num_workers: must be 0 (one per CPU) or a positive number of processes, got "
                f"{self.num_workers}."
            )
        if self.chunk_mb < 1:
            problems.append(f"chunk_mb: must be at least 1 (MiB), got {self.chunk_mb}. Use e.g. 64.")
        if problems:
            raise ConfigError([f"data.{p}" for p in problems])

    def resolved_cache_dir(self) -> Path:
        """``cache_dir`` with its default applied and ``~`` expanded."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        env = os.environ.get("LAYERFREEZE_CACHE")
        return Path(env).expanduser() if env else Path.home() / ".cache" / "layerfreeze" / "tokens"
