"""Golden prompt strings (0-shot and 5-shot, lm-eval and official formats) and lm-eval parity."""

from __future__ import annotations

import pytest

from layerfreeze.evaluation.data import Question, Subject, load_benchmark
from layerfreeze.evaluation.prompts import build_context, continuations
from tests.helpers.eval_fixtures import lm_eval_task


def _q(subject: str, i: int, question: str, choices, answer) -> Question:
    return Question(subject=subject, index=i, id=str(i), question=question,
                    choices=tuple(choices), answer=answer)


def _subject(name: str, name_zh: str) -> Subject:
    dev = [_q(name, i, f"例{i}？", (f"a{i}", f"b{i}", f"c{i}", f"d{i}"), "ABCDA"[i]) for i in range(5)]
    return Subject(name=name, name_zh=name_zh, categories=("Other",), questions=[], dev=dev)


# The question has edge whitespace (lm-eval strips it, official keeps it) and an option has edge
# whitespace and a newline (kept verbatim by both).
DOC = _q("x", 0, "  问题____\n第二行 ", ("甲", " 乙 ", "丙\n丁", "0.50"), "B")
OPTS = "\nA. 甲\nB.  乙 \nC. 丙\n丁\nD. 0.50"


def _shot(i: int, fmt: str, bench: str) -> str:
    opts = f"\nA. a{i}\nB. b{i}\nC. c{i}\nD. d{i}"
    ans = "ABCDA"[i]
    if fmt == "lm-eval":
        return f"例{i}？{opts}\n答案： {ans}\n\n"
    if bench == "ceval":
        return f"例{i}？{opts}\n答案：{ans}\n\n"
    return f"题目：例{i}？{opts}\n答案是：{ans}\n\n"


GOLDEN = {
    ("ceval", "lm-eval"): (
        "以下是中国关于法学的单项选择题，请选出其中的正确答案。\n\n",
        f"问题____\n第二行{OPTS}\n答案：",
    ),
    ("cmmlu", "lm-eval"): (
        "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n",
        f"问题____\n第二行{OPTS}\n答案：",
    ),
    ("ceval", "official"): (
        "以下是中国关于法学考试的单项选择题，请选出其中的正确答案。\n\n",
        f"  问题____\n第二行 {OPTS}\n答案：",
    ),
    ("cmmlu", "official"): (
        "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n",
        f"题目：  问题____\n第二行 {OPTS}\n答案是：",
    ),
}


@pytest.mark.parametrize("bench,fmt", list(GOLDEN))
def test_golden_zero_shot(bench, fmt):
    subject = _subject("law", "法学") if bench == "ceval" else _subject("agronomy", "农学")
    head, body = GOLDEN[bench, fmt]
    assert build_context(bench, subject, DOC, 0, fmt) == head + body


@pytest.mark.parametrize("bench,fmt", list(GOLDEN))
def test_golden_five_shot(bench, fmt):
    subject = _subject("law", "法学") if bench == "ceval" else _subject("agronomy", "农学")
    head, body = GOLDEN[bench, fmt]
    shots = "".join(_shot(i, fmt, bench) for i in range(5))
    assert build_context(bench, subject, DOC, 5, fmt) == head + shots + body


def test_golden_real_question_five_shot(eval_data_dir):
    # A literal expected string for a real C-Eval val question (first row of logic), 1-shot
    # keeps it short; the dev row and the question are spelled out from the files.
    b = load_benchmark("ceval", eval_data_dir, "val", ["logic"])
    s = b.subjects[0]
    d, q = s.dev[0], s.questions[0]
    expected = (
        "以下是中国关于逻辑学的单项选择题，请选出其中的正确答案。\n\n"
        f"{d.question.strip()}\nA. {d.choices[0]}\nB. {d.choices[1]}\nC. {d.choices[2]}\n"
        f"D. {d.choices[3]}\n答案： {d.answer}\n\n"
        f"{q.question.strip()}\nA. {q.choices[0]}\nB. {q.choices[1]}\nC. {q.choices[2]}\n"
        f"D. {q.choices[3]}\n答案："
    )
    assert build_context("ceval", s, q, 1, "lm-eval") == expected


def test_continuations():
    assert continuations("lm-eval") == (" A", " B", " C", " D")
    assert continuations("official") == ("A", "B", "C", "D")
    with pytest.raises(ValueError, match="prompt: unknown prompt format, got 'x'"):
        continuations("x")


def test_too_many_shots_is_an_error():
    s = _subject("law", "法学")
    with pytest.raises(ValueError, match=r"shots: ceval subject 'law' has 5 dev examples, got shots=6"):
        build_context("ceval", s, DOC, 6, "lm-eval")


@pytest.mark.slow  # imports lm-eval (~10 s)
@pytest.mark.parametrize("bench,subject", [("ceval", "high_school_politics"),
                                           ("cmmlu", "elementary_mathematics")])
def test_lm_eval_parity_every_question(eval_data_dir, tmp_path, bench, subject):
    """Our contexts and continuations equal the installed lm-eval task's, for 0 and 5 shots."""
    task = lm_eval_task(bench, subject, eval_data_dir, tmp_path)
    docs = list(task.validation_docs() if bench == "ceval" else task.test_docs())
    b = load_benchmark(bench, eval_data_dir, None, [subject])
    s = b.subjects[0]
    assert len(docs) == len(s.questions)
    for doc, q in zip(docs, s.questions, strict=True):
        for k in (0, 5):
            ctx = task.fewshot_context(doc, k)
            assert build_context(bench, s, q, k, "lm-eval") == ctx
        reqs = task.construct_requests(doc=doc, ctx=ctx, metadata=(subject, 0, 5))
        assert tuple(r.arguments[1] for r in reqs) == continuations("lm-eval")
