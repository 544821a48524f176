"""Per-layer measures of a decoder-only LM on a probe set, each accumulated batch by batch.

Residual-stream points are those of :mod:`layerfreeze.diagnostics.angular`: point ``p < L`` is
the input of layer ``p``, point ``L`` the input of the final norm (the last layer's output), so
layer ``i`` maps point ``i`` to point ``i + 1``. Losses:

* text probes: next-token negative log-likelihood; sums over real tokens (``loss_sums``) or
  the mean over sequences of each sequence's token mean (``batch_loss``, what gradients use);
* multiple-choice probes: negative log-probability (full vocabulary) of the gold letter's
  token at the answer position.

Measures here (the formulas are in docs/diagnostics.md):

* :class:`StreamStats`: one forward per batch feeds angular distances (``AngularAccumulator``),
  linear CKA between consecutive points (:class:`CKAAccumulator`) and the logit lens.
* :func:`skip_sensitivity`: loss increase with one layer replaced by the identity.
* :func:`noise_sensitivity`: loss increase with relative Gaussian noise on one layer's matrices
  (seeded; weights restored bit for bit).
* :func:`gradient_scores` / :func:`layer_gradients`: per-layer gradient norm and diagonal
  Fisher, computed through ``torch.func.functional_call`` on detached copies of the layer
  parameters, so neither ``requires_grad`` nor any ``.grad`` of the model changes.
* :func:`stability`: ``k`` AdamW steps on a copy (``apply_plan(copy, "full").param_groups``),
  relative weight change and output drift per layer (:func:`output_drift`).

Length: just over the ~700-line guide; the measures share their forward and capture helpers, so
they stay together (the per-layer isolated stability is in :mod:`.isolated`).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layerfreeze.diagnostics.angular import (
    AngularAccumulator,
    LayerInputRecorder,
    angular_distance,
)
from layerfreeze.diagnostics.probe import ProbeBatch, ProbeSet
from layerfreeze.engines.partition import full_shape
from layerfreeze.models import ModelLayout, param_numel

__all__ = [
    "CKAAccumulator",
    "LensAccumulator",
    "StreamStats",
    "linear_cka",
    "lens_logits",
    "model_logits",
    "loss_sums",
    "batch_loss",
    "probe_loss",
    "skip_layer",
    "skip_sensitivity",
    "noise_sensitivity",
    "layer_gradients",
    "gradient_scores",
    "output_drift",
    "stability",
]

Tick = Callable[[int], Any]
#: ``gather(names, modifier_rank=None)``: a context in which the named parameters are whole on
#: every rank (``EngineAdapter.gathered_parameters``; changes made on ``modifier_rank`` persist).
Gather = Callable[..., AbstractContextManager]


def no_gather(names: Sequence[str] | None = None, modifier_rank: int | None = None):
    """The :data:`Gather` of a model whose parameters are whole already."""
    return contextlib.nullcontext()


def is_partitioned(model: nn.Module) -> bool:
    """True when some parameter is a ZeRO-3 partition (its local tensor is not the whole)."""
    return any(param_numel(p) != p.numel() for p in model.parameters())


def param_names(model: nn.Module, module: nn.Module) -> list[str]:
    """Names in ``model.named_parameters()`` of ``module``'s parameters (tied ones included)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in module.parameters() if id(p) in by_id]


