"""Sensitivity hooks for training: per-layer statistics on a fixed probe batch, every N steps.

Run (what ``train.py`` does every ``diagnostics.every`` steps)::

    from layerfreeze.diagnostics.hooks import SensitivityHooks
    hooks = SensitivityHooks(layout, probe_batch)            # before the first step
    stats = hooks.compute(model, step)                       # {"diag/grad_norm/layers.3": ..., ...}
    metrics.log(stats, step=step)

One :meth:`SensitivityHooks.compute` is one forward and one backward of the probe batch with
forward pre-hooks on the decoder blocks (a :class:`~layerfreeze.diagnostics.angular.LayerInputRecorder`,
removed when the call ends, also after an exception). The backward goes through
``torch.func.functional_call`` on detached copies of the layer parameters: the model's
``.grad`` fields (a training step's accumulated gradients), ``requires_grad`` flags and mode
(train/eval; the call runs in eval mode, dropout off) are left as they were.

Per layer (global index ``i``), keys ``diag/<measure>/layers.<i>``:

* ``grad_norm``: L2 norm over the layer's parameters (frozen ones and adapters included) of the
  gradient of the probe loss (:func:`~layerfreeze.diagnostics.measures.batch_loss`);
* ``update_ratio``: ``||W_now - W_prev||_F / ||W_prev||_F`` over the layer's *trainable*
  parameters against the previous call (0 for a layer without trainable parameters; absent on
  the first call);
* ``drift``: token-mean angular distance between the layer's output now and at the first call;
* ``angular``: ``d(i, 1)``, token-mean angular distance between the layer's input and output.

Plus ``diag/probe_loss``. Under data parallelism (an initialised process group) every rank
passes its own probe batch; the gradients and the angular/drift sums are all-reduced, so every
rank returns the numbers of the union of the batches. Under ZeRO-3 pass
``gather=<engine>.gathered_parameters`` to :meth:`SensitivityHooks.compute`: the forward gathers
one layer at a time by itself and ``update_ratio`` gathers one layer's trainable parameters at a
time; ``grad_norm`` is refused there (it needs whole parameters: log the engine's per-layer
gradient norms from ``train_step(grad_norms=True)`` instead).

Memory: the step-0 outputs of every layer on the probe batch (``L * B * T * H`` elements), a
CPU float32 copy of the trainable layer parameters (``update_ratio``), and during a call one
gradient per layer parameter plus the recorder's ``(L + 1) * B * T * H`` elements.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from layerfreeze.diagnostics.angular import AngularAccumulator, LayerInputRecorder, angular_distance
from layerfreeze.diagnostics.measures import batch_loss, is_partitioned, model_logits, no_gather
from layerfreeze.diagnostics.probe import ProbeBatch
from layerfreeze.models import ModelLayout
from layerfreeze.utils.dist import all_reduce_sum

__all__ = ["HOOK_MEASURES", "SensitivityHooks"]

#: Every measure :class:`SensitivityHooks` computes, in key order.
HOOK_MEASURES: tuple[str, ...] = ("grad_norm", "update_ratio", "drift", "angular")


def _as_probe_batch(batch: Any) -> ProbeBatch:
    if isinstance(batch, ProbeBatch):
        return batch
    if isinstance(batch, torch.Tensor):
        return ProbeBatch(batch, torch.ones_like(batch))
    if isinstance(batch, Mapping) and "input_ids" in batch:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        return ProbeBatch(ids, torch.ones_like(ids) if mask is None else mask)
    raise TypeError(
        "probe_batch: expected a ProbeBatch, a (batch, seq) tensor of token ids or a mapping "
        f"with 'input_ids' (and 'attention_mask'), got {type(batch).__name__}."
    )


def _dist_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class SensitivityHooks:
    """Per-layer gradient norms, update ratios, drift and angular distances on a probe batch.

    Args:
        layout: the layout of the model :meth:`compute` gets (``discover_layout(model)``; a
            pipeline stage's layout carries global indices).
        probe_batch: a :class:`~layerfreeze.diagnostics.probe.ProbeBatch`, a token-id tensor
            ``(batch, seq)`` or a mapping with ``input_ids`` / ``attention_mask``; the same
            batch on every call (text loss: next-token NLL).
        measures: subset of :data:`HOOK_MEASURES`.
        kind: ``"text"`` (next-token loss) or ``"choice"`` (gold-letter loss; the batch then
            carries ``answer_pos``, ``choice_ids``, ``gold``).

    Raises:
        ValueError: unknown measures or kind.
    """

    def __init__(
        self,
        layout: ModelLayout,
        probe_batch: Any,
        measures: Iterable[str] = HOOK_MEASURES,
        kind: str = "text",
    ) -> None:
        measures = list(measures)
        unknown = [m for m in measures if m not in HOOK_MEASURES]
        if unknown or not measures:
            raise ValueError(
                f"diagnostics.measures: unknown or empty, got {measures}. "
                f"Choose from {', '.join(HOOK_MEASURES)}."
            )
        if kind not in ("text", "choice"):
            raise ValueError(f"kind: expected 'text' or 'choice', got {kind!r}.")
        self.layout = layout
        self.batch = _as_probe_batch(probe_batch)
        self.measures = tuple(m for m in HOOK_MEASURES if m in measures)
        self.kind = kind
        self._reference: list[torch.Tensor] | None = None  # step-0 layer outputs
        self._previous: dict[str, torch.Tensor] | None = None  # trainable weights, last call

    # ------------------------------------------------------------------ helpers
    def _check_partitioned(self, model: nn.Module, gather: Any) -> None:
        if not is_partitioned(model):
            return
        if "grad_norm" in self.measures:
            raise RuntimeError(
                "SensitivityHooks: grad_norm needs whole parameters and the model is ZeRO-3 "
                "partitioned; drop it from the measures and log the engine's per-layer "
                "gradient norms (train_step(grad_norms=True)) instead."
            )
        if gather is None and "update_ratio" in self.measures:
            raise RuntimeError(
                "SensitivityHooks: the model is ZeRO-3 partitioned; pass "
                "gather=<engine>.gathered_parameters to compute(), or drop update_ratio."
            )

    # ------------------------------------------------------------------ main
    def compute(self, model: nn.Module, step: int, gather: Any = None) -> dict[str, float]:
        """Run the probe batch once and return the flat per-layer series for ``step``.

        Args:
            model: the module whose blocks ``layout`` describes (an engine's unwrapped module).
            step: the training step (only used in messages; keys carry no step).
            gather: for ZeRO-3 partitioned parameters, the engine's
                ``gathered_parameters(names, modifier_rank)``: ``update_ratio`` gathers one
                layer's trainable parameters at a time; the forward gathers by itself. Every
                rank must call ``compute`` (it is collective then).

        Returns:
            ``{"diag/<measure>/layers.<i>": value, ..., "diag/probe_loss": loss}``.

        Raises:
            RuntimeError: ZeRO-3 partitioned parameters with ``grad_norm`` in the measures
                (use the engine's per-layer gradient norms), or without ``gather`` for
                ``update_ratio``.
        """
        self._check_partitioned(model, gather)
        device = next(model.parameters()).device
        batch = self.batch.to(device)
        want = set(self.measures)
        need_grad = "grad_norm" in want
        out: dict[str, float] = {}
        was_training = model.training
        model.eval()
        try:
            with LayerInputRecorder(model, self.layout) as rec:
                if rec.num_points != self.layout.num_local_layers + 1:
                    raise ValueError(
                        "SensitivityHooks: the model has no final norm to mark the last layer's "
                        "output."
                    )
                if need_grad:
                    names, leaves = self._leaves()
                    with torch.enable_grad():
                        loss = batch_loss(model_logits(model, batch, leaves), batch, self.kind)
                        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
                    grad_of = dict(zip(leaves, grads, strict=True))
                else:
                    with torch.no_grad():
                        loss = batch_loss(model_logits(model, batch), batch, self.kind)
                states = rec.take()
            loss_t = torch.tensor([float(loss.detach())], dtype=torch.float64)
            out["diag/probe_loss"] = float(all_reduce_sum(loss_t)) / _dist_world()
            if need_grad:
                out.update(self._grad_norms(names, leaves, grad_of))
            if "angular" in want:
                acc = AngularAccumulator(len(states))
                acc.update(states, batch.attention_mask)
                acc.all_reduce()
                dist_ = acc.result()
                for local, info in enumerate(self.layout.layers):
                    out[f"diag/angular/layers.{info.index}"] = dist_.d(local, 1)
            if "drift" in want:
                out.update(self._drift(states[1:], batch))
            if "update_ratio" in want:
                out.update(self._update_ratio(model, gather or no_gather))
        finally:
            model.train(was_training)
        return out

    def _leaves(self) -> tuple[list[list[str]], dict[str, torch.Tensor]]:
        names: list[list[str]] = []
        leaves: dict[str, torch.Tensor] = {}
        for info in self.layout.layers:
            layer = []
            for n, p in info.module.named_parameters():
                full = f"{info.name}.{n}"
                leaves[full] = p.detach().requires_grad_(True)
                layer.append(full)
            names.append(layer)
        return names, leaves

    def _grad_norms(
        self,
        names: list[list[str]],
        leaves: dict[str, torch.Tensor],
        grad_of: dict[str, torch.Tensor | None],
    ) -> dict[str, float]:
        world = _dist_world()
        out = {}
        for info, layer in zip(self.layout.layers, names, strict=True):
            flat = (
                torch.cat(
                    [
                        (grad_of[n] if grad_of[n] is not None else torch.zeros_like(leaves[n]))
                        .detach()
                        .float()
                        .flatten()
                        for n in layer
                    ]
                )
                if layer
                else torch.zeros(0)
            )
            if world > 1:
                all_reduce_sum(flat)
                flat /= world
            out[f"diag/grad_norm/layers.{info.index}"] = math.sqrt(
                float(flat.double().pow(2).sum())
            )
        return out

    @torch.no_grad()
    def _drift(self, outputs: list[torch.Tensor], batch: ProbeBatch) -> dict[str, float]:
        if self._reference is None:
            self._reference = [o.detach().clone() for o in outputs]
        keep = batch.attention_mask != 0
        sums = torch.zeros(len(outputs) + 1, dtype=torch.float64)
        for i, (now, ref) in enumerate(zip(outputs, self._reference, strict=True)):
            sums[i] = angular_distance(now.float(), ref.to(now.device).float())[keep].double().sum()
        sums[-1] = float(keep.sum())
        all_reduce_sum(sums)
        return {
            f"diag/drift/layers.{info.index}": float(sums[i] / sums[-1])
            for i, info in enumerate(self.layout.layers)
        }

    @torch.no_grad()
    def _update_ratio(self, model: nn.Module, gather: Any) -> dict[str, float]:
        by_id = {id(p): n for n, p in model.named_parameters()}
        now: dict[str, torch.Tensor] = {}
        for info in self.layout.layers:  # one layer's trainable parameters whole at a time
            mine = [
                (f"{info.name}.{n}", p)
                for n, p in info.module.named_parameters()
                if p.requires_grad
            ]
            with gather([by_id[id(p)] for _, p in mine]):
                now.update({n: p.detach().float().cpu().clone() for n, p in mine})
        prev, self._previous = self._previous, now
        if prev is None:
            return {}
        out = {}
        for info in self.layout.layers:
            num = den = 0.0
            for n in now:
                if n.startswith(info.name + ".") and n in prev:
                    num += float((now[n].double() - prev[n].double()).pow(2).sum())
                    den += float(prev[n].double().pow(2).sum())
            out[f"diag/update_ratio/layers.{info.index}"] = (
                math.sqrt(num) / math.sqrt(den) if den > 0 else 0.0
            )
        return out
