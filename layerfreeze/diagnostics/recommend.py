"""Plans from evidence: a trace's numbers -> a layer plan within a trainable-parameter budget.

Run::

    from layerfreeze.diagnostics.recommend import recommend, write_recommendation
    rec = recommend(trace_result, model, budget=0.25, family="freeze")
    print(rec.plan, rec.rationale)
    write_recommendation(rec, "out/")     # plan.yaml (layerfreeze plan --plan / train plan.spec)

The rule (docs/diagnostics.md, "Recommendation"), deterministic for fixed inputs:

1. **Boundary** ``b``: the first layer from which the task is already done, from the logit
   lens: the *decodable* layer on multiple-choice probes, else the layer where the lens loss
   has *converged* on text probes; without lens evidence ``L // 2`` (freeze) or
   ``round(0.75 L)`` (hlpt, the HLPT split); clamped to ``1 .. L``.
2. ``freeze``: train the shallow block ``0 .. k-1`` in full, freeze the rest (embeddings, final
   norm and head frozen), ``k = min(b, k_budget)`` where ``k_budget`` is the largest ``k``
   whose layers fit in ``budget * total parameters``.
3. ``hlpt``: gated LoRA on the FFN of layers ``0 .. b-1`` and gated prefix (the paper form, as
   the ``hlpt`` preset) on ``b .. L-1``; the largest LoRA rank in 64, 32, ..., 1
   (``alpha = r``) and then the most prefix tokens in 16, 8, 4, 2, 1 that fit the budget.

Budgets count trainable parameters (adapters included, as ``apply_plan`` reports them) against
the base model's parameter count, on a ``meta``-device copy of the architecture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerfreeze.plan import LayerPlan

__all__ = ["FAMILIES", "Recommendation", "recommend", "write_recommendation"]

FAMILIES = ("freeze", "hlpt")
_RANKS = (64, 32, 16, 8, 4, 2, 1)
_TOKENS = (16, 8, 4, 2, 1)


@dataclass
class Recommendation:
    """A recommended plan and why.

    Attributes:
        family: ``freeze`` or ``hlpt``.
        budget: the trainable-parameter fraction asked for.
        plan: the :class:`~layerfreeze.plan.LayerPlan`.
        boundary: layer ``b`` of the rule and ``boundary_source`` where it came from.
        trainable_params: what ``apply_plan`` makes trainable.
        total_params: the base model's parameters.
        rationale: short lines tied to the trace's numbers.
    """

    family: str
    budget: float
    plan: LayerPlan
    boundary: int
    boundary_source: str
    trainable_params: int
    total_params: int
    rationale: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the plan as its dict and its compact string)."""
        return {
            "family": self.family,
            "budget": self.budget,
            "boundary": self.boundary,
            "boundary_source": self.boundary_source,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "trainable_fraction": self.trainable_params / self.total_params,
            "plan": self.plan.to_dict(),
            "plan_compact": str(self.plan),
            "train_override": f"plan.spec={str(self.plan)}",
            "rationale": self.rationale,
        }