def _noop(_n: int = 1) -> None:
    return None


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _logits(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def model_logits(
    model: nn.Module, batch: ProbeBatch, params: Mapping[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """``(batch, seq, vocab)`` logits of a forward on ``batch`` (through ``params`` when given)."""
    kwargs = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "use_cache": False,
    }
    if params is None:
        return _logits(model(**kwargs))
    return _logits(torch.func.functional_call(model, dict(params), args=(), kwargs=kwargs))


# --------------------------------------------------------------------------- losses


def _text_nll(logits: torch.Tensor, batch: ProbeBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position NLL ``(B, T-1)`` (float32) and the mask of real predictions."""
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -lp.gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    valid = batch.attention_mask[:, 1:] != 0
    return nll, valid


def _gold_logprob(logits: torch.Tensor, batch: ProbeBatch) -> torch.Tensor:
    """``(B, vocab)`` log-softmax at each row's answer position (float32)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return F.log_softmax(logits[rows, batch.answer_pos].float(), dim=-1)


def loss_sums(logits: torch.Tensor, batch: ProbeBatch, kind: str) -> tuple[float, int]:
    """(sum of losses, count): over real next-token predictions (text) or questions (choice)."""
    if kind == "text":
        nll, valid = _text_nll(logits, batch)
        return float(nll[valid].double().sum()), int(valid.sum())
    lp = _gold_logprob(logits, batch)
    gold_ids = batch.choice_ids.gather(1, batch.gold.unsqueeze(1)).squeeze(1)
    return float(-lp.gather(1, gold_ids.unsqueeze(1)).double().sum()), int(lp.shape[0])


def batch_loss(logits: torch.Tensor, batch: ProbeBatch, kind: str) -> torch.Tensor:
    """Differentiable loss: mean over rows of each row's mean token NLL (text) or gold NLL."""
    if kind == "text":
        nll, valid = _text_nll(logits, batch)
        per_row = (nll * valid).sum(1) / valid.sum(1).clamp_min(1)
        return per_row[valid.any(1)].mean()
    lp = _gold_logprob(logits, batch)
    gold_ids = batch.choice_ids.gather(1, batch.gold.unsqueeze(1))
    return -lp.gather(1, gold_ids).mean()


@torch.no_grad()
def probe_loss(model: nn.Module, probe: ProbeSet, tick: Tick = _noop) -> float:
    """Token-weighted (text) or question-weighted (choice) mean loss over the whole probe set."""
    device = _device(model)
    total, count = 0.0, 0
    for batch in probe.batches:
        b = batch.to(device)
        s, n = loss_sums(model_logits(model, b), b, probe.kind)
        total, count = total + s, count + n
        tick(1)
    return total / max(count, 1)


# --------------------------------------------------------------------------- CKA


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two ``(n, features)`` representations (columns centred), in float64.

    ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` (Kornblith et al. 2019).
    """
    xc = x.double() - x.double().mean(0, keepdim=True)
    yc = y.double() - y.double().mean(0, keepdim=True)
    num = (yc.T @ xc).pow(2).sum()
    den = (xc.T @ xc).norm() * (yc.T @ yc).norm()
    return float(num / den) if den > 0 else float("nan")


class CKAAccumulator:
    """Streaming linear CKA between consecutive points ``(p, p + 1)``.

    Feature-space form: keeps, in float64 on ``device`` (CPU by default), the uncentred second
    moments ``S_pp = sum x_p x_p^T`` for every point, the cross moments ``S_p,p+1`` for every
    consecutive pair, the feature sums and the token count; centring happens at the end
    (``C_xy = S_xy - n mu_x mu_y^T``). Memory: ``((2P - 1) H^2 + P H) * 8`` bytes, independent of
    the number of tokens.
    """

    def __init__(self, num_points: int, hidden: int, device: torch.device | str = "cpu") -> None:
        self.num_points, self.hidden = num_points, hidden
        kw = {"dtype": torch.float64, "device": device}
        self.second = torch.zeros(num_points, hidden, hidden, **kw)
        self.cross = torch.zeros(num_points - 1, hidden, hidden, **kw)
        self.sums = torch.zeros(num_points, hidden, **kw)
        self.count = 0

    @torch.no_grad()
    def update(self, states: Sequence[torch.Tensor], mask: torch.Tensor) -> None:
        """Add one batch: ``states[p]`` is ``(B, T, H)``; ``mask`` ``(B, T)`` marks real tokens."""
        keep = mask.to(states[0].device) != 0
        prev = None
        for p, s in enumerate(states):
            x = s[keep].double()
            self.sums[p] += x.sum(0).to(self.sums.device)
            self.second[p] += (x.T @ x).to(self.second.device)
            if prev is not None:
                self.cross[p - 1] += (prev.T @ x).to(self.cross.device)
            prev = x
        self.count += int(keep.sum())

    def all_reduce(self) -> None:
        """Sum over data-parallel ranks (no-op without an initialised process group)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        for t in (self.second, self.cross, self.sums):
            dist.all_reduce(t)
        n = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sums.device)
        dist.all_reduce(n)
        self.count = int(n.item())

    def result(self) -> list[float]:
        """``[CKA(x_0, x_1), ..., CKA(x_{P-2}, x_{P-1})]``."""
        n = self.count
        if n == 0:
            raise ValueError("CKA: no tokens were accumulated (empty probe set).")
        mu = self.sums / n
        cov = [self.second[p] - n * torch.outer(mu[p], mu[p]) for p in range(self.num_points)]
        out = []
        for p in range(self.num_points - 1):
            cxy = self.cross[p] - n * torch.outer(mu[p], mu[p + 1])
            den = cov[p].norm() * cov[p + 1].norm()
            out.append(float(cxy.pow(2).sum() / den) if den > 0 else float("nan"))
        return out

    def nbytes(self) -> int:
        """Bytes held by the accumulators."""
        return sum(t.numel() * t.element_size() for t in (self.second, self.cross, self.sums))


# --------------------------------------------------------------------------- logit lens


def lens_logits(model: nn.Module, layout: ModelLayout, x: torch.Tensor) -> torch.Tensor:
    """Decode residual-stream states through the model's own final norm and output head."""
    if layout.final_norm is not None:
        x = model.get_submodule(layout.final_norm)(x)
    head = (
        model.get_output_embeddings()
        if layout.lm_head is None
        else model.get_submodule(layout.lm_head)
    )
    return head(x)


class LensAccumulator:
    """Per-point logit-lens sums: NLL and top-1 hits (text) or gold log-prob, gold probability
    among the four letters and letter accuracy (multiple choice)."""

    def __init__(self, num_points: int, kind: str) -> None:
        self.kind = kind
        self.nll = torch.zeros(num_points, dtype=torch.float64)
        self.hits = torch.zeros(num_points, dtype=torch.float64)
        self.choice_prob = torch.zeros(num_points, dtype=torch.float64)
        self.count = 0

    @torch.no_grad()
    def update(
        self,
        model: nn.Module,
        layout: ModelLayout,
        states: Sequence[torch.Tensor],
        batch: ProbeBatch,
        gather: Gather = no_gather,
    ) -> None:
        """Add one batch (``states`` from :class:`LayerInputRecorder`, ``batch`` on its device).

        ``gather`` makes the final norm and output head whole around the lens (ZeRO-3).
        """
        names = []
        for part in (layout.final_norm, layout.lm_head):
            if part is not None:
                names += param_names(model, model.get_submodule(part))
        with gather(names):
            self._update(model, layout, states, batch)

    def _update(self, model, layout, states, batch) -> None:
        rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
        for p, s in enumerate(states):
            if self.kind == "text":
                logits = lens_logits(model, layout, s)
                nll, valid = _text_nll(logits, batch)
                self.nll[p] += float(nll[valid].double().sum())
                top1 = logits[:, :-1].argmax(-1) == batch.input_ids[:, 1:]
                self.hits[p] += float(top1[valid].sum())
                if p == 0:
                    self.count += int(valid.sum())
            else:
                logits = lens_logits(model, layout, s[rows, batch.answer_pos])  # (B, V)
                lp = F.log_softmax(logits.float(), dim=-1)
                letters = lp.gather(1, batch.choice_ids)  # (B, 4)
                gold = batch.gold.unsqueeze(1)
                self.nll[p] += float(-letters.gather(1, gold).double().sum())
                self.choice_prob[p] += float(letters.softmax(-1).gather(1, gold).double().sum())
                self.hits[p] += float((letters.argmax(-1) == batch.gold).sum())
                if p == 0:
                    self.count += int(rows.numel())

    def result(self) -> dict[str, list[float]]:
        """Means per point: ``loss`` and ``accuracy``; for choice probes also ``gold_prob``
        (full vocabulary) and ``gold_choice_prob`` (renormalised over the four letters)."""
        n = max(self.count, 1)
        out = {"loss": (self.nll / n).tolist(), "accuracy": (self.hits / n).tolist()}
        if self.kind != "text":
            out["gold_prob"] = torch.exp(-self.nll / n).tolist()  # geometric mean over questions
            out["gold_choice_prob"] = (self.choice_prob / n).tolist()
        return out


class StreamStats:
    """Everything one forward per batch gives: angular distances, consecutive CKA, logit lens.

    Memory (besides the model): the recorder holds one batch's inputs of every point
    (``P * B * T * H`` elements of the model dtype); persistent sums are
    :meth:`accumulator_bytes`.

    Args:
        model: the LM.
        layout: its layout.
        kind: probe kind (``text`` / ``choice``).
        measures: subset of ``("angular", "cka", "logit_lens")``.
        cka_device: where the CKA moment matrices live.
        gather: makes parameters whole for the lens (ZeRO-3; see :data:`Gather`).
    """

    def __init__(
        self,
        model: nn.Module,
        layout: ModelLayout,
        kind: str,
        measures: Iterable[str],
        cka_device: torch.device | str = "cpu",
        gather: Gather = no_gather,
    ) -> None:
        self.model, self.layout, self.kind, self.gather = model, layout, kind, gather
        self.measures = set(measures)
        self.num_points = layout.num_local_layers + int(layout.final_norm is not None)
        p = self.num_points
        self.angular = AngularAccumulator(p) if "angular" in self.measures else None
        self.cka = (
            CKAAccumulator(p, layout.hidden_size, cka_device) if "cka" in self.measures else None
        )
        self.lens = LensAccumulator(p, kind) if "logit_lens" in self.measures else None

    @torch.no_grad()
    def run(self, batches: Iterable[ProbeBatch], tick: Tick = _noop) -> None:
        """One forward per batch with the recorder's hooks (removed on exit)."""
        device = _device(self.model)
        with LayerInputRecorder(self.model, self.layout) as rec:
            for batch in batches:
                b = batch.to(device)
                model_logits(self.model, b)
                states = rec.take()
                self.update(states, b)
                del states
                tick(1)

    def update(self, states: Sequence[torch.Tensor], batch: ProbeBatch) -> None:
        """Feed one batch's point states to every accumulator."""
        if self.angular is not None:
            self.angular.update(states, batch.attention_mask)
        if self.cka is not None:
            self.cka.update(states, batch.attention_mask)
        if self.lens is not None:
            self.lens.update(self.model, self.layout, states, batch, self.gather)

    def accumulator_bytes(self) -> int:
        """Bytes of the persistent sums (constant in the number of tokens streamed)."""
        n = 0
        if self.angular is not None:
            n += sum(
                t.numel() * t.element_size()
                for t in (self.angular.token_sum, self.angular.last_sum)
            )
        if self.cka is not None:
            n += self.cka.nbytes()
        if self.lens is not None:
            n += sum(
                t.numel() * t.element_size()
                for t in (self.lens.nll, self.lens.hits, self.lens.choice_prob)
            )
        return n


# --------------------------------------------------------------------------- sensitivity


def _hidden_in(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return kwargs["hidden_states"]


class skip_layer:  # noqa: N801 - used like a function: ``with skip_layer(block): ...``
    """Context manager: the block returns its input unchanged (identity); hook removed on exit."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.handle = None

    def __enter__(self) -> skip_layer:
        def hook(_m: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            h = _hidden_in(args, kwargs)
            return h if isinstance(output, torch.Tensor) else (h, *output[1:])

        self.handle = self.block.register_forward_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def skip_sensitivity(
    model: nn.Module,
    layout: ModelLayout,
    probe: ProbeSet,
    base: float | None = None,
    tick: Tick = _noop,
) -> list[float]:
    """Per layer: probe loss with that layer skipped minus the intact probe loss."""
    base = probe_loss(model, probe) if base is None else base
    out = []
    for info in layout.layers:
        with skip_layer(info.module):
            out.append(probe_loss(model, probe, tick) - base)
    return out


def _noise_seed(seed: int, layer: int, param_index: int) -> int:
    return ((seed * 1_000_003 + layer) * 1_013 + param_index) % (2**63)


def _noise_targets(block: nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [
        (n, p) for n, p in block.named_parameters() if len(full_shape(p)) >= 2
    ]


@torch.no_grad()
def noise_sensitivity(
    model: nn.Module,
    layout: ModelLayout,
    probe: ProbeSet,
    scales: Sequence[float],
    seed: int = 0,
    base: float | None = None,
    tick: Tick = _noop,
    gather: Gather = no_gather,
) -> dict[str, list[float]]:
    """Per scale and layer: loss increase with relative Gaussian noise on the layer's matrices.

    Every parameter ``W`` of the block with two or more dimensions gets
    ``W + s * rms(W) * e`` with ``e ~ N(0, 1)`` drawn on the CPU from a generator seeded by
    ``(seed, layer, parameter index)``, so ``||noise||_F ~= s * ||W||_F``, every scale uses the
    same direction ``e`` (the curves over scales are comparable) and the numbers do not depend
    on the device. The layer's weights are copied first and restored bit for bit afterwards
    (also after an exception). Under ZeRO-3 (``gather``) one layer at a time is gathered to
    read, perturb and restore it (``modifier_rank=0``: every rank draws the same noise).

    Returns:
        ``{str(scale): [increase per layer]}``.
    """
    base = probe_loss(model, probe) if base is None else base
    by_id = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, list[float]] = {}
    for scale in scales:
        if not (scale >= 0 and math.isfinite(scale)):
            raise ValueError(f"--noise-scales: each scale must be finite and >= 0, got {scale}.")
        row = []
        for info in layout.layers:
            targets = _noise_targets(info.module)
            names = [by_id[id(p)] for _, p in targets]
            with gather(names, modifier_rank=0):
                saved = [p.detach().clone() for _, p in targets]
            try:
                with gather(names, modifier_rank=0):
                    for pi, (_, p) in enumerate(targets):
                        g = torch.Generator().manual_seed(_noise_seed(seed, info.index, pi))
                        e = torch.randn(p.shape, generator=g, dtype=torch.float32)
                        rms = p.detach().float().pow(2).mean().sqrt()
                        p.add_((scale * rms * e.to(p.device)).to(p.dtype))
                row.append(probe_loss(model, probe, tick) - base)
            finally:
                with gather(names, modifier_rank=0):
                    for (_, p), s in zip(targets, saved, strict=True):
                        p.copy_(s)
        out[f"{scale:g}"] = row
    return out


# --------------------------------------------------------------------------- gradients


def layer_gradients(
    model: nn.Module, layout: ModelLayout, batch: ProbeBatch, kind: str
) -> list[list[torch.Tensor]]:
    """Gradients of :func:`batch_loss` w.r.t. every parameter of every layer, per layer.

    Runs through ``torch.func.functional_call`` with detached copies (shared storage) of the
    layer parameters as the differentiable leaves, so the model's ``requires_grad`` flags and
    ``.grad`` fields are untouched (a training step's accumulated gradients stay as they were).
    Parameters a layer does not use get zero gradients.
    """
    names: list[list[str]] = []
    leaves: dict[str, torch.Tensor] = {}
    for info in layout.layers:
        layer_names = []
        for n, p in info.module.named_parameters():
            full = f"{info.name}.{n}"
            leaves[full] = p.detach().requires_grad_(True)
            layer_names.append(full)
        names.append(layer_names)
    with torch.enable_grad():
        loss = batch_loss(model_logits(model, batch, leaves), batch, kind)
        flat = [leaves[n] for ns in names for n in ns]
        grads = torch.autograd.grad(loss, flat, allow_unused=True)
    by_name = {
        n: (g if g is not None else torch.zeros_like(leaves[n]))
        for n, g in zip([n for ns in names for n in ns], grads, strict=True)
    }
    return [[by_name[n] for n in ns] for ns in names]


def _sq_norm(tensors: Sequence[torch.Tensor]) -> float:
    return float(sum(t.detach().double().pow(2).sum() for t in tensors)) if tensors else 0.0


def gradient_scores(
    model: nn.Module, layout: ModelLayout, probe: ProbeSet, tick: Tick = _noop
) -> dict[str, list[float]]:
    """Per layer: gradient norm and diagonal-Fisher estimate over the probe set.

    Each sequence ``s`` is its own backward (gradient ``g_s`` of its :func:`batch_loss`).
    ``grad_norm`` is ``||mean_s g_s||_2`` over the layer's parameters (the gradient of the
    probe loss with sequences weighted equally); ``fisher`` is the trace of the empirical
    diagonal Fisher ``mean_s sum_i g_s,i^2`` and ``fisher_mean`` that trace divided by the
    layer's parameter count.
    """
    device = _device(model)
    total: list[list[torch.Tensor]] | None = None
    fisher = [0.0] * layout.num_local_layers
    count = 0
    for batch in probe.batches:
        for i in range(batch.input_ids.shape[0]):
            row = batch.row(i).to(device)
            grads = layer_gradients(model, layout, row, probe.kind)
            for li, gs in enumerate(grads):
                fisher[li] += _sq_norm(gs)
            if total is None:  # float32 sums: 4 bytes per layer parameter
                total = [[g.float() for g in gs] for gs in grads]
            else:
                for acc, gs in zip(total, grads, strict=True):
                    for a, g in zip(acc, gs, strict=True):
                        a.add_(g.float())
            count += 1
        tick(1)
    numel = [sum(p.numel() for p in info.module.parameters()) for info in layout.layers]
    assert total is not None and count > 0
    return {
        "grad_norm": [math.sqrt(_sq_norm(acc)) / count for acc in total],
        "fisher": [f / count for f in fisher],
        "fisher_mean": [f / count / max(n, 1) for f, n in zip(fisher, numel, strict=True)],
    }


# --------------------------------------------------------------------------- stability


@torch.no_grad()
def output_drift(
    model: nn.Module,
    reference: nn.Module,
    layout: ModelLayout,
    ref_layout: ModelLayout,
    batches: Iterable[ProbeBatch],
    tick: Tick = _noop,
) -> dict[str, list[float]]:
    """Per layer: token-mean (and last-token mean) angular distance between the layer's output
    in ``model`` and in ``reference`` on the same inputs.

    A layer's output is the next point (the next layer's input, or the final-norm input).
    """
    device = _device(model)
    n_layers = layout.num_local_layers
    tok = torch.zeros(n_layers, dtype=torch.float64)
    last = torch.zeros(n_layers, dtype=torch.float64)
    n_tok = n_seq = 0
    with LayerInputRecorder(model, layout) as rec, LayerInputRecorder(reference, ref_layout) as ref:
        if rec.num_points != n_layers + 1:
            raise ValueError(
                "output drift: the model has no final norm to mark the last layer's output."
            )
        for batch in batches:
            b = batch.to(device)
            model_logits(model, b)
            a = rec.take()
            model_logits(reference, b.to(_device(reference)))
            r = ref.take()
            keep = b.attention_mask != 0
            lengths = keep.sum(1)
            rows = torch.arange(keep.shape[0], device=keep.device)
            for i in range(n_layers):
                d = angular_distance(a[i + 1].float(), r[i + 1].to(a[i + 1].device).float())
                tok[i] += float(d[keep].double().sum())
                last[i] += float(d[rows, lengths - 1].double().sum())
            n_tok += int(keep.sum())
            n_seq += int(keep.shape[0])
            tick(1)
    return {
        "drift": (tok / max(n_tok, 1)).tolist(),
        "drift_last_token": (last / max(n_seq, 1)).tolist(),
    }


def _lm_labels(batch: ProbeBatch) -> torch.Tensor:
    return batch.input_ids.masked_fill(batch.attention_mask == 0, -100)


def stability(
    model: nn.Module,
    layout: ModelLayout,
    probe: ProbeSet,
    steps: int = 4,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    tick: Tick = _noop,
) -> dict[str, Any]:
    """Train a float32 copy for ``steps`` AdamW steps on the probe data; measure what moved.

    The training path is the project's own: ``apply_plan(copy, "full")`` and its
    ``param_groups(lr, weight_decay)`` (per-policy lr scales, no decay on norms/biases) under
    ``torch.optim.AdamW``; the loss is the causal-LM loss of the probe sequences (multiple
    choice: the prompts), one probe batch per step in order (cycling), dropout off. The given
    model is not modified.

    Returns:
        ``weight_change`` per layer (``||W_k - W_0||_F / ||W_0||_F`` over the layer's
        parameters), ``drift`` / ``drift_last_token`` per layer (:func:`output_drift` of the
        trained copy against the untrained model, both in float32), ``losses`` per step.
    """
    from layerfreeze.apply import apply_plan
    from layerfreeze.models import discover_layout

    if steps < 1:
        raise ValueError(f"--stability-steps: must be >= 1, got {steps}.")
    device = _device(model)
    ref = (
        model
        if all(p.dtype == torch.float32 for p in model.parameters())
        else copy.deepcopy(model).float()
    )
    ref_layout = layout if ref is model else discover_layout(ref)
    trained = copy.deepcopy(ref)
    trained.eval()  # dropout off: the steps are a deterministic probe, not regularised training
    applied = apply_plan(trained, "full")
    opt = torch.optim.AdamW(applied.param_groups(lr=lr, weight_decay=weight_decay), lr=lr)
    losses = []
    for k in range(steps):
        b = probe.batches[k % len(probe.batches)].to(device)
        with torch.enable_grad():
            out = trained(
                input_ids=b.input_ids,
                attention_mask=b.attention_mask,
                labels=_lm_labels(b),
                use_cache=False,
            )
            out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        tick(1)
    del opt
    t_layout = applied.layout
    change = []
    with torch.no_grad():
        for a, r in zip(t_layout.layers, ref_layout.layers, strict=True):
            ra = dict(r.module.named_parameters())
            diff = sum(
                float((p.double() - ra[n].double()).pow(2).sum())
                for n, p in a.module.named_parameters()
            )
            change.append(math.sqrt(diff) / max(math.sqrt(_sq_norm(list(ra.values()))), 1e-30))
    drift = output_drift(trained, ref, t_layout, ref_layout, probe.batches, tick)
    return {
        "steps": steps,
        "lr": lr,
        "weight_decay": weight_decay,
        "losses": losses,
        "weight_change": change,
        **drift,
    }
