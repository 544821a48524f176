"""C-Eval / CMMLU evaluation: data, prompts, fast log-likelihood scorer, runner, training callback.

Public API::

    from layerfreeze.evaluation import load_benchmark, evaluate, EvalConfig, EvalCallback
    bench = load_benchmark("ceval", data_dir, split="val")
    result = evaluate(model, tokenizer, bench, shots=5)      # result["overall"]["acc_macro"]

Imports are lazy so that ``layerfreeze.config`` can import :class:`EvalConfig` without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from layerfreeze.evaluation.config import EvalConfig

_LAZY = {
    "load_benchmark": "layerfreeze.evaluation.data",
    "Benchmark": "layerfreeze.evaluation.data",
    "Subject": "layerfreeze.evaluation.data",
    "Question": "layerfreeze.evaluation.data",
    "build_context": "layerfreeze.evaluation.prompts",
    "Scorer": "layerfreeze.evaluation.scoring",
    "ScoreRequest": "layerfreeze.evaluation.scoring",
    "encode_request": "layerfreeze.evaluation.scoring",
    "score_naive": "layerfreeze.evaluation.scoring",
    "evaluate": "layerfreeze.evaluation.runner",
    "EvalCallback": "layerfreeze.evaluation.callback",
    "summarize": "layerfreeze.evaluation.report",
    "submission_json": "layerfreeze.evaluation.report",
}

__all__ = ["EvalConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'layerfreeze.evaluation' has no attribute {name!r}")
