"""Prompt strings for C-Eval and CMMLU: lm-evaluation-harness 0.4.x (default) and official formats.

``lm-eval`` reproduces the tasks ``ceval-valid_<subject>`` and ``cmmlu_<subject>`` of
lm-evaluation-harness 0.4.x (read from ``lm_eval/tasks/{ceval,cmmlu}`` and
``ConfigurableTask.fewshot_context``)::

    context = description + sum(Q(dev_i) + " " + letter_i + "\\n\\n" for the first k dev rows) + Q(doc)
    Q(doc)  = question.strip() + "\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案："
    continuations " A", " B", " C", " D" (target delimiter " ")

with description ``以下是中国关于{科目}的单项选择题，请选出其中的正确答案。\\n\\n`` (C-Eval) or
``以下是关于{科目}的单项选择题，请直接给出正确答案的选项。\\n\\n`` (CMMLU). Only the question is
stripped; options go in verbatim.

``official`` is the answer-only format of the benchmarks' own evaluation code: C-Eval header
``以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\\n\\n`` with items
``{q}\\nA. …\\nD. {D}\\n答案：{ans}\\n\\n``; CMMLU the lm-eval header with items
``题目：{q}\\nA. …\\nD. {D}\\n答案是：{ans}\\n\\n``; continuations are the bare letters.
Scores are not comparable across formats.
"""

from __future__ import annotations

from layerfreeze.evaluation.data import LETTERS, Question, Subject

__all__ = ["PROMPT_FORMATS", "continuations", "format_question", "build_prefix", "build_context"]

PROMPT_FORMATS = ("lm-eval", "official")


def _check_format(fmt: str) -> None:
    if fmt not in PROMPT_FORMATS:
        raise ValueError(f"prompt: unknown prompt format, got {fmt!r}. Use one of {PROMPT_FORMATS}.")


def continuations(fmt: str) -> tuple[str, ...]:
    """The four scored continuation strings: ``" A"`` … for lm-eval, ``"A"`` … for official."""
    _check_format(fmt)
    return tuple((" " + x) if fmt == "lm-eval" else x for x in LETTERS)


def header(benchmark: str, subject: Subject, fmt: str) -> str:
    """The subject description that opens every prompt."""
    _check_format(fmt)
    if benchmark == "ceval":
        exam = "考试" if fmt == "official" else ""
        return f"以下是中国关于{subject.name_zh}{exam}的单项选择题，请选出其中的正确答案。\n\n"
    return f"以下是关于{subject.name_zh}的单项选择题，请直接给出正确答案的选项。\n\n"


def format_question(benchmark: str, q: Question, fmt: str, with_answer: bool = False) -> str:
    """One question block; with ``with_answer`` the answer and the ``\\n\\n`` separator follow."""
    _check_format(fmt)
    options = "".join(
        f"\n{letter}. {text}" for letter, text in zip(LETTERS, q.choices, strict=True)
    )
    if fmt == "lm-eval":
        text = f"{q.question.strip()}{options}\n答案："
        sep = " "
    elif benchmark == "ceval":
        text, sep = f"{q.question}{options}\n答案：", ""
    else:
        text, sep = f"题目：{q.question}{options}\n答案是：", ""
    if with_answer:
        if q.answer is None:
            raise ValueError(
                f"{q.subject} row {q.index}: a few-shot example needs an answer, got none."
            )
        text += f"{sep}{q.answer}\n\n"
    return text


def build_prefix(benchmark: str, subject: Subject, shots: int, fmt: str) -> str:
    """Header plus the first ``shots`` dev examples in file order (lm-eval ``first_n``).

    Raises:
        ValueError: ``shots`` is negative or larger than the subject's dev set.
    """
    if shots < 0 or shots > len(subject.dev):
        raise ValueError(
            f"shots: {benchmark} subject {subject.name!r} has {len(subject.dev)} dev examples, "
            f"got shots={shots}. Use 0-{len(subject.dev)}."
        )
    return header(benchmark, subject, fmt) + "".join(
        format_question(benchmark, d, fmt, with_answer=True) for d in subject.dev[:shots]
    )


def build_context(benchmark: str, subject: Subject, q: Question, shots: int, fmt: str) -> str:
    """The full prompt (without continuation) for one question."""
    return build_prefix(benchmark, subject, shots, fmt) + format_question(benchmark, q, fmt)
