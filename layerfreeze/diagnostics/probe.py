"""Probe sets for the layer diagnostics: text files or C-Eval/CMMLU prompts -> token batches.

Two kinds, both tokenised with the model's own tokenizer and capped at ``max_tokens``:

* ``text``: UTF-8 files (``.txt`` or any text; ``.jsonl`` files contribute each line's ``text``
  field). Each file is tokenised and cut into sequences of ``seq_len`` tokens; a file's last
  piece is kept when it has at least 2 tokens (one next-token prediction).
* ``choice``: C-Eval / CMMLU questions loaded by :func:`layerfreeze.evaluation.data.load_benchmark`
  and written by the evaluation's prompt formats (:mod:`layerfreeze.evaluation.prompts`),
  tokenised the lm-eval way (:func:`layerfreeze.evaluation.scoring.encode_request`). The four
  letter continuations must differ only in their last token (one token each, or a shared
  ``"▁"`` first token): the scored sequence is the context plus the shared part, and the
  answer is read from the next-token logits at its last position over the four letter tokens.

Batches are right-padded (``attention_mask`` 0 on padding), so causal positions of real tokens
never see padding.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["ProbeBatch", "ProbeSet", "build_text_probe", "build_choice_probe", "collate"]

_READ_CHARS = 1 << 16  # text is tokenised in pieces of about this many characters


@dataclass
class ProbeBatch:
    """One right-padded batch.

    Attributes:
        input_ids: ``(batch, seq)`` token ids (padding positions hold the pad id or 0).
        attention_mask: ``(batch, seq)``, 1 on real tokens.
        answer_pos: multiple choice: ``(batch,)`` position whose next-token logits pick the answer.
        choice_ids: multiple choice: ``(batch, 4)`` token id of each letter at that position.
        gold: multiple choice: ``(batch,)`` index 0-3 of the correct letter.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_pos: torch.Tensor | None = None
    choice_ids: torch.Tensor | None = None
    gold: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> ProbeBatch:
        """A copy with every tensor on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return ProbeBatch(
            *(
                move(getattr(self, f))
                for f in ("input_ids", "attention_mask", "answer_pos", "choice_ids", "gold")
            )
        )

    def row(self, i: int) -> ProbeBatch:
        """Row ``i`` alone, without its padding."""
        n = int(self.attention_mask[i].sum())
        pick = lambda t: None if t is None else t[i : i + 1]  # noqa: E731
        return ProbeBatch(
            self.input_ids[i : i + 1, :n],
            self.attention_mask[i : i + 1, :n],
            pick(self.answer_pos),
            pick(self.choice_ids),
            pick(self.gold),
        )


@dataclass
class ProbeSet:
    """Token batches plus what they came from.

    Attributes:
        kind: ``"text"`` or ``"choice"``.
        batches: the batches, in order.
        identity: JSON-ready description (files with sizes and SHA-256, or benchmark, split,
            subjects, shots, prompt format and question count) written into ``trace.json``.
    """

    kind: str
    batches: list[ProbeBatch]
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def num_sequences(self) -> int:
        """Sequences (text pieces or questions)."""
        return sum(int(b.input_ids.shape[0]) for b in self.batches)

    @property
    def num_tokens(self) -> int:
        """Real tokens over all batches."""
        return sum(b.num_tokens for b in self.batches)


def collate(rows: Sequence[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into ``(input_ids, attention_mask)``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def _check_sizes(max_tokens: int, batch_size: int, seq_len: int | None = None) -> None:
    if max_tokens < 2:
        raise ValueError(f"--max-tokens: must be at least 2, got {max_tokens}.")
    if batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {batch_size}.")
    if seq_len is not None and seq_len < 2:
        raise ValueError(f"--seq-len: must be at least 2, got {seq_len}.")


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return int(pad) if pad is not None else 0


def _file_texts(path: Path):
    """Yield text pieces of one file (``.jsonl``: the ``text`` field of each line)."""
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"--probe {path} line {n}: not valid JSON ({e}).") from None
                text = obj.get("text") if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    raise ValueError(
                        f"--probe {path} line {n}: expected an object with a string 'text' field."
                    )
                yield text
        return
    with open(path, encoding="utf-8") as f:
        while True:
            piece = f.read(_READ_CHARS)
            if not piece:
                return
            # Finish the current line so a word is not cut between two tokenizer calls.
            piece += f.readline()
            yield piece


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_text_probe(
    paths: Sequence[str | Path],
    tokenizer: Any,
    max_tokens: int = 16384,
    seq_len: int = 256,
    batch_size: int = 8,
) -> ProbeSet:
    """Tokenise text files into batches of ``seq_len``-token sequences, ``max_tokens`` in all.

    Args:
        paths: text files (``.jsonl``: one JSON object with a ``text`` field per line).
        tokenizer: the model's tokenizer (``encode`` is used; BOS as the tokenizer adds it).
        max_tokens: stop once this many tokens are collected.
        seq_len: tokens per sequence.
        batch_size: sequences per batch.

    Returns:
        The :class:`ProbeSet` (kind ``"text"``).

    Raises:
        ValueError: a missing or unreadable file, or no sequence of at least 2 tokens in all
            files (an empty probe set); the message names the files.
    """
    _check_sizes(max_tokens, batch_size, seq_len)
    if not paths:
        raise ValueError("--probe: no files given. Pass text files, or ceval / cmmlu.")
    rows: list[list[int]] = []
    total = 0
    files = []
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise ValueError(f"--probe {raw}: no such file. Pass text files, or ceval / cmmlu.")
        files.append({"path": str(path), "bytes": path.stat().st_size, "sha256": _sha256(path)})
        if total >= max_tokens:
            continue
        try:
            for text in _file_texts(path):
                if not text.strip():
                    continue
                ids = list(tokenizer.encode(text))
                for start in range(0, len(ids), seq_len):
                    piece = ids[start : start + seq_len][: max_tokens - total]
                    if len(piece) >= 2:
                        rows.append(piece)
                        total += len(piece)
                    if total >= max_tokens:
                        break
                if total >= max_tokens:
                    break
        except UnicodeDecodeError as e:
            raise ValueError(
                f"--probe {raw}: not UTF-8 text ({e.reason} at byte {e.start})."
            ) from None
    if not rows:
        raise ValueError(
            f"--probe: empty probe set: no sequence of at least 2 tokens in {', '.join(map(str, paths))}."
            " Pass files with text in them."
        )
    pad = _pad_id(tokenizer)
    batches = []
    for i in range(0, len(rows), batch_size):
        ids, mask = collate(rows[i : i + batch_size], pad)
        batches.append(ProbeBatch(ids, mask))
    identity = {
        "kind": "text",
        "files": files,
        "seq_len": seq_len,
        "max_tokens": max_tokens,
        "num_sequences": len(rows),
        "num_tokens": total,
    }
    return ProbeSet("text", batches, identity)


def build_choice_probe(
    benchmark: str,
    tokenizer: Any,
    data_dir: str | Path | None,
    subjects: Sequence[str] | None = None,
    split: str | None = None,
    shots: int = 0,
    prompt: str = "lm-eval",
    max_tokens: int = 16384,
    batch_size: int = 8,
    max_length: int | None = None,
) -> ProbeSet:
    """C-Eval / CMMLU questions as prompts ending where the answer letter is predicted.

    Questions are taken subject by subject (sorted subjects, file order) until ``max_tokens``
    prompt tokens are collected (at least one question). Prompts longer than ``max_length``
    are cut from the left, as the evaluation scorer does.

    Args:
        benchmark: ``"ceval"`` or ``"cmmlu"``.
        tokenizer: the model's tokenizer.
        data_dir: the released data folder (or its parent); None loads from the hub.
        subjects: subject keys (default: all).
        split: benchmark split (default: C-Eval ``val``, CMMLU ``test``); it needs answers.
        shots: few-shot examples from ``dev`` in each prompt.
        prompt: ``"lm-eval"`` or ``"official"`` (see :mod:`layerfreeze.evaluation.prompts`).
        max_tokens: token budget of the whole probe set.
        batch_size: prompts per batch.
        max_length: longest prompt kept (default: no cut).

    Returns:
        The :class:`ProbeSet` (kind ``"choice"``).

    Raises:
        ValueError: unknown benchmark, subject or split, a split without answers, bad data files,
            letters the tokenizer does not split into one deciding token.
    """
    from layerfreeze.evaluation.data import load_benchmark
    from layerfreeze.evaluation.prompts import build_prefix, continuations, format_question
    from layerfreeze.evaluation.scoring import encode_request

    _check_sizes(max_tokens, batch_size)
    bench = load_benchmark(benchmark, data_dir, split, list(subjects) if subjects else None)
    conts = continuations(prompt)
    rows: list[tuple[list[int], list[int], int]] = []
    total = 0
    taken: dict[str, int] = {}
    for subject in bench.subjects:
        prefix = build_prefix(benchmark, subject, shots, prompt)
        for q in subject.questions:
            if q.answer is None:
                raise ValueError(
                    f"--split {bench.split}: {benchmark} {subject.name} has no answers in this "
                    "split; use a split with answers (C-Eval val/dev, CMMLU test/dev)."
                )
            req = encode_request(tokenizer, prefix + format_question(benchmark, q, prompt), conts)
            c = req.continuation_ids
            if len({len(x) for x in c}) != 1 or any(x[:-1] != c[0][:-1] for x in c):
                raise ValueError(
                    f"--probe {benchmark}: the tokenizer encodes the answer letters {conts} as "
                    f"{c}; the logit lens needs the four to differ only in their last token."
                )
            seq = req.context_ids + c[0][:-1]
            if max_length is not None and len(seq) > max_length:
                seq = seq[-max_length:]
            if rows and total + len(seq) > max_tokens:
                break
            rows.append((seq, [x[-1] for x in c], "ABCD".index(q.answer)))
            total += len(seq)
            taken[subject.name] = taken.get(subject.name, 0) + 1
        else:
            continue
        break
    if not rows:
        raise ValueError(f"--probe {benchmark}: empty probe set: no questions were loaded.")
    pad = _pad_id(tokenizer)
    batches = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        ids, mask = collate([r[0] for r in chunk], pad)
        batches.append(
            ProbeBatch(
                ids,
                mask,
                answer_pos=torch.tensor([len(r[0]) - 1 for r in chunk], dtype=torch.long),
                choice_ids=torch.tensor([r[1] for r in chunk], dtype=torch.long),
                gold=torch.tensor([r[2] for r in chunk], dtype=torch.long),
            )
        )
    identity = {
        "kind": "choice",
        "benchmark": benchmark,
        "split": bench.split,
        "source": bench.source,
        "shots": shots,
        "prompt": prompt,
        "subjects": taken,
        "num_questions": len(rows),
        "num_tokens": total,
        "max_tokens": max_tokens,
    }
    return ProbeSet("choice", batches, identity)
