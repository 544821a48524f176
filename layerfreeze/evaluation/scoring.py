"""Log-likelihood scoring of multiple-choice continuations: a fast batched scorer and a naive one.

Tokenisation follows lm-evaluation-harness (``TemplateLM._encode_pair``): trailing whitespace of
the context moves into the continuation, ``context_ids = encode(context)`` and the continuation
tokens are ``encode(context + continuation)[len(context_ids):]``; the scored sequence is
``context_ids + continuation_ids`` and a letter's score is the sum of the log-softmax of its
continuation tokens. Inputs longer than ``max_length`` are cut from the left as lm-eval does.

The fast path (:class:`Scorer`) does, per question, one forward row per group of letters whose
continuations share all tokens but the last (one row for all four when each letter is one
token, or when a tokenizer splits ``" A"`` into ``"▁" + "A"``); rows are bucketed by length into
batches; and with a Hugging Face causal LM the key/value cache of the token prefix shared by
every question of a subject (the header and few-shot examples) is computed once and reused.
The shared prefix is the longest common prefix of the *token* sequences, so a tokenizer merge
across the prefix/question boundary cannot make it differ from the naive path.

Any module mapping ``input_ids [B, T]`` to logits ``[B, T, V]`` (or an output with ``.logits``)
works through the plain path (no cache), e.g. a wrapped Megatron model.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from layerfreeze.engines.common import unwrap_module

__all__ = [
    "ScoreRequest",
    "encode_request",
    "Scorer",
    "score_naive",
    "is_hf_causal_lm",
]


@dataclass
class ScoreRequest:
    """One question: a tokenised context and the tokenised continuations to compare.

    Attributes:
        context_ids: Tokens of the prompt (with BOS when the tokenizer adds it).
        continuation_ids: One token list per choice (non-empty).
        group: Requests with the same group share a cached prefix (e.g. the subject name).
    """

    context_ids: list[int]
    continuation_ids: list[list[int]]
    group: str = ""


def encode_request(
    tokenizer: Any, context: str, continuations: Sequence[str], group: str = ""
) -> ScoreRequest:
    """Tokenise a context and its continuations the way lm-eval does for causal models.

    Raises:
        ValueError: a continuation tokenises to nothing after the context.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        moved, context = context[-n_spaces:], context[:-n_spaces]
    else:
        moved = ""
    ctx = list(tokenizer.encode(context))
    conts = []
    for c in continuations:
        whole = list(tokenizer.encode(context + moved + c))
        cont = whole[len(ctx):]
        if not cont:
            raise ValueError(
                f"continuation {c!r}: tokenises to no tokens after the context (context ends "
                f"{context[-20:]!r}). The tokenizer merges it into the context; use another "
                "prompt format."
            )
        conts.append(cont)
    return ScoreRequest(context_ids=ctx, continuation_ids=conts, group=group)


