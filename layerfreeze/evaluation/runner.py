"""``evaluate``: build prompts, score every question (sharded over ranks), gather, aggregate.

Distributed: question ``i`` (in subject order) goes to rank ``i % world_size``; each rank plans
its forward calls, the ranks agree on the largest count, and every rank runs exactly that many
forwards (1-token dummies after its real work), so ZeRO-3 parameter gathering inside each
forward never waits on a rank that has finished. Records are gathered on every rank (rank 0
writes files).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from layerfreeze.evaluation.data import LETTERS, Benchmark
from layerfreeze.evaluation.prompts import build_prefix, continuations, format_question
from layerfreeze.evaluation.report import summarize
from layerfreeze.evaluation.scoring import Scorer, ScoreRequest, encode_request
from layerfreeze.utils import dist as dist_utils
from layerfreeze.utils.logging import get_logger, log_rank0

__all__ = ["evaluate", "build_requests"]

logger = get_logger(__name__)


def _limited(benchmark: Benchmark, max_questions: int | None):
    for s in benchmark.subjects:
        qs = s.questions if max_questions is None else s.questions[:max_questions]
        for q in qs:
            yield s, q


def build_requests(
    tokenizer: Any,
    benchmark: Benchmark,
    shots: int = 5,
    prompt: str = "lm-eval",
    max_questions: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[list[tuple[str, Any]], list[ScoreRequest]]:
    """Prompts of this rank's share of questions, tokenised.

    Returns:
        ``(items, requests)``: ``items[i] = (subject, Question)`` for ``requests[i]``.
    """
    conts = continuations(prompt)
    items: list[tuple[str, Any]] = []
    requests: list[ScoreRequest] = []
    prefixes: dict[str, str] = {}
    for i, (s, q) in enumerate(_limited(benchmark, max_questions)):
        if i % world_size != rank:
            continue
        if s.name not in prefixes:
            prefixes[s.name] = build_prefix(benchmark.name, s, shots, prompt)
        context = prefixes[s.name] + format_question(benchmark.name, q, prompt)
        items.append((s.name, q))
        requests.append(encode_request(tokenizer, context, conts, group=s.name))
    return items, requests


def _record(benchmark: str, q: Any, scores: list[float]) -> dict[str, Any]:
    pred = LETTERS[scores.index(max(scores))]  # ties go to the first letter
    return {
        "benchmark": benchmark,
        "subject": q.subject,
        "index": q.index,
        "id": q.id,
        "pred": pred,
        "gold": q.answer,
        "correct": None if q.answer is None else pred == q.answer,
        "loglik": dict(zip(LETTERS, scores, strict=True)),
    }


def evaluate(
    model: Any,
    tokenizer: Any,
    benchmark: Benchmark,
    shots: int = 5,
    prompt: str = "lm-eval",
    batch_size: int = 16,
    max_questions: int | None = None,
    max_length: int | None = None,
    use_cache: bool | None = None,
    progress: bool = False,
    shard: tuple[int, int] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score a benchmark split; call it on every rank of a data-parallel job.

    Args:
        model: A ``transformers`` causal LM (KV-cache fast path), a DeepSpeed engine around
            one, or any callable mapping ``input_ids`` to logits.
        tokenizer: Anything with ``encode(str) -> list[int]`` (a transformers tokenizer).
        benchmark: From :func:`~layerfreeze.evaluation.data.load_benchmark`.
        shots: Few-shot examples (first rows of dev).
        prompt: ``"lm-eval"`` or ``"official"``.
        batch_size: Forward rows per batch.
        max_questions: Only the first N questions of each subject.
        max_length: Context length (default: the model's).
        use_cache: See :class:`~layerfreeze.evaluation.scoring.Scorer`.
        progress: Show a progress bar on rank 0.
        shard: ``(data-parallel rank, data-parallel size)`` when they differ from the global
            rank and world size (tensor / pipeline parallelism: the ranks of one model replica
            score the same questions in lockstep, and each question is kept once).

    Returns:
        ``(result, records)``: the aggregated result (see
        :func:`~layerfreeze.evaluation.report.summarize`, plus ``seconds``) and one record per
        question in subject/row order (``benchmark, subject, index, id, pred, gold, correct,
        loglik``). Both are identical on every rank.
    """
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    if not dist_utils.is_dist():
        rank, world = 0, 1
    elif shard is not None:
        rank, world = shard
    t0 = time.perf_counter()
    items, requests = build_requests(
        tokenizer, benchmark, shots, prompt, max_questions, rank=rank, world_size=world
    )
    scorer = Scorer(model, batch_size=batch_size, max_length=max_length, use_cache=use_cache)
    steps = scorer.plan(requests)
    counts = dist_utils.all_gather_objects(len(steps))
    pad_to = max(counts)
    total = len(list(_limited(benchmark, max_questions)))
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"{benchmark.name} {benchmark.split}", unit="q",
                   dynamic_ncols=True)
    update = None
    if bar is not None:

        def update(n: int) -> None:  # rank 0 reports for all shards (they progress alike)
            bar.update(min(n * world, bar.total - bar.n))

    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            scores = scorer.run(requests, steps, pad_to=pad_to, progress=update)
    finally:
        if bar is not None:
            bar.close()
        if was_training and hasattr(model, "train"):
            model.train(True)
    mine = [_record(benchmark.name, q, s) for (_, q), s in zip(items, scores, strict=True)]
    gathered = dist_utils.all_gather_objects(mine)
    order = {s.name: k for k, s in enumerate(benchmark.subjects)}
    unique = {(r["subject"], r["index"]): r for part in gathered for r in part}
    records = sorted(unique.values(), key=lambda r: (order[r["subject"]], r["index"]))
    result = summarize(benchmark, records, shots, prompt)
    result["seconds"] = time.perf_counter() - t0
    result["world_size"] = world
    log_rank0(
        logger,
        "%s %s: %d questions in %.1fs over %d rank(s), %d forwards per rank",
        benchmark.name, benchmark.split, len(records), result["seconds"], world, pad_to,
        level=logging.INFO,
    )
    return result, records
