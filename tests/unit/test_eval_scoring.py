"""The fast scorer equals naive per-letter full-sequence scoring; multi-token continuations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layerfreeze.evaluation.data import load_benchmark
from layerfreeze.evaluation.prompts import build_context, continuations
from layerfreeze.evaluation.runner import _record
from layerfreeze.evaluation.scoring import Scorer, ScoreRequest, encode_request, score_naive
from tests.helpers.eval_fixtures import build_eval_model, cached_tokenizer

TIE = 1e-4


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _requests(tok, data_dir, shots=5, fmt="lm-eval", per_subject=4,
              subjects=("basic_medicine", "plant_protection")):  # short prompts
    b = load_benchmark("ceval", data_dir, "val", list(subjects))
    return [
        encode_request(tok, build_context("ceval", s, q, shots, fmt), continuations(fmt), s.name)
        for s in b.subjects for q in s.questions[:per_subject]
    ]


def _assert_same(fast, naive, atol=TIE):
    for f, n in zip(fast, naive, strict=True):
        assert f == pytest.approx(n, abs=atol)
        pf, pn = f.index(max(f)), n.index(max(n))
        if pf != pn:  # allowed only for a tie within 1e-4 in the reference
            assert abs(n[pf] - n[pn]) < TIE


def _manual_loglik(model, ids: list[int], cont: list[int]) -> float:
    """Sum of log p(cont_j | ids, cont_<j), one forward per token (a third implementation)."""
    total = 0.0
    seq = list(ids)
    for t in cont:
        logits = model(torch.tensor([seq])).logits[0, -1].float()
        total += float(F.log_softmax(logits, -1)[t])
        seq.append(t)
    return total


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("fmt", ["lm-eval", "official"])
def test_fast_path_equals_naive(eval_data_dir, attn, fmt):
    tok = cached_tokenizer("merged")
    model = build_eval_model(len(tok), attn_implementation=attn)
    reqs = _requests(tok, eval_data_dir, fmt=fmt)
    scorer = Scorer(model, batch_size=3)
    steps = scorer.plan(reqs)
    assert sum(s.is_prefix for s in steps) == 2  # one cached few-shot prefix per subject
    with torch.no_grad():
        naive = score_naive(model, reqs)
    _assert_same(scorer.run(reqs, steps), naive)


def test_single_token_letters_use_one_row_per_question(eval_data_dir):
    tok = cached_tokenizer("merged")
    reqs = _requests(tok, eval_data_dir, per_subject=3)
    assert all(len(c) == 1 for r in reqs for c in r.continuation_ids)
    steps = Scorer(build_eval_model(len(tok)), batch_size=64).plan(reqs)
    rows = [row for s in steps for row in s.rows]
    assert len(rows) == len(reqs) and all(sorted(r.letters) == [0, 1, 2, 3] for r in rows)


def test_multi_token_continuations(eval_data_dir):
    tok = cached_tokenizer("split")
    reqs = _requests(tok, eval_data_dir, per_subject=3)
    # " A" is "▁" + "A": two tokens, the first shared by all four letters.
    for r in reqs:
        assert all(len(c) == 2 for c in r.continuation_ids)
        assert len({c[0] for c in r.continuation_ids}) == 1
        assert len({c[1] for c in r.continuation_ids}) == 4
    model = build_eval_model(len(tok))
    fast = Scorer(model, batch_size=4).score(reqs)
    with torch.no_grad():
        naive = score_naive(model, reqs)
        manual = [_manual_loglik(model, reqs[0].context_ids, c) for c in reqs[0].continuation_ids]
        first_only = [_manual_loglik(model, reqs[0].context_ids, c[:1])
                      for c in reqs[0].continuation_ids]
    _assert_same(fast, naive)
    assert fast[0] == pytest.approx(manual, abs=1e-4)
    # The second token matters: scoring only the first would give four equal scores.
    assert max(first_only) - min(first_only) < 1e-6
    assert max(fast[0]) - min(fast[0]) > 1e-4


def test_letters_with_different_heads_get_separate_rows():
    # Continuations whose all-but-last tokens differ cannot share a row: one row per head.
    tok = cached_tokenizer("merged")
    model = build_eval_model(len(tok))
    ctx = tok.encode("以下是中国关于法学的单项选择题 答案：")
    conts = [[5, 6], [5, 7], [8, 9], [10]]
    req = ScoreRequest(ctx, conts, "g")
    scorer = Scorer(model, batch_size=8, min_prefix=1)
    rows = [r for s in scorer.plan([req, ScoreRequest(ctx + [11], conts, "g")]) for r in s.rows]
    assert sorted(sorted(r.letters) for r in rows if r.req == 0) == [[0, 1], [2], [3]]
    fast = scorer.score([req])
    with torch.no_grad():
        manual = [_manual_loglik(model, ctx, c) for c in conts]
    assert fast[0] == pytest.approx(manual, abs=1e-4)


class _LogitsOnly(torch.nn.Module):
    """A plain callable: input_ids -> logits tensor (no cache, no HF outputs)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, input_ids):
        return self.inner(input_ids=input_ids).logits