def _meta_model(model_or_config: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM, PretrainedConfig

    cfg = (
        model_or_config if isinstance(model_or_config, PretrainedConfig) else model_or_config.config
    )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def _count(model_or_config: Any, plan: LayerPlan) -> int:
    import logging

    from layerfreeze.apply import apply_plan

    log = logging.getLogger("layerfreeze.apply")
    level = log.level
    log.setLevel(logging.WARNING)  # candidate plans on a meta copy: not worth a log line each
    try:
        return apply_plan(_meta_model(model_or_config), plan).summary().trainable_params
    finally:
        log.setLevel(level)


def _mean(values: list[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def _boundary(trace: dict[str, Any], n: int, family: str) -> tuple[int, str]:
    lens = trace.get("logit_lens", {})
    if lens.get("decodable_layer") is not None:
        b, acc = lens["decodable_layer"], lens["accuracy"]
        src = (
            f"answer decodable from layer {b} (lens accuracy {acc[b]:.3f} there, "
            f"{acc[-1]:.3f} at the last layer)"
        )
    elif lens.get("converged_layer") is not None:
        b, loss = lens["converged_layer"], lens["loss"]
        src = (
            f"lens loss converged from layer {b} ({loss[b]:.3f} there, {loss[-1]:.3f} at the "
            "last layer)"
        )
    else:
        b = n // 2 if family == "freeze" else math.floor(0.75 * n + 0.5)
        why = (
            "the logit lens did not run (add the logit_lens measure)"
            if not lens
            else "the logit lens shows no decodable or converged layer"
        )
        src = f"{why}; default split at layer {b}"
    return min(max(int(b), 1), n), src


def _span(rows: list[dict[str, Any]], lo: int, hi: int) -> str:
    """Mean of the headline numbers over layers ``lo .. hi - 1`` as one phrase."""
    part = rows[lo:hi]
    bits = []
    for key, label in (
        ("angular_next", "d(l,1)"),
        ("skip", "skip sensitivity"),
        ("grad_norm", "grad norm"),
        ("weight_change", "weight change"),
        ("drift", "drift"),
    ):
        vals = [r[key] for r in part if key in r]
        if vals:
            bits.append(f"{label} {_mean(vals):.4g}")
    return "mean " + ", ".join(bits) if bits else "no per-layer measures"


def _layers(lo: int, hi: int) -> str:
    return f"layer {lo}" if hi - lo == 1 else f"layers {lo}-{hi - 1}"


def recommend(
    trace: dict[str, Any], model_or_config: Any, budget: float, family: str
) -> Recommendation:
    """Turn a trace into a plan for ``budget`` (fraction of parameters trainable).

    Args:
        trace: the result of :func:`~layerfreeze.diagnostics.trace.run_trace` (or its JSON).
        model_or_config: the traced model or its ``transformers`` config (counted on ``meta``).
        budget: trainable-parameter fraction, ``0 < budget <= 1``.
        family: ``freeze`` or ``hlpt``.

    Returns:
        The :class:`Recommendation`.

    Raises:
        ValueError: bad budget or family, a trace of another layer count, or a budget too small
            for any plan of the family (the message gives the smallest that fits).
    """
    if family not in FAMILIES:
        raise ValueError(f"--family: expected one of {', '.join(FAMILIES)}, got {family!r}.")
    if not (isinstance(budget, (int, float)) and 0 < budget <= 1):
        raise ValueError(f"--budget: must be a fraction in (0, 1], got {budget!r}.")
    meta = _meta_model(model_or_config)
    from layerfreeze.models import discover_layout

    layout = discover_layout(meta)
    n = layout.num_layers
    rows = trace["layers"]
    if len(rows) != n:
        raise ValueError(f"trace: has {len(rows)} layers but the model has {n}; trace this model.")
    total = sum(p.numel() for p in {id(p): p for p in meta.parameters()}.values())
    limit = budget * total
    b, source = _boundary(trace, n, family)
    if family == "freeze":
        per_layer = [sum(p.numel() for p in info.module.parameters()) for info in layout.layers]
        k_budget, acc = 0, 0
        for size in per_layer:
            if acc + size > limit:
                break
            acc += size
            k_budget += 1
        if k_budget == 0:
            raise ValueError(
                f"--budget: {budget:g} of {total:,} parameters ({int(limit):,}) is less than layer "
                f"0 ({per_layer[0]:,}); use at least {per_layer[0] / total:.4f} or --family hlpt."
            )
        k = min(b, k_budget)
        plan = LayerPlan.parse(
            {"name": "recommended_freeze", "rules": [{"layers": f"0-{k - 1}", "policy": "full"}]}
        )
        why = [
            f"{_layers(0, k)}: train in full ({_span(rows, 0, k)}).",
        ]
        if k < n:
            why.append(f"{_layers(k, n)}: freeze ({_span(rows, k, n)}).")
        why.append(f"boundary: {source}.")
        bind = "the boundary" if k == b else f"the budget ({k_budget} layers fit)"
        why.append(f"block size {k} is set by {bind}; embeddings, final norm and LM head frozen.")
    else:

        def build(r: int, t: int) -> LayerPlan:
            rules = [
                {
                    "layers": f"0-{b - 1}",
                    "policy": "lora",
                    "r": r,
                    "alpha": float(r),
                    "target": "mlp",
                    "gated": True,
                }
            ]
            if b < n:
                rules.append(  # HLPT's prefix: the paper form, as the hlpt preset (#17)
                    {"layers": f"{b}-{n - 1}", "policy": "prefix", "tokens": t, "gated": True,
                     "form": "paper"}
                )
            return LayerPlan.parse({"name": "recommended_hlpt", "rules": rules})

        # Trainable count is affine in r and in tokens: three counts give every candidate.
        c11, c21, c12 = (
            _count(meta.config, build(1, 1)),
            _count(meta.config, build(2, 1)),
            _count(meta.config, build(1, 2)),
        )
        per_r, per_t = c21 - c11, c12 - c11
        base = c11 - per_r - per_t
        choice = next(
            ((r, t) for r in _RANKS for t in _TOKENS if base + per_r * r + per_t * t <= limit), None
        )
        if choice is None:
            raise ValueError(
                f"--budget: {budget:g} of {total:,} parameters ({int(limit):,}) is less than the "
                f"smallest hlpt plan (r=1, tokens=1: {c11:,}); use at least {c11 / total:.5f}."
            )
        r, t = choice
        plan = build(r, t)
        why = [f"{_layers(0, b)}: gated LoRA r={r} on the FFN ({_span(rows, 0, b)})."]
        if b < n:
            why.append(f"{_layers(b, n)}: gated prefix, {t} tokens ({_span(rows, b, n)}).")
        why.append(f"boundary: {source}.")
        why.append(f"rank {r} and {t} prefix tokens are the largest that fit the budget.")
    trainable = _count(meta.config, plan)
    assert trainable <= limit, (trainable, limit)
    why.append(
        f"trainable {trainable:,} of {total:,} parameters "
        f"({100 * trainable / total:.2f}%, budget {100 * budget:.2f}%)."
    )
    return Recommendation(family, float(budget), plan, b, source, trainable, total, why)


def write_recommendation(rec: Recommendation, directory: str | Path) -> list[str]:
    """Write ``plan.yaml`` (a plan ``layerfreeze plan --plan`` reads; its dict is a valid
    ``plan.spec``) and ``recommendation.json`` into ``directory``; returns the file names."""
    import yaml

    from layerfreeze.utils.io import atomic_write_json, atomic_write_text

    directory = Path(directory)
    header = "".join(f"# {line}\n" for line in rec.rationale)
    header += (
        f"# use: layerfreeze plan --model MODEL --plan plan.yaml\n"
        f"#      layerfreeze train --config RUN.yaml '{rec.to_dict()['train_override']}'\n"
    )
    atomic_write_text(
        directory / "plan.yaml", header + yaml.safe_dump(rec.plan.to_dict(), sort_keys=False)
    )
    atomic_write_json(directory / "recommendation.json", rec.to_dict())
    return ["plan.yaml", "recommendation.json"]
