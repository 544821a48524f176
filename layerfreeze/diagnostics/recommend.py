"""Plans from evidence: a trace's numbers -> a per-layer score -> a layer plan within a budget.

Run::

    from layerfreeze.diagnostics.recommend import recommend, write_recommendation
    rec = recommend(trace_result, model, budget=0.25, family="freeze")
    print(rec.plan, rec.rationale)
    write_recommendation(rec, "out/")     # plan.yaml (layerfreeze plan --plan / train plan.spec)

The rule (docs/diagnostics.md, "Recommendation"), deterministic for fixed inputs:

1. **Score** per layer ``i`` (:func:`layer_scores`), a weighted mean of three components in
   ``[0, 1]``, high = keep the layer as it is (freeze / only steer it), low = train it:

   * ``lens`` (task execution, LayerTracer's task particle): 1 for the layers from the first
     layer whose output carries the answer (the *decodable* layer on multiple-choice probes,
     else the layer where the lens loss has *converged* on text probes), 0 below;
   * ``sensitivity``: the mean of skip and largest-scale noise sensitivity, each made relative;
   * ``stability`` (fragility): the per-layer stability in isolation (``layer_stability``, the
     relative change of the layer's own output), made relative;
   * ``snr`` (data-free, only when the trace has the ``snr`` measure): ``1 - relative(SNR)``
     of the layer's weight matrices (:mod:`layerfreeze.diagnostics.snr`); Spectrum trains
     high-SNR layers, so high SNR lowers the keep score. Default weight
     :data:`SNR_DEFAULT_WEIGHT` (0.25) beside the three above; alone it is the whole score;

   relative: clipped at 0, divided by twice the median over the layers and clipped at 1, so a
   typical layer has 1/2 and one at least twice the typical value has 1.

   ``score_i = sum_c w_c X_c,i / sum_c w_c`` over the components the trace has
   (:data:`DEFAULT_WEIGHTS`: lens 0.4, sensitivity 0.3, stability 0.3).
2. **Boundary** ``b``: the cut ``1 <= b <= L`` minimising ``sum_{i<b} score_i +
   sum_{i>=b} (1 - score_i)`` (the score of the layers it trains plus the train-score of the
   layers it keeps; ties: the smallest ``b``). Each layer votes: score above 1/2 keep, below
   train. Without any component: ``L // 2`` (freeze) or ``round(0.75 L)`` (hlpt).
3. ``freeze``: train the shallow block ``0 .. k-1`` in full, freeze the rest (embeddings, final
   norm and head frozen), ``k = min(b, k_budget)`` where ``k_budget`` is the largest ``k``
   whose layers fit in ``budget * total parameters``.
4. ``hlpt``: gated LoRA on the FFN of layers ``0 .. b-1`` and gated prefix (the paper form, as
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

__all__ = [
    "COMPONENTS",
    "DEFAULT_WEIGHTS",
    "SNR_DEFAULT_WEIGHT",
    "default_weights",
    "FAMILIES",
    "Recommendation",
    "layer_scores",
    "parse_weights",
    "recommend",
    "score_boundary",
    "write_recommendation",
]

FAMILIES = ("freeze", "hlpt")
#: Score components and their default weights. The lens (where the task is executed) leads:
#: it is the evidence behind "freeze deep, train shallow", and with a typical sensitivity and
#: stability (1/2 each) a layer votes as the lens says (0.4 + 0.3 = 0.7 keep, 0.3 train).
#: Sensitivity and stability together outweigh it, so they can overturn it for one layer: a
#: deep layer that is neither sensitive nor fragile (``sens + stab < 1/3``: a near-identity) is
#: trained, a shallow layer that is both (``sens + stab > 5/3``) is kept.
DEFAULT_WEIGHTS: dict[str, float] = {"lens": 0.4, "sensitivity": 0.3, "stability": 0.3}
#: Weight of the data-free ``snr`` component (weight-only SNR, :mod:`.snr`) when the trace has
#: it and no weights are given: one quarter of the probe-based total (1), so the probe evidence
#: (what the model does on the task's text) leads and the weight spectrum breaks near-ties.
#: Alone (a trace with only ``snr``) it is the whole score after renormalisation.
SNR_DEFAULT_WEIGHT = 0.25
COMPONENTS = (*DEFAULT_WEIGHTS, "snr")
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
        score: :func:`layer_scores` of the trace (weights, components, per-layer score).
    """

    family: str
    budget: float
    plan: LayerPlan
    boundary: int
    boundary_source: str
    trainable_params: int
    total_params: int
    rationale: list[str] = field(default_factory=list)
    score: dict[str, Any] = field(default_factory=dict)

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
            "score": self.score,
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