def is_hf_causal_lm(model: Any) -> bool:
    """True for a ``transformers`` model (the KV-cache fast path)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers is a hard dependency; guard odd installs
        return False
    return isinstance(model, PreTrainedModel)


def _logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(
        f"model output: expected logits [B, T, V] or an object with .logits, got "
        f"{type(out).__name__}. Wrap the model so it maps input_ids to logits."
    )


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def default_max_length(model: Any, fallback: int = 2048) -> int:
    """The model's context length as lm-eval's HFLM finds it, else ``fallback``."""
    cfg = getattr(unwrap_module(model), "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, attr, None) if cfg is not None else None
        if isinstance(v, int) and v > 0:
            return v
    return fallback


@torch.no_grad()
def score_naive(
    model: Callable[..., Any], requests: Sequence[ScoreRequest], max_length: int | None = None
) -> list[list[float]]:
    """Reference scorer: one full forward pass per (question, choice), no batching, no cache.

    Returns:
        Per request, the log-likelihood of each continuation.
    """
    max_length = max_length or default_max_length(model)
    device = _model_device(model)
    out: list[list[float]] = []
    for r in requests:
        scores = []
        for cont in r.continuation_ids:
            full = (r.context_ids + cont)[-(max_length + 1):]
            inp = torch.tensor([full[:-1]], device=device)
            logp = F.log_softmax(_logits_of(model(inp)).float()[0], dim=-1)
            n = len(cont)
            pos = torch.arange(len(full) - 1 - n, len(full) - 1, device=device)
            tgt = torch.tensor(cont, device=device)
            scores.append(float(logp[pos, tgt].sum()))
        out.append(scores)
    return out


@dataclass
class _Row:
    """One forward row: ``tokens`` after the cached prefix; letters read at ``first`` onward."""

    req: int
    letters: list[int]
    tokens: list[int]
    first: int  # index in ``tokens`` whose logits predict the first continuation token


@dataclass
class _Step:
    """One model forward: a prefix to cache (``prefix``) or a batch of rows (``rows``)."""

    group: str | None
    prefix: list[int] = field(default_factory=list)
    rows: list[_Row] = field(default_factory=list)
    is_prefix: bool = False


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        limit = min(n, len(s))
        while i < limit and s[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return n


class Scorer:
    """Batched log-likelihood scorer with few-shot prefix KV-cache reuse.

    Args:
        model: A causal LM: a ``transformers`` model (fast path with ``past_key_values``), a
            DeepSpeed engine around one, or any callable mapping ``input_ids`` to logits.
        batch_size: Forward rows per batch.
        max_length: Context length; longer inputs are cut from the left (default: from the
            model config, else 2048).
        use_cache: Reuse the shared prefix's KV cache. None: when the model is a
            ``transformers`` model. True on another callable raises ``ValueError``.
        min_prefix: Shared prefixes shorter than this many tokens are not cached.

    Usage::

        scorer = Scorer(model, batch_size=16)
        steps = scorer.plan(requests)          # the forward calls, known before running
        loglik = scorer.run(requests, steps, pad_to=len(steps))
    """

    def __init__(
        self,
        model: Any,
        batch_size: int = 16,
        max_length: int | None = None,
        use_cache: bool | None = None,
        min_prefix: int = 16,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}.")
        self.model = model
        self.module = unwrap_module(model)
        self.batch_size = batch_size
        self.max_length = max_length or default_max_length(model)
        hf = is_hf_causal_lm(self.module)
        if use_cache and not hf:
            raise ValueError(
                f"use_cache: the KV-cache fast path needs a transformers model, got "
                f"{type(self.module).__name__}. Use use_cache=None/False for plain callables."
            )
        self.hf = hf
        # HF causal LMs can skip the LM head on positions whose logits are not read: with a
        # 150k vocabulary the full [B, T, V] logits would dominate time and memory.
        params = inspect.signature(type(self.module).forward).parameters if hf else {}
        self._keeps_logits = "logits_to_keep" in params
        # the KV-cache keyword: ``cache`` from transformers 5.2x on (``past_key_values`` is
        # deprecated there and goes in 5.40), ``past_key_values`` before
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.use_cache = hf if use_cache is None else bool(use_cache)
        self.min_prefix = min_prefix
        self.device = _model_device(self.module)

    # -- planning -----------------------------------------------------------------------
    def plan(self, requests: Sequence[ScoreRequest]) -> list[_Step]:
        """The forward calls that :meth:`run` will make (prefix computations and row batches)."""
        by_group: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            by_group.setdefault(r.group, []).append(i)
        steps: list[_Step] = []
        for group, idx in by_group.items():
            fits = [i for i in idx if self._fits(requests[i])]
            fit_set = set(fits)
            long = [i for i in idx if i not in fit_set]
            shared = 0
            if self.use_cache and fits:
                shared = _common_prefix_len([requests[i].context_ids for i in fits])
                # Keep at least the last context token out of the cache: its logits are read.
                shared = min(shared, min(len(requests[i].context_ids) for i in fits) - 1)
                if shared < self.min_prefix:
                    shared = 0
            rows: list[_Row] = []
            for i in fits:
                rows.extend(self._rows(i, requests[i], shared))
            prefix = requests[fits[0]].context_ids[:shared] if shared else []
            if prefix:
                steps.append(_Step(group=group, prefix=prefix, is_prefix=True))
            steps.extend(self._batches(rows, group if prefix else None, prefix))
            long_rows: list[_Row] = []
            for i in long:
                long_rows.extend(self._rows(i, requests[i], 0))
            steps.extend(self._batches(long_rows, None, []))
        return steps

    def _fits(self, r: ScoreRequest) -> bool:
        return all(len(r.context_ids) + len(c) - 1 <= self.max_length for c in r.continuation_ids)

    def _rows(self, i: int, r: ScoreRequest, shared: int) -> list[_Row]:
        groups: dict[tuple[int, ...], list[int]] = {}
        for li, cont in enumerate(r.continuation_ids):
            groups.setdefault(tuple(cont[:-1]), []).append(li)
        rows = []
        for head, letters in groups.items():
            full = r.context_ids + list(head)  # == (context + continuation)[:-1]
            first = len(r.context_ids) - 1
            if len(full) > self.max_length:  # lm-eval: keep the last max_length tokens
                cut = len(full) - self.max_length
                full, first = full[cut:], first - cut
            rows.append(_Row(req=i, letters=letters, tokens=full[shared:], first=first - shared))
        return rows

    def _batches(self, rows: list[_Row], group: str | None, prefix: list[int]) -> list[_Step]:
        rows = sorted(rows, key=lambda r: -len(r.tokens))  # length buckets, longest first
        return [
            _Step(group=group, prefix=prefix, rows=rows[s : s + self.batch_size])
            for s in range(0, len(rows), self.batch_size)
        ]

    # -- running ------------------------------------------------------------------------
    def _forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, past=None,
        keep: int = 0,
    ):
        if self.hf:
            kwargs = {"logits_to_keep": keep} if (keep and self._keeps_logits) else {}
            kwargs[self._cache_kw] = past
            return self.module(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=past is not None,
                **kwargs,
            )
        return self.model(input_ids)

    def _prefix_cache(self, prefix: list[int]):
        ids = torch.tensor([prefix], device=self.device)
        kwargs = {"logits_to_keep": 1} if self._keeps_logits else {}  # logits unused here
        out = self.module(
            input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **kwargs
        )
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        layers = [tuple(t) for t in cache]
        if any(len(t) > 2 and t[2] is not None for t in layers):
            raise ValueError(
                f"use_cache: {type(self.module).__name__} uses a sliding-window cache; run with "
                "use_cache=False."
            )
        return [(t[0], t[1]) for t in layers]

    def _expand_cache(self, kv: list[tuple[torch.Tensor, torch.Tensor]], b: int):
        from transformers import DynamicCache

        return DynamicCache(
            ddp_cache_data=[(k.expand(b, *k.shape[1:]), v.expand(b, *v.shape[1:])) for k, v in kv]
        )

    def _run_batch(
        self, step: _Step, requests: Sequence[ScoreRequest], kv, scores: list[list[float]]
    ) -> None:
        b = len(step.rows)
        t = max(len(r.tokens) for r in step.rows)
        ids = torch.zeros((b, t), dtype=torch.long)
        mask = torch.zeros((b, len(step.prefix) + t), dtype=torch.long)
        mask[:, : len(step.prefix)] = 1
        for j, r in enumerate(step.rows):
            ids[j, : len(r.tokens)] = torch.tensor(r.tokens)
            mask[j, len(step.prefix) : len(step.prefix) + len(r.tokens)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        past = self._expand_cache(kv, b) if kv is not None else None
        keep = max(t - r.first for r in step.rows)  # the last `keep` positions hold every read
        logits = _logits_of(self._forward(ids, mask if self.hf else None, past, keep=keep))
        shift = logits.shape[1] - t  # -(t - keep) when the model kept only `keep` positions
        for j, r in enumerate(step.rows):
            req = requests[r.req]
            n = len(req.continuation_ids[r.letters[0]])
            first = r.first + shift
            logp = F.log_softmax(logits[j, first : first + n].float(), dim=-1)
            for li in r.letters:
                cont = torch.tensor(req.continuation_ids[li], device=logp.device)
                scores[r.req][li] = float(logp.gather(1, cont[:, None]).sum())

    def _dummy_forward(self) -> None:
        ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self._forward(ids, torch.ones_like(ids) if self.hf else None)

    @torch.no_grad()
    def run(
        self,
        requests: Sequence[ScoreRequest],
        steps: list[_Step] | None = None,
        pad_to: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[list[float]]:
        """Score ``requests``; returns per request the log-likelihood of each continuation.

        Args:
            requests: The questions.
            steps: The plan from :meth:`plan` (computed when omitted).
            pad_to: Make exactly this many forward calls, adding 1-token dummy forwards
                after the real ones, so every data-parallel rank runs the same number (ZeRO-3
                gathers parameters inside each forward).
            progress: Called with the number of questions finished after each batch.
        """
        steps = self.plan(requests) if steps is None else steps
        if pad_to is not None and pad_to < len(steps):
            raise ValueError(f"pad_to: {pad_to} is fewer than the {len(steps)} planned forwards.")
        scores = [[math.nan] * len(r.continuation_ids) for r in requests]
        remaining = [len(r.continuation_ids) for r in requests]
        kv = None
        kv_group: str | None = None
        for step in steps:
            if step.is_prefix:
                kv, kv_group = self._prefix_cache(step.prefix), step.group
                continue
            use = kv if (step.group is not None and step.group == kv_group) else None
            if step.group is not None and use is None:
                raise RuntimeError(f"internal: batch for group {step.group!r} without its prefix")
            self._run_batch(step, requests, use, scores)
            if progress is not None:
                done = 0
                for r in step.rows:
                    remaining[r.req] -= len(r.letters)
                    done += remaining[r.req] == 0
                progress(done)
        for _ in range(len(steps), pad_to or 0):
            self._dummy_forward()
        bad = [i for i, s in enumerate(scores) if any(math.isnan(x) for x in s)]
        if bad:
            raise RuntimeError(f"internal: {len(bad)} requests left unscored (first {bad[0]})")
        return scores

    def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        """Plan and run in one call (single process)."""
        return self.run(requests)