def test_plain_callable_path(eval_data_dir):
    tok = cached_tokenizer("split")
    model = build_eval_model(len(tok))
    reqs = _requests(tok, eval_data_dir, per_subject=3, shots=2)
    plain = Scorer(_LogitsOnly(model), batch_size=5, max_length=model.config.max_position_embeddings)
    assert not plain.use_cache
    assert not any(s.is_prefix for s in plain.plan(reqs))
    with torch.no_grad():
        naive = score_naive(model, reqs)
    _assert_same(plain.score(reqs), naive)
    with pytest.raises(ValueError, match="use_cache: the KV-cache fast path needs a transformers"):
        Scorer(_LogitsOnly(model), use_cache=True)


def test_batch_size_and_cache_invariance(eval_data_dir):
    tok = cached_tokenizer("merged")
    model = build_eval_model(len(tok))
    reqs = _requests(tok, eval_data_dir, per_subject=5, shots=3)
    ref = Scorer(model, batch_size=1, use_cache=False).score(reqs)
    for bs in (2, 7, 64):
        _assert_same(Scorer(model, batch_size=bs).score(reqs), ref)


def test_cache_path_uses_the_current_transformers_keyword(eval_data_dir):
    """transformers 5.2x renamed the forward's ``past_key_values`` to ``cache`` (the old name
    warns and goes in 5.40): the cached path must pass the model's own keyword."""
    import warnings

    tok = cached_tokenizer("merged")
    model = build_eval_model(len(tok))
    reqs = _requests(tok, eval_data_dir, per_subject=2, shots=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cached = Scorer(model, batch_size=4, use_cache=True).score(reqs)
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    _assert_same(cached, Scorer(model, batch_size=4, use_cache=False).score(reqs))


def test_token_level_shared_prefix_across_a_merging_boundary():
    """The string prefix's tokens are not a token prefix when the next text merges with it."""
    tok = cached_tokenizer("merged")
    model = build_eval_model(len(tok))
    # The head ends in a space: alone it encodes to "▁", but "▁答" / "▁题" are pieces.
    head = "以下是中国关于法学的单项选择题，请选出其中的正确答案。 "
    tails = ["答案：甲乙丙", "答案是：丁", "题目：戊己", "的庚辛"]
    assert any(tok.encode(head + t)[: len(tok.encode(head))] != tok.encode(head) for t in tails), (
        "the tokenizer must merge across the boundary for this test to mean anything"
    )
    reqs = [encode_request(tok, head + t, continuations("lm-eval"), "g") for t in tails]
    scorer = Scorer(model, batch_size=2, min_prefix=1)
    steps = scorer.plan(reqs)
    prefix = steps[0].prefix
    assert steps[0].is_prefix and all(r.context_ids[: len(prefix)] == prefix for r in reqs)
    with torch.no_grad():
        naive = score_naive(model, reqs)
    _assert_same(scorer.run(reqs, steps), naive)


def test_overlong_prompts_are_cut_from_the_left_like_lm_eval(eval_data_dir):
    tok = cached_tokenizer("split")
    model = build_eval_model(len(tok))
    reqs = _requests(tok, eval_data_dir, per_subject=3, shots=1)
    limit = min(len(r.context_ids) for r in reqs) - 5
    fast = Scorer(model, batch_size=4, max_length=limit).score(reqs)
    with torch.no_grad():
        naive = score_naive(model, reqs, max_length=limit)
        r = reqs[0]
        c = r.continuation_ids[1]
        full = (r.context_ids + c)[-(limit + 1):]
        logits = model(torch.tensor([full[:-1]])).logits[0].float()
        manual = float(sum(F.log_softmax(logits[len(full) - 1 - len(c) + j], -1)[t]
                           for j, t in enumerate(c)))
    _assert_same(fast, naive)
    assert fast[0][1] == pytest.approx(manual, abs=1e-4)


def test_encode_request_follows_lm_eval_split():
    tok = cached_tokenizer("merged")
    ctx = "题目：甲乙\n答案： "  # trailing space moves into the continuation
    r = encode_request(tok, ctx, [" A", "B"])
    stripped = ctx.rstrip()
    assert r.context_ids == tok.encode(stripped)
    assert r.continuation_ids[0] == tok.encode(stripped + "  A")[len(tok.encode(stripped)):]
    assert r.continuation_ids[1] == tok.encode(stripped + " B")[len(tok.encode(stripped)):]
    assert r.context_ids[0] == tok.bos_token_id  # default special tokens: BOS once


def test_ties_go_to_the_first_letter():
    from layerfreeze.evaluation.data import Question

    q = Question("law", 0, "0", "q", ("a", "b", "c", "d"), "C")
    assert _record("ceval", q, [-2.0, -1.0, -1.0, -3.0])["pred"] == "B"
    assert _record("ceval", q, [-1.0, -1.0, -1.0, -1.0])["pred"] == "A"


def test_dummy_forwards_pad_the_call_count(eval_data_dir):
    tok = cached_tokenizer("merged")
    model = build_eval_model(len(tok))
    reqs = _requests(tok, eval_data_dir, per_subject=2, shots=1)
    calls = []
    h = model.register_forward_hook(lambda *a: calls.append(1))
    scorer = Scorer(model, batch_size=2)
    steps = scorer.plan(reqs)
    scorer.run(reqs, steps, pad_to=len(steps) + 3)
    h.remove()
    assert len(calls) == len(steps) + 3
    with pytest.raises(ValueError, match="pad_to: 1 is fewer than"):
        scorer.run(reqs, steps, pad_to=1)