def parse_weights(text: str | dict[str, float] | None) -> dict[str, float]:
    """Score weights from ``"lens=0.4,sensitivity=0.3,stability=0.3"`` (or a dict).

    Components not named get weight 0 (``snr`` appears only when named); None gives
    :data:`DEFAULT_WEIGHTS`.

    Raises:
        ValueError: an unknown component, a value that is not a finite number >= 0, or
            weights that are all 0.
    """
    if text is None:
        return dict(DEFAULT_WEIGHTS)
    valid = ", ".join(COMPONENTS)
    if isinstance(text, dict):
        items = list(text.items())
    else:
        items = []
        for part in (p.strip() for p in str(text).split(",")):
            if not part:
                continue
            key, eq, value = part.partition("=")
            if not eq:
                raise ValueError(
                    f"--score-weights: expected name=value pairs such as lens=0.4, got {part!r}."
                )
            items.append((key.strip(), value.strip()))
    out = dict.fromkeys(DEFAULT_WEIGHTS, 0.0)
    for key, value in items:
        if key not in COMPONENTS:
            raise ValueError(f"--score-weights: unknown component {key!r}. Valid: {valid}.")
        try:
            w = float(value)
        except (TypeError, ValueError):
            w = math.nan
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"--score-weights: {key} must be a finite number >= 0, got {value!r}.")
        out[key] = w
    if sum(out.values()) <= 0:
        raise ValueError(f"--score-weights: every weight is 0, got {text!r}. Give one > 0.")
    return out


def default_weights(trace: dict[str, Any]) -> dict[str, float]:
    """:data:`DEFAULT_WEIGHTS`, plus ``snr`` at :data:`SNR_DEFAULT_WEIGHT` when the trace has
    the weight-only SNR."""
    weights = dict(DEFAULT_WEIGHTS)
    if trace.get("snr"):
        weights["snr"] = SNR_DEFAULT_WEIGHT
    return weights


def _relative(values: list[float]) -> list[float]:
    """Clip at 0, divide by twice the median over the layers, clip at 1: a typical layer
    gets 1/2, a layer twice as large as the typical one or more gets 1. When the median is 0
    the mean stands in; all 0 when nothing is positive."""
    import statistics

    vals = [max(float(v), 0.0) if v is not None and not math.isnan(v) else 0.0 for v in values]
    ref = statistics.median(vals) if vals else 0.0
    if ref <= 0:
        ref = sum(vals) / len(vals) if vals else 0.0
    return [min(v / (2 * ref), 1.0) for v in vals] if ref > 0 else [0.0] * len(vals)


def _task_layer(trace: dict[str, Any]) -> tuple[int | None, str]:
    lens = trace.get("logit_lens", {})
    if lens.get("decodable_layer") is not None:
        b, acc = lens["decodable_layer"], lens["accuracy"]
        return b, (
            f"answer decodable from layer {b} (lens accuracy {acc[b]:.3f} there, "
            f"{acc[-1]:.3f} at the last layer)"
        )
    if lens.get("converged_layer") is not None:
        b, loss = lens["converged_layer"], lens["loss"]
        return b, (
            f"lens loss converged from layer {b} ({loss[b]:.3f} there, {loss[-1]:.3f} at the "
            "last layer)"
        )
    why = (
        "the logit lens did not run (add the logit_lens measure)"
        if not lens
        else "the logit lens shows no decodable or converged layer"
    )
    return None, why


