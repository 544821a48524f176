"""The run's side of ``tokenizer.extend_from``: extend the base tokenizer once per run.

``layerfreeze train`` with ``tokenizer.extend_from`` calls :func:`prepare_extended` (through
:func:`~layerfreeze.data.tokenizer.prepare_tokenizer`) to write ``<out_dir>/tokenizer`` with
:func:`~layerfreeze.data.vocab_extend.extend_tokenizer`, or to reuse it on a restart when it was
extended with the same settings; :func:`base_first_new_id` is what ``new_rows(from_id=auto)``
stands for. Errors name the run config's keys (``tokenizer.extend_from``, ``data.paths``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from layerfreeze.data.vocab_extend import REPORT_FILE, _settings, detect_kind, extend_tokenizer
from layerfreeze.errors import ConfigError
from layerfreeze.utils.logging import get_logger, log_rank0

logger = get_logger(__name__)

__all__ = ["base_first_new_id", "prepare_extended"]


def base_first_new_id(base: str | Path, key: str = "tokenizer.extend_from") -> int:
    """The first id an extension of ``base`` gives a new piece: ``len(AutoTokenizer(base))``
    (every id in use, vocabulary and added tokens; what ``new_rows(from_id=auto)`` stands for).

    Raises:
        ValueError: ``base`` is no supported tokenizer directory, named by ``key``.
    """
    from layerfreeze.data.tokenizer import auto_tokenizer

    try:
        detect_kind(base)
        return len(auto_tokenizer(base))
    except (OSError, ValueError) as e:
        msg = " ".join(str(e).split())
        raise ValueError(f"{key}: {msg.removeprefix('--base: ')}") from None


def prepare_extended(
    cfg: Any,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    text_key: str = "text",
    txt_documents: str = "paragraph",
) -> None:
    """``tokenizer.extend_from`` of a run: extend the base into ``out_dir`` once.

    An ``out_dir`` already holding a tokenizer is reused when its
    :data:`REPORT_FILE` says it was extended from the same base tokenizer (by content) with the
    same ``vocab_size`` and ``max_new``; anything else stops the run, so a restarted run never
    gets a tokenizer trained differently. A changed corpus does not retrain a tokenizer that is
    already there (its ids are what the checkpoints hold).

    Args:
        cfg: the ``tokenizer`` section (``extend_from``, ``vocab_size``, ``max_new``).
        inputs: the files the pieces are trained on (``tokenizer.train_inputs`` or
            ``data.paths``).
        out_dir: the run's tokenizer directory (``<out_dir>/tokenizer``).
        text_key: JSONL field of the inputs.
        txt_documents: ``.txt`` document split of the inputs.

    Raises:
        ConfigError: a reused tokenizer that does not match, or a bad base / corpus.
    """
    from layerfreeze.data.tokenizer import auto_tokenizer

    out_dir = Path(out_dir)
    base = Path(cfg.extend_from)
    base_first_new_id(base)  # the base is a tokenizer we can extend, named by its key
    if (out_dir / "tokenizer.json").is_file() or (out_dir / "tokenizer.model").is_file():
        _check_reused_extension(out_dir, cfg, auto_tokenizer(base))
        log_rank0(logger, "reusing the tokenizer extended earlier in %s", out_dir)
        return
    try:
        extend_tokenizer(
            base, inputs, out_dir, vocab_size=cfg.vocab_size, max_new=cfg.max_new,
            text_key=text_key, txt_documents=txt_documents, overwrite=False,
        )
    except ConfigError as e:
        raise ConfigError([_run_key(p) for p in e.problems]) from None
    except ValueError as e:
        raise ConfigError(_run_key(" ".join(str(e).split()))) from None


def _run_key(msg: str) -> str:
    """A message of the command's options in the run config's terms."""
    if msg.startswith("vocab_size:"):
        msg = "tokenizer." + msg
    for opt, key in (("--base", "tokenizer.extend_from"), ("--vocab-size", "tokenizer.vocab_size"),
                     ("--max-new", "tokenizer.max_new"), ("--corpus", "data.paths"),
                     ("--held-out", "data.paths")):
        msg = msg.replace(opt, key)
    return msg


def _check_reused_extension(out_dir: Path, cfg: Any, base_tok: Any) -> None:
    report = out_dir / REPORT_FILE
    try:
        settings = json.loads(report.read_text(encoding="utf-8"))["settings"]
        if not isinstance(settings, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(
            f"tokenizer.extend_from: {out_dir} holds a tokenizer without a readable {REPORT_FILE} "
            f"(not extended by this run), got extend_from={cfg.extend_from!r}. Move {out_dir} "
            "away or use a new logging.out_dir."
        ) from None
    want = _settings(base_tok, cfg.vocab_size, cfg.max_new, settings.get("seed", 0))
    problems = []
    if settings.get("base_fingerprint") != want["base_fingerprint"]:
        problems.append(
            f"tokenizer.extend_from: {out_dir} was extended from another base tokenizer than "
            f"{cfg.extend_from!r} (its content differs). Use the same base, or a new "
            "logging.out_dir (a run resumed from a checkpoint must keep its tokenizer)."
        )
    for key in ("vocab_size", "max_new"):
        if settings.get(key) != want[key]:
            problems.append(
                f"tokenizer.{key}: {out_dir} holds a tokenizer extended with {key}="
                f"{settings.get(key)!r}, got {want[key]!r}. Use the same value, or a new "
                "logging.out_dir (a run resumed from a checkpoint must keep its tokenizer)."
            )
    if problems:
        raise ConfigError(problems)
