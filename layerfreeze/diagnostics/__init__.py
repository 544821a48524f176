"""Layer diagnostics: angular distances between layer inputs, tracing, pruning and hybrid models.

Engine-neutral: every measure finds the decoder blocks through
:func:`layerfreeze.models.discover_layout`, like the policies do.

Public API (imported lazily, so ``import layerfreeze.diagnostics`` costs nothing)::

    from layerfreeze.diagnostics import build_text_probe, run_trace, recommend_plan, SensitivityHooks
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "angular_distance": "layerfreeze.diagnostics.angular",
    "trace_angular": "layerfreeze.diagnostics.angular",
    "ProbeBatch": "layerfreeze.diagnostics.probe",
    "ProbeSet": "layerfreeze.diagnostics.probe",
    "build_text_probe": "layerfreeze.diagnostics.probe",
    "build_choice_probe": "layerfreeze.diagnostics.probe",
    "MEASURES": "layerfreeze.diagnostics.trace",
    "TraceSettings": "layerfreeze.diagnostics.trace",
    "run_trace": "layerfreeze.diagnostics.trace",
    "trace_memory": "layerfreeze.diagnostics.trace",
    "layer_stability": "layerfreeze.diagnostics.isolated",
    "matrix_snr": "layerfreeze.diagnostics.snr",
    "scan_checkpoint": "layerfreeze.diagnostics.snr",
    "scan_model": "layerfreeze.diagnostics.snr",
    "layer_scores": "layerfreeze.diagnostics.recommend",
    "write_trace": "layerfreeze.diagnostics.report",
    "summary_table": "layerfreeze.diagnostics.report",
    "Recommendation": "layerfreeze.diagnostics.recommend",
    "recommend_plan": "layerfreeze.diagnostics.recommend",  # the module is ``.recommend``
    "write_recommendation": "layerfreeze.diagnostics.recommend",
    "SensitivityHooks": "layerfreeze.diagnostics.hooks",
    "HOOK_MEASURES": "layerfreeze.diagnostics.hooks",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name == "recommend_plan":
        return importlib.import_module(_LAZY[name]).recommend
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'layerfreeze.diagnostics' has no attribute {name!r}")