def layer_scores(
    trace: dict[str, Any], n: int, weights: dict[str, float] | None = None
) -> dict[str, Any]:
    """The per-layer keep score of a trace (module docstring, step 1).

    Args:
        trace: a :func:`~layerfreeze.diagnostics.trace.run_trace` result (or its JSON).
        n: the model's layer count.
        weights: component weights (default :func:`default_weights` of the trace).

    Returns:
        ``weights`` (as given), ``weights_used`` (the components the trace has, renormalised to
        sum 1), ``components`` (per layer, or None when absent), ``score`` (per layer, None
        when no component is present), ``lens_source`` (where the lens step came from),
        ``unused`` (weighted components the trace lacks, each with the reason).
    """
    weights = default_weights(trace) if weights is None else parse_weights(weights)
    rows = trace.get("layers", [])
    comps: dict[str, list[float] | None] = dict.fromkeys(COMPONENTS)
    task, lens_source = _task_layer(trace)
    if task is not None:
        comps["lens"] = [1.0 if i >= task else 0.0 for i in range(n)]
    sens_parts = []
    if rows and all("skip" in r for r in rows):
        sens_parts.append(_relative([r["skip"] for r in rows]))
    noise = trace.get("sensitivity", {}).get("noise") or {}
    if noise:
        largest = max(noise, key=float)
        sens_parts.append(_relative(noise[largest]))
    if sens_parts:
        comps["sensitivity"] = [sum(p[i] for p in sens_parts) / len(sens_parts) for i in range(n)]
    iso = trace.get("layer_stability", {})
    if iso.get("output_change"):
        comps["stability"] = _relative(iso["output_change"])
    snr = trace.get("snr", {}).get("per_layer")
    if snr:  # Spectrum trains high-SNR layers: high SNR = low keep score
        comps["snr"] = [1.0 - x for x in _relative(snr)]
    present = {c: w for c, w in weights.items() if w > 0 and comps[c] is not None}
    need = {
        "lens": (
            "the logit lens shows no decodable or converged layer"
            if trace.get("logit_lens")
            else "the trace has no logit_lens"
        ),
        "sensitivity": "the trace has no skip or noise",
        "stability": "the trace has no layer_stability",
        "snr": "the trace has no snr",
    }
    unused = {c: need[c] for c, w in weights.items() if w > 0 and comps[c] is None}
    total = sum(present.values())
    used = {c: w / total for c, w in present.items()} if total > 0 else {}
    score = [sum(w * comps[c][i] for c, w in used.items()) for i in range(n)] if used else None
    return {
        "weights": weights,
        "weights_used": used,
        "components": comps,
        "score": score,
        "lens_source": lens_source,
        "unused": unused,
        "rule": "score_i = sum_c w_c X_c,i / sum_c w_c; b minimises "
        "sum_{i<b} score_i + sum_{i>=b} (1 - score_i), 1 <= b <= L (ties: smallest b)",
    }


def score_boundary(score: list[float]) -> int:
    """The cut ``b`` in ``1 .. L`` minimising ``sum_{i<b} s_i + sum_{i>=b} (1 - s_i)``."""
    n = len(score)
    cost = sum(1.0 - s for s in score)
    best_b, best = 0, math.inf
    for b in range(1, n + 1):
        cost += 2.0 * score[b - 1] - 1.0  # layer b-1 moves from kept to trained
        if cost < best - 1e-12:
            best_b, best = b, cost
    return best_b


