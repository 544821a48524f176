"""``run_trace``: every per-layer diagnostic of a model on a probe set, as one JSON-ready dict.

Run::

    from layerfreeze.diagnostics import build_text_probe, run_trace, TraceSettings
    probe = build_text_probe(["corpus.txt"], tokenizer, max_tokens=8192)
    result = run_trace(model, probe, TraceSettings(measures=("angular", "logit_lens")))
    result["layers"][3]["skip"]      # loss increase when layer 3 is skipped

Order of work: one streaming pass (angular distances, consecutive CKA, logit lens), then the
sensitivity passes (skip, noise: one probe pass per layer and scale), the gradient pass (one
backward per sequence), the whole-model stability steps (on a copy) and the per-layer stability
in isolation (one layer at a time, :mod:`layerfreeze.diagnostics.isolated`). The model is left
as it was.

Memory, besides the model and its forward activations (``P = L + 1`` points, ``B`` batch,
``T`` sequence length, ``H`` hidden size, ``V`` vocabulary, ``s`` bytes per model element;
:func:`trace_memory` computes it):

* streaming: ``P*B*T*H*s`` (one batch's layer inputs) + about ``4*P*B*T*H*4`` transient in the
  angular update + ``3*B*T*V*4`` for one point's lens logits; persistent
  ``2*P^2*8`` (angular) + ``((2P-1)*H^2 + P*H)*8`` (CKA, on ``cka_device``) + ``3*P*8`` (lens);
* noise: a copy of one layer's matrices; gradient: one gradient per layer parameter (``s``
  bytes) + float32 sums (4 bytes per layer parameter);
* stability: a float32 copy of the model with its gradients and AdamW moments (16 bytes per
  parameter), plus a float32 reference copy (4 bytes per parameter) for non-float32 models;
* layer_stability: one batch's inputs of one layer (``B*T*H*s``), two float32 outputs of it
  (``2*B*T*H*4``), a copy of one layer's parameters (``s`` bytes each); mode ``steps`` adds
  16 bytes per layer parameter (float32 masters, gradients, AdamW moments) and the backward's
  activations of one batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from layerfreeze.diagnostics import measures as M
from layerfreeze.diagnostics.probe import ProbeSet
from layerfreeze.models import ModelLayout, discover_layout, param_numel

__all__ = [
    "MEASURES",
    "TraceSettings",
    "run_trace",
    "trace_memory",
    "first_stable_layer",
    "check_measures",
    "model_identity",
]

#: Every measure ``--measures`` accepts, in the order they run.
MEASURES: tuple[str, ...] = (
    "angular",
    "cka",
    "logit_lens",
    "skip",
    "noise",
    "gradient",
    "stability",
    "layer_stability",
)
_STREAM = ("angular", "cka", "logit_lens")
_CHANCE = 0.25  # four letters


def check_measures(names: Sequence[str]) -> tuple[str, ...]:
    """Validate measure names; returns them in :data:`MEASURES` order without duplicates.

    Raises:
        ValueError: an unknown name (listing the valid ones) or an empty list.
    """
    from layerfreeze.utils.schema import suggest

    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise ValueError(f"--measures: empty list. Choose from {', '.join(MEASURES)}.")
    for n in names:
        if n not in MEASURES:
            hint = suggest(n, MEASURES)
            hint = hint if "Did you mean" in hint else ""
            raise ValueError(
                f"--measures: unknown measure {n!r}.{hint} Valid: {', '.join(MEASURES)}."
            )
    return tuple(m for m in MEASURES if m in names)


@dataclass
class TraceSettings:
    """What :func:`run_trace` computes and how.

    Attributes:
        measures: subset of :data:`MEASURES`.
        noise_scales: relative weight-noise scales ``s`` (``W + s * rms(W) * N(0, 1)``).
        seed: seed of the noise draws.
        stability_steps: AdamW steps of the stability measure (whole model, and per layer in
            ``layer_stability_mode="steps"``).
        stability_lr: their learning rate.
        layer_stability_mode: how ``layer_stability`` changes each layer alone: ``perturb``
            (relative weight noise of size ``layer_stability_scale``) or ``steps`` (AdamW steps
            on that layer only, the rest frozen).
        layer_stability_scale: relative perturbation size of ``perturb``.
        tolerance: decodability tolerance: accuracy points for choice probes, fraction of the
            embedding-to-final lens-loss drop for text probes (see :func:`first_stable_layer`).
        cka_device: device of the CKA moment matrices (CPU by default: ``(2L+1) H^2`` float64).
    """

    measures: tuple[str, ...] = MEASURES
    noise_scales: tuple[float, ...] = (0.01, 0.05, 0.1)
    seed: int = 0
    stability_steps: int = 4
    stability_lr: float = 1e-4
    layer_stability_mode: str = "perturb"
    layer_stability_scale: float = 0.05
    tolerance: float = 0.05
    cka_device: str = "cpu"

    def __post_init__(self) -> None:
        self.measures = check_measures(list(self.measures))
        self.noise_scales = tuple(float(s) for s in self.noise_scales)
        bad = [s for s in self.noise_scales if not (math.isfinite(s) and s >= 0)]
        if bad or ("noise" in self.measures and not self.noise_scales):
            raise ValueError(
                f"--noise-scales: need one or more finite scales >= 0, got {list(self.noise_scales)}."
            )
        if self.stability_steps < 1:
            raise ValueError(f"--stability-steps: must be >= 1, got {self.stability_steps}.")
        if not (self.stability_lr > 0 and math.isfinite(self.stability_lr)):
            raise ValueError(f"--stability-lr: must be > 0, got {self.stability_lr}.")
        from layerfreeze.diagnostics.isolated import LAYER_STABILITY_MODES

        if self.layer_stability_mode not in LAYER_STABILITY_MODES:
            raise ValueError(
                f"--layer-stability: unknown mode {self.layer_stability_mode!r}; choose "
                f"{' or '.join(LAYER_STABILITY_MODES)}."
            )
        scale = self.layer_stability_scale
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
            raise ValueError(f"--layer-stability-scale: must be finite and >= 0, got {scale}.")
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"--tolerance: must be in [0, 1), got {self.tolerance}.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings."""
        d = asdict(self)
        d["measures"], d["noise_scales"] = list(self.measures), list(self.noise_scales)
        return d


