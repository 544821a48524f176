"""Accuracy aggregation (subject, category, overall micro/macro), summaries and output files.

Micro accuracy averages over questions; macro averages the per-subject accuracies. The
published C-Eval and CMMLU leaderboards report **macro** (the mean over subjects, and per
category the mean over its subjects); lm-evaluation-harness's group score is micro (weighted by
question count). Both are reported.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from layerfreeze.evaluation.data import Benchmark
from layerfreeze.utils.io import atomic_write_json, atomic_write_text

__all__ = [
    "LEADERBOARD_METRIC",
    "summarize",
    "format_summary",
    "submission_json",
    "write_predictions",
    "flat_metrics",
]

LEADERBOARD_METRIC = "acc_macro"
_CATEGORY_ORDER = ("STEM", "Social Science", "Humanities", "Other", "China specific")


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(
    benchmark: Benchmark, records: list[dict[str, Any]], shots: int, prompt: str
) -> dict[str, Any]:
    """Result dict from per-question records (``subject``, ``pred``, ``gold``).

    Accuracies are None where the split has no answers (C-Eval test).

    Returns:
        ``{"benchmark", "split", "prompt", "shots", "num_questions", "subjects": {name: {...}},
        "categories": {name: {...}}, "overall": {"acc_micro", "acc_macro", ...},
        "leaderboard_metric": "acc_macro"}``.
    """
    per: dict[str, list[dict]] = {s.name: [] for s in benchmark.subjects}
    for r in records:
        per[r["subject"]].append(r)
    has_gold = all(r["gold"] is not None for r in records) and bool(records)
    subjects: dict[str, dict[str, Any]] = {}
    for s in benchmark.subjects:
        rs = per[s.name]
        correct = sum(r["pred"] == r["gold"] for r in rs) if has_gold else None
        subjects[s.name] = {
            "name_zh": s.name_zh,
            "categories": list(s.categories),
            "num_questions": len(rs),
            "correct": correct,
            "acc": (correct / len(rs)) if has_gold and rs else None,
        }
    scored = {k: v for k, v in subjects.items() if v["num_questions"]}
    categories: dict[str, dict[str, Any]] = {}
    found = {c for s in benchmark.subjects for c in s.categories}
    names = [c for c in _CATEGORY_ORDER if c in found] + sorted(found - set(_CATEGORY_ORDER))
    for c in names:
        members = [k for k, v in scored.items() if c in v["categories"]]
        n = sum(scored[k]["num_questions"] for k in members)
        categories[c] = {
            "subjects": members,
            "num_questions": n,
            "acc_micro": (sum(scored[k]["correct"] for k in members) / n) if has_gold and n else None,
            "acc_macro": _mean([scored[k]["acc"] for k in members]) if has_gold else None,
        }
    n_all = sum(v["num_questions"] for v in scored.values())
    overall = {
        "num_subjects": len(scored),
        "num_questions": n_all,
        "acc_micro": (sum(v["correct"] for v in scored.values()) / n_all)
        if has_gold and n_all else None,
        "acc_macro": _mean([v["acc"] for v in scored.values()]) if has_gold else None,
    }
    return {
        "benchmark": benchmark.name,
        "split": benchmark.split,
        "prompt": prompt,
        "shots": shots,
        "source": benchmark.source,
        "num_questions": n_all,
        "subjects": subjects,
        "categories": categories,
        "overall": overall,
        "leaderboard_metric": LEADERBOARD_METRIC,
        "note": (
            "acc_macro (mean over subjects) matches the C-Eval/CMMLU leaderboards; acc_micro "
            "(over questions) matches lm-evaluation-harness group scores."
        ),
    }


def _pct(x: float | None) -> str:
    return "   -  " if x is None else f"{100 * x:6.2f}"


def format_summary(result: dict[str, Any], per_subject: bool = False) -> str:
    """A human-readable table: categories and overall (and subjects when asked)."""
    lines = [
        f"{result['benchmark']} {result['split']} | prompt {result['prompt']} | "
        f"{result['shots']}-shot | {result['num_questions']} questions",
        f"{'':28s} {'macro':>6s} {'micro':>6s} {'n':>6s}",
    ]
    if per_subject:
        for name, s in result["subjects"].items():
            lines.append(f"  {name[:26]:26s} {_pct(s['acc'])} {'':6s} {s['num_questions']:6d}")
    for name, c in result["categories"].items():
        lines.append(
            f"{name[:28]:28s} {_pct(c['acc_macro'])} {_pct(c['acc_micro'])} {c['num_questions']:6d}"
        )
    o = result["overall"]
    lines.append(
        f"{'overall':28s} {_pct(o['acc_macro'])} {_pct(o['acc_micro'])} {o['num_questions']:6d}"
    )
    lines.append("macro = mean over subjects (leaderboard); micro = over questions (lm-eval).")
    return "\n".join(lines)


def submission_json(records: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """The official C-Eval submission mapping: ``{subject: {id: letter}}`` in file order."""
    out: dict[str, dict[str, str]] = {}
    for r in sorted(records, key=lambda r: (r["subject"], r["index"])):
        out.setdefault(r["subject"], {})[str(r["id"])] = r["pred"]
    return out


def write_predictions(path: str | Path, records: list[dict[str, Any]]) -> None:
    """One JSON object per question (atomic write)."""
    atomic_write_text(
        path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    )


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    """The result JSON (atomic write)."""
    atomic_write_json(path, result)


def flat_metrics(result: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """``{"eval/ceval/acc_macro": …, "eval/ceval/acc_micro": …, "eval/ceval/STEM": …}``.

    Category values are macro accuracies (the leaderboard convention). Only numbers.
    """
    b = result["benchmark"]
    out: dict[str, float] = {}
    for key in ("acc_macro", "acc_micro"):
        if result["overall"][key] is not None:
            out[f"{prefix}/{b}/{key}"] = float(result["overall"][key])
    for name, c in result["categories"].items():
        if c["acc_macro"] is not None:
            out[f"{prefix}/{b}/{name.replace(' ', '_')}"] = float(c["acc_macro"])
    out[f"{prefix}/{b}/num_questions"] = float(result["num_questions"])
    return out