def _boundary(
    trace: dict[str, Any], n: int, family: str, weights: dict[str, float] | None
) -> tuple[int, str, dict[str, Any]]:
    scores = layer_scores(trace, n, weights)
    if scores["score"] is None:
        b = n // 2 if family == "freeze" else math.floor(0.75 * n + 0.5)
        src = (
            f"no score component in the trace ({scores['lens_source']}); default split at layer {b}"
        )
        return min(max(int(b), 1), n), src, scores
    b = score_boundary(scores["score"])
    used = ", ".join(f"{c} {w:.2f}" for c, w in scores["weights_used"].items())
    src = f"score cut at layer {b} (weights used: {used}; lens: {scores['lens_source']})"
    return b, src, scores


def _span(rows: list[dict[str, Any]], lo: int, hi: int) -> str:
    """Mean of the headline numbers over layers ``lo .. hi - 1`` as one phrase."""
    part = rows[lo:hi]
    bits = []
    for key, label in (
        ("angular_next", "d(l,1)"),
        ("skip", "skip sensitivity"),
        ("grad_norm", "grad norm"),
        ("layer_stability", "output change alone"),
        ("snr", "weight SNR"),
        ("weight_change", "whole-model weight change"),
        ("drift", "whole-model drift"),
    ):
        vals = [r[key] for r in part if key in r]
        if vals:
            bits.append(f"{label} {_mean(vals):.4g}")
    return "mean " + ", ".join(bits) if bits else "no per-layer measures"


def _layers(lo: int, hi: int) -> str:
    return f"layer {lo}" if hi - lo == 1 else f"layers {lo}-{hi - 1}"


def recommend(
    trace: dict[str, Any],
    model_or_config: Any,
    budget: float,
    family: str,
    weights: dict[str, float] | str | None = None,
) -> Recommendation:
    """Turn a trace into a plan for ``budget`` (fraction of parameters trainable).

    Args:
        trace: the result of :func:`~layerfreeze.diagnostics.trace.run_trace` (or its JSON).
        model_or_config: the traced model or its ``transformers`` config (counted on ``meta``).
        budget: trainable-parameter fraction, ``0 < budget <= 1``.
        family: ``freeze`` or ``hlpt``.
        weights: score weights (:func:`parse_weights`; default :func:`default_weights`).

    Returns:
        The :class:`Recommendation`.

    Raises:
        ValueError: bad budget, family or weights, a trace of another layer count, or a budget
            too small for any plan of the family (the message gives the smallest that fits).
    """
    if family not in FAMILIES:
        raise ValueError(f"--family: expected one of {', '.join(FAMILIES)}, got {family!r}.")
    if not (isinstance(budget, (int, float)) and 0 < budget <= 1):
        raise ValueError(f"--budget: must be a fraction in (0, 1], got {budget!r}.")
    weights = default_weights(trace) if weights is None else parse_weights(weights)
    meta = _meta_model(model_or_config)
    from layerfreeze.models import discover_layout

    layout = discover_layout(meta)
    n = layout.num_layers
    rows = trace["layers"]
    if len(rows) != n:
        raise ValueError(f"trace: has {len(rows)} layers but the model has {n}; trace this model.")
    total = sum(p.numel() for p in {id(p): p for p in meta.parameters()}.values())
    limit = budget * total
    b, source, scores = _boundary(trace, n, family, weights)
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
        why.append(
            f"rank {r} and {t} prefix tokens are the largest that fit the budget."
            if b < n
            else f"rank {r} is the largest that fits the budget; no prefix layer (the cut is at "
            "the top)."
        )
    trainable = _count(meta.config, plan)
    assert trainable <= limit, (trainable, limit)
    why.append(
        f"trainable {trainable:,} of {total:,} parameters "
        f"({100 * trainable / total:.2f}%, budget {100 * budget:.2f}%)."
    )
    if scores["score"] is not None:
        why.append(
            "keep score per layer (high: keep, low: train): "
            + ", ".join(f"{v:.2f}" for v in scores["score"])
            + "."
        )
    for comp, reason in scores["unused"].items():
        why.append(f"{comp} weight {weights[comp]:g} unused: {reason}.")
    return Recommendation(
        family, float(budget), plan, b, source, trainable, total, why, score=scores
    )


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