def trace_memory(
    num_layers: int,
    hidden: int,
    batch: int,
    seq: int,
    vocab: int,
    dtype_bytes: int = 4,
    num_params: int = 0,
    layer_params: int = 0,
    measures: Sequence[str] = MEASURES,
    final_norm: bool = True,
    layer_stability_steps: bool = False,
) -> dict[str, int]:
    """Bytes a trace needs on top of the model and its forward activations (see module doc).

    Args:
        num_layers: decoder layers ``L``.
        hidden: hidden size ``H``.
        batch: probe batch size ``B``.
        seq: longest probe sequence ``T``.
        vocab: vocabulary ``V``.
        dtype_bytes: bytes per element of the model dtype.
        num_params: all model parameters (for ``stability``).
        layer_params: parameters of all decoder layers together (for ``gradient`` / ``noise``).
        measures: the measures that run.
        final_norm: the model has a final norm (``P = L + 1``; else ``P = L``).
        layer_stability_steps: ``layer_stability`` trains each layer (mode ``steps``).

    Returns:
        Per component, bytes; ``persistent`` sums the accumulators that live for the whole
        stream (constant in the number of tokens), ``peak`` bounds the largest component set
        alive at once.
    """
    p = num_layers + int(final_norm)
    n = batch * seq
    out: dict[str, int] = {}
    stream = [m for m in measures if m in _STREAM]
    if stream:
        out["recorder"] = p * n * hidden * dtype_bytes
    if "angular" in measures:
        out["angular_sums"] = 2 * p * p * 8
        out["angular_update"] = 4 * p * n * hidden * 4
    if "cka" in measures:
        out["cka_sums"] = ((2 * p - 1) * hidden * hidden + p * hidden) * 8
    if "logit_lens" in measures:
        out["lens_sums"] = 3 * p * 8
        out["lens_logits"] = 3 * n * vocab * 4
    if "noise" in measures:
        out["noise_copy"] = -(-layer_params // max(num_layers, 1)) * dtype_bytes
    if "gradient" in measures:
        out["gradient"] = layer_params * (dtype_bytes + 4)
    if "stability" in measures:
        out["stability"] = num_params * (16 + (4 if dtype_bytes != 4 else 0))
    if "layer_stability" in measures:
        per_layer = -(-layer_params // max(num_layers, 1))
        out["layer_stability"] = n * hidden * (dtype_bytes + 8) + per_layer * dtype_bytes
        if layer_stability_steps:
            out["layer_stability"] += per_layer * 16
    out["persistent"] = sum(out.get(k, 0) for k in ("angular_sums", "cka_sums", "lens_sums"))
    stream_peak = (
        out["persistent"]
        + out.get("recorder", 0)
        + max(out.get("angular_update", 0), out.get("lens_logits", 0))
    )
    out["peak"] = max(
        stream_peak,
        out.get("noise_copy", 0),
        out.get("gradient", 0),
        out.get("stability", 0),
        out.get("layer_stability", 0),
    )
    return out


def first_stable_layer(
    values: Sequence[float], final: float, tolerance: float, higher_is_better: bool
) -> int | None:
    """First index ``i`` such that every ``values[j]`` with ``j >= i`` is within ``tolerance``
    of ``final`` (at least ``final - tolerance`` when higher is better, at most
    ``final + tolerance`` otherwise); None when no value qualifies (NaN never does)."""
    ok = [
        (v >= final - tolerance) if higher_is_better else (v <= final + tolerance) for v in values
    ]
    first = None
    for i in range(len(ok) - 1, -1, -1):
        if not ok[i]:
            break
        first = i
    return first


def model_identity(model: nn.Module, layout: ModelLayout) -> dict[str, Any]:
    """Architecture facts written into ``trace.json``."""
    cfg = getattr(model, "config", None)
    params = list(model.parameters())
    return {
        "model_type": layout.model_type,
        "name_or_path": getattr(cfg, "_name_or_path", None) or None,
        "num_layers": layout.num_layers,
        "hidden_size": layout.hidden_size,
        "vocab_size": getattr(cfg, "vocab_size", None),
        "num_params": sum(param_numel(p) for p in {id(p): p for p in params}.values()),
        "dtype": str(params[0].dtype).replace("torch.", ""),
        "tied_embeddings": layout.tied_embeddings,
        "final_norm": layout.final_norm,
        "lm_head": layout.lm_head,
    }


def _work_units(settings: TraceSettings, nb: int, num_layers: int, num_seq_batches: int) -> int:
    m = settings.measures
    n = 0
    if any(x in m for x in _STREAM):
        n += nb
    if "skip" in m or "noise" in m:
        n += nb  # base loss
    if "skip" in m:
        n += nb * num_layers
    if "noise" in m:
        n += nb * num_layers * len(settings.noise_scales)
    if "gradient" in m:
        n += num_seq_batches
    if "stability" in m:
        n += settings.stability_steps + nb
    if "layer_stability" in m:
        steps = settings.stability_steps if settings.layer_stability_mode == "steps" else 0
        n += num_layers * (nb + steps)
    return n


def run_trace(
    model: nn.Module,
    probe: ProbeSet,
    settings: TraceSettings | None = None,
    layout: ModelLayout | None = None,
    progress: bool = False,
    gather: M.Gather | None = None,
) -> dict[str, Any]:
    """Compute the diagnostics of ``settings.measures`` on ``probe``.

    Args:
        model: a decoder-only causal LM (Hugging Face style: ``input_ids`` /
            ``attention_mask`` in, ``.logits`` out); put in eval mode for the run and restored.
        probe: the probe set (:func:`~layerfreeze.diagnostics.probe.build_text_probe` or
            :func:`~layerfreeze.diagnostics.probe.build_choice_probe`).
        settings: measures and their options (default: all).
        layout: the model's layout (default: :func:`discover_layout`).
        progress: show a tqdm bar on stderr.
        gather: for a model whose parameters are partitioned (DeepSpeed ZeRO-3): the engine's
            ``gathered_parameters(names, modifier_rank)``. Every rank then runs the whole
            probe set in lockstep (the model's forward gathers one layer at a time; the lens
            gathers the final norm and head, noise one layer) and gets the same numbers.
            ``gradient``, ``stability`` and ``layer_stability`` need whole parameters and are
            refused.

    Returns:
        A JSON-ready dict: ``model``, ``probe``, ``settings``, ``memory``, the measures'
        sections (``representation``, ``logit_lens``, ``sensitivity``, ``stability``) and
        ``layers`` (one flat row per layer, what the CSV holds).

    Raises:
        ValueError: an empty probe set, bad settings.
    """
    settings = settings or TraceSettings()
    layout = layout or discover_layout(model)
    if not probe.batches or probe.num_tokens == 0:
        raise ValueError("probe: empty probe set (no tokens). Pass files with text or questions.")
    m = settings.measures
    if M.is_partitioned(model):
        refused = [x for x in ("gradient", "stability", "layer_stability") if x in m]
        if gather is None or refused:
            raise ValueError(
                "measures: the model's parameters are partitioned (ZeRO-3); "
                + (
                    f"{', '.join(refused)} need whole parameters, drop them from --measures."
                    if refused
                    else "pass gather=<engine>.gathered_parameters."
                )
            )
    gather = gather or M.no_gather
    n_layers = layout.num_local_layers
    nb = len(probe.batches)
    bar = None
    tick = M._noop
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=_work_units(settings, nb, n_layers, nb),
            desc="trace",
            unit="pass",
            dynamic_ncols=True,
        )
        tick = bar.update
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    result: dict[str, Any] = {
        "format": "layerfreeze-trace/1",
        "model": model_identity(model, layout),
        "probe": dict(
            probe.identity,
            kind=probe.kind,
            num_sequences=probe.num_sequences,
            num_tokens=probe.num_tokens,
        ),
        "settings": settings.to_dict(),
    }
    seq = max(int(b.input_ids.shape[1]) for b in probe.batches)
    bsz = max(int(b.input_ids.shape[0]) for b in probe.batches)
    layer_params = sum(param_numel(p) for info in layout.layers for p in info.module.parameters())
    ident = result["model"]
    result["memory"] = {
        "formula": "see docs/diagnostics.md#memory",
        "batch": bsz,
        "seq": seq,
        "bytes": trace_memory(
            n_layers,
            layout.hidden_size,
            bsz,
            seq,
            ident["vocab_size"] or 0,
            torch.finfo(next(model.parameters()).dtype).bits // 8,
            ident["num_params"],
            layer_params,
            m,
            layout.final_norm is not None,
            settings.layer_stability_mode == "steps",
        ),
    }
    try:
        if any(x in m for x in _STREAM):
            ts = time.perf_counter()
            stats = M.StreamStats(model, layout, probe.kind, m, settings.cka_device, gather)
            stats.run(probe.batches, tick)
            rep: dict[str, Any] = {}
            if stats.angular is not None:
                rep["angular"] = stats.angular.result().to_dict()
            if stats.cka is not None:
                rep["cka_consecutive"] = stats.cka.result()
            if rep:
                result["representation"] = rep
            if stats.lens is not None:
                result["logit_lens"] = _lens_section(
                    stats.lens.result(), probe.kind, settings.tolerance
                )
            result["memory"]["measured_accumulator_bytes"] = stats.accumulator_bytes()
            timings["stream"] = time.perf_counter() - ts
        sens: dict[str, Any] = {}
        if "skip" in m or "noise" in m:
            ts = time.perf_counter()
            base = M.probe_loss(model, probe, tick)
            sens["base_loss"] = base
            if "skip" in m:
                sens["skip"] = M.skip_sensitivity(model, layout, probe, base, tick)
            if "noise" in m:
                sens["noise"] = M.noise_sensitivity(
                    model, layout, probe, settings.noise_scales, settings.seed, base, tick, gather
                )
            timings["sensitivity"] = time.perf_counter() - ts
        if "gradient" in m:
            ts = time.perf_counter()
            sens.update(M.gradient_scores(model, layout, probe, tick))
            timings["gradient"] = time.perf_counter() - ts
        if sens:
            sens["loss"] = (
                "next-token NLL, token mean"
                if probe.kind == "text"
                else "gold-letter NLL at the answer position, question mean"
            )
            result["sensitivity"] = sens
        if "stability" in m:
            ts = time.perf_counter()
            result["stability"] = {
                "measure": "whole-model drift: every layer trained together on a copy; each "
                "layer's output drift includes the drift of every layer below it",
                **M.stability(
                    model, layout, probe, settings.stability_steps, settings.stability_lr, tick=tick
                ),
            }
            timings["stability"] = time.perf_counter() - ts
        if "layer_stability" in m:
            from layerfreeze.diagnostics.isolated import layer_stability

            ts = time.perf_counter()
            result["layer_stability"] = layer_stability(
                model,
                layout,
                probe,
                settings.layer_stability_mode,
                settings.layer_stability_scale,
                settings.seed,
                settings.stability_steps,
                settings.stability_lr,
                tick,
            )
            timings["layer_stability"] = time.perf_counter() - ts
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    timings["total"] = time.perf_counter() - t0
    result["timings_s"] = timings
    result["layers"] = per_layer_rows(result, n_layers, [i.index for i in layout.layers])
    return result


def _lens_section(lens: dict[str, list[float]], kind: str, tolerance: float) -> dict[str, Any]:
    """Lens values per layer output (point ``i + 1``) plus the embedding point and the
    decodable / converged layer."""
    out: dict[str, Any] = {
        "points": "value[i] is the lens on layer i's output; 'embeddings' "
        "the lens on the input of layer 0"
    }
    for k, v in lens.items():
        out[k] = v[1:]
        out[f"embeddings_{k}"] = v[0]
    if kind == "text":
        loss = out["loss"]
        final, emb = loss[-1], out["embeddings_loss"]
        drop = emb - final
        out["converged_layer"] = (
            first_stable_layer(loss, final, tolerance * drop, higher_is_better=False)
            if drop > 0
            else None
        )
        out["converged_rule"] = (
            f"first layer i with lens loss(j) - loss(final) <= {tolerance} * "
            "(loss(embeddings) - loss(final)) for every j >= i"
        )
    else:
        acc = out["accuracy"]
        final = acc[-1]
        out["decodable_layer"] = (
            first_stable_layer(acc, final, tolerance, higher_is_better=True)
            if final > _CHANCE + tolerance
            else None
        )
        out["decodable_rule"] = (
            f"first layer i with lens accuracy(j) >= accuracy(final) - "
            f"{tolerance} for every j >= i; none when the final accuracy is "
            f"not above chance (0.25) + {tolerance}"
        )
    return out


def per_layer_rows(result: dict[str, Any], n_layers: int, indices: Sequence[int]) -> list[dict]:
    """One flat dict per layer with every per-layer number of ``result`` (the CSV rows)."""
    rows: list[dict[str, Any]] = [{"layer": i} for i in indices]
    rep = result.get("representation", {})
    if "angular" in rep:
        for i in range(n_layers):
            rows[i]["angular_next"] = rep["angular"]["mean"][i][0]
            rows[i]["angular_next_last_token"] = rep["angular"]["last_token"][i][0]
            # distance from this layer's input to the final-norm input: the remaining change
            rows[i]["angular_to_end"] = rep["angular"]["mean"][i][-1]
    if "cka_consecutive" in rep:
        for i in range(n_layers):
            rows[i]["cka_next"] = rep["cka_consecutive"][i]
    lens = result.get("logit_lens", {})
    for key in ("loss", "accuracy", "gold_prob", "gold_choice_prob"):
        if key in lens:
            for i in range(n_layers):
                rows[i][f"lens_{key}"] = lens[key][i]
    sens = result.get("sensitivity", {})
    if "skip" in sens:
        for i in range(n_layers):
            rows[i]["skip"] = sens["skip"][i]
    for scale, vals in sens.get("noise", {}).items():
        for i in range(n_layers):
            rows[i][f"noise_{scale}"] = vals[i]
    for key in ("grad_norm", "fisher", "fisher_mean"):
        if key in sens:
            for i in range(n_layers):
                rows[i][key] = sens[key][i]
    stab = result.get("stability", {})
    for key in ("weight_change", "drift", "drift_last_token"):
        if key in stab:
            for i in range(n_layers):
                rows[i][key] = stab[key][i]
    iso = result.get("layer_stability", {})
    for key, col in (
        ("output_change", "layer_stability"),
        ("output_angle", "layer_stability_angle"),
        ("weight_change", "layer_stability_weight_change"),
    ):
        if key in iso:
            for i in range(n_layers):
                rows[i][col] = iso[key][i]
    return rows
