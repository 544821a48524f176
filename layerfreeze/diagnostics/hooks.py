"""Sensitivity hooks for training: per-layer statistics on a fixed probe batch, every N steps.

Run (what ``train.py`` does every ``diagnostics.every`` steps)::

    from layerfreeze.diagnostics.hooks import SensitivityHooks
    hooks = SensitivityHooks(layout, probe_batch)            # before the first step
    stats = hooks.compute(model, step)                       # {"diag/grad_norm/layers.3": ..., ...}
    metrics.log(stats, step=step)

This module is the one implementation of the measures, for every engine. What differs per engine
is a :class:`HookEngine`: which layers this rank holds (by global index), how the probe forward
runs and records each layer's input and output, how a partitioned parameter is gathered, and
which ranks add which statistics before the sums are all-reduced. :class:`LocalLayers` (the
default) serves a Hugging Face module under plain data parallelism or DeepSpeed ZeRO;
:class:`layerfreeze.engines.megatron.diagnostics.MegatronLayers` serves megatron-core's
tensor/pipeline-parallel stages.

With :class:`LocalLayers`, one :meth:`SensitivityHooks.compute` is one forward and one backward
of the probe batch with forward pre-hooks on the decoder blocks (a
:class:`~layerfreeze.diagnostics.angular.LayerInputRecorder`, removed when the call ends, also
after an exception). The backward goes through ``torch.func.functional_call`` on detached copies
of the layer parameters: the model's ``.grad`` fields (a training step's accumulated gradients),
``requires_grad`` flags and mode (train/eval; the call runs in eval mode, dropout off) are left as
they were.

Per layer (global index ``i``), keys ``diag/<measure>/layers.<i>``:

* ``grad_norm``: L2 norm over the layer's parameters (frozen ones and adapters included) of the
  gradient of the probe loss (:func:`~layerfreeze.diagnostics.measures.batch_loss`);
* ``update_ratio``: ``||W_now - W_prev||_F / ||W_prev||_F`` over the layer's *trainable*
  parameters against the previous call (0 for a layer without trainable parameters; absent on
  the first call);
* ``drift``: token-mean angular distance between the layer's output now and at the first call;
* ``angular``: ``d(i, 1)``, token-mean angular distance between the layer's input and output.

Plus ``diag/probe_loss``. Under data parallelism (an initialised process group) every rank
passes its own probe batch; the per-layer sums and token counts are all-reduced (the gradients
too), so every rank returns the numbers of the union of the batches. Under ZeRO-3 pass
``gather=<engine>.gathered_parameters`` to :meth:`SensitivityHooks.compute`: the forward gathers
one layer at a time by itself and ``update_ratio`` gathers one layer's trainable parameters at a
time; ``grad_norm`` is refused there (it needs whole parameters: log the engine's per-layer
gradient norms from ``train_step(grad_norms=True)`` instead).

Memory: the first call's outputs of every layer on the probe batch (``L * B * T * H`` elements),
a CPU float32 copy of the trainable layer parameters (``update_ratio``), and during a call one
gradient per layer parameter plus the recorder's ``(L + 1) * B * T * H`` elements. ``angular``
runs each chain of consecutive local layers through one
:class:`~layerfreeze.diagnostics.angular.AngularAccumulator` (the computation ``trace`` uses, so
both agree to the bit): float32 unit vectors of the ``L + 1`` points and ``O(L^2 * B * T * H)``
arithmetic, transient.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from layerfreeze.diagnostics.angular import (
    AngularAccumulator,
    LayerInputRecorder,
    angular_distance,
    hidden_arg,
)
from layerfreeze.diagnostics.measures import batch_loss, is_partitioned, model_logits, no_gather
from layerfreeze.diagnostics.probe import ProbeBatch
from layerfreeze.models import LayerInfo, ModelLayout
from layerfreeze.utils.dist import all_reduce_sum, get_rank, get_world_size

__all__ = [
    "HOOK_MEASURES",
    "HookEngine",
    "LayerIORecorder",
    "LocalLayers",
    "ProbeRun",
    "SensitivityHooks",
    "check_measures",
]

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


@dataclass
class ProbeRun:
    """What one probe forward of a :class:`HookEngine` recorded on this rank.

    Attributes:
        loss: the probe loss this rank adds to the mean over ranks, or None where it adds none
            (not a last pipeline stage, or a tensor-parallel copy).
        inputs: per local layer (in ``layout().layers`` order), its input hidden states
            ``(..., hidden)``.
        outputs: per local layer, its output hidden states, the shape of its input.
        token_mask: boolean mask over the leading dimensions of the hidden states (True: the
            token counts), or None when every token counts.
        grads: ``grad_norm`` only: per local layer, the probe-loss gradient of each of its
            parameters (zeros for an unused one); None when not asked for.
    """

    loss: float | None
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    token_mask: torch.Tensor | None = None
    grads: list[list[torch.Tensor]] | None = None


class HookEngine(Protocol):
    """What :class:`SensitivityHooks` needs from an engine: the part of the measures that differs.

    Sums are all-reduced over the whole world; an engine decides which ranks *add* a statistic
    (the others add zero), so that replicated copies are counted once.
    """

    #: Measures this engine cannot compute, each with the message that says what to use instead.
    unsupported: Mapping[str, str]
    #: Appended to the "unknown or empty measures" message (e.g. ``" (engine: megatron)"``).
    measures_note: str

    def layout(self) -> ModelLayout:
        """This rank's layout: ``layers`` (``index``: 0-based global, forward order) and the
        whole model's ``num_layers``."""
        ...

    def reported(self) -> Sequence[int]:
        """Global indices of the layers every rank reports keys for."""
        ...

    def check(self, model: nn.Module | None, measures: Sequence[str], gather: Any) -> None:
        """Refuse a ``compute`` call the engine cannot serve (raises)."""
        ...

    def run_probe(
        self, model: nn.Module | None, batch: ProbeBatch, kind: str, grads: bool
    ) -> ProbeRun:
        """One probe forward (and backward when ``grads``), layer inputs/outputs recorded."""
        ...

    def counts_activations(self) -> bool:
        """Whether this rank adds its activation statistics (False for a replica's copy)."""
        ...

    def counts_param(self, param: torch.Tensor) -> bool:
        """Whether this rank adds this trainable parameter (shard) to ``update_ratio``."""
        ...

    def gathered(
        self, model: nn.Module | None, params: Sequence[torch.Tensor], gather: Any
    ) -> AbstractContextManager[Any]:
        """Context in which ``params`` are whole on this rank (``update_ratio``)."""
        ...


class LayerIORecorder:
    """Context manager: the input and output of each of ``modules`` on their first call.

    Only the first call is kept (an interleaved pipeline schedule may run a batch twice). Hooks
    are removed on exit, also after an exception.

    Args:
        modules: the layer modules, in the order of the returned lists.
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.modules = list(modules)
        self.inputs: list[torch.Tensor | None] = [None] * len(self.modules)
        self.outputs: list[torch.Tensor | None] = [None] * len(self.modules)
        self._handles: list[Any] = []

    def __enter__(self) -> LayerIORecorder:
        try:
            for i, m in enumerate(self.modules):

                def pre(_m: nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
                    if self.inputs[i] is None:
                        self.inputs[i] = hidden_arg(args, kwargs).detach().clone()

                def post(_m: nn.Module, args: tuple, kwargs: dict, out: Any, i: int = i) -> None:
                    if self.outputs[i] is None:
                        h = out if isinstance(out, torch.Tensor) else out[0]
                        self.outputs[i] = h.detach().clone()

                self._handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
                self._handles.append(m.register_forward_hook(post, with_kwargs=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class LocalLayers:
    """The :class:`HookEngine` of a Hugging Face module that holds all its layers (plain data
    parallelism or DeepSpeed ZeRO): every rank holds whole activations of its own probe rows;
    ZeRO-3 parameters are gathered through the ``gather`` passed to ``compute``.

    Args:
        layout: the layout of the model ``compute`` gets (a pipeline stage's layout carries global
            indices).
    """

    unsupported: Mapping[str, str] = {}
    measures_note = ""

    def __init__(self, layout: ModelLayout) -> None:
        self._layout = layout

    def layout(self) -> ModelLayout:
        return self._layout

    def reported(self) -> Sequence[int]:
        return [info.index for info in self._layout.layers]

    def check(self, model: nn.Module | None, measures: Sequence[str], gather: Any) -> None:
        if not is_partitioned(model):
            return
        if "grad_norm" in measures:
            raise RuntimeError(
                "SensitivityHooks: grad_norm needs whole parameters and the model is ZeRO-3 "
                "partitioned; drop it from the measures and log the engine's per-layer "
                "gradient norms (train_step(grad_norms=True)) instead."
            )
        if gather is None and "update_ratio" in measures:
            raise RuntimeError(
                "SensitivityHooks: the model is ZeRO-3 partitioned; pass "
                "gather=<engine>.gathered_parameters to compute(), or drop update_ratio."
            )

    def run_probe(
        self, model: nn.Module | None, batch: ProbeBatch, kind: str, grads: bool
    ) -> ProbeRun:
        assert model is not None
        batch = batch.to(next(model.parameters()).device)
        was_training = model.training
        model.eval()
        try:
            with LayerInputRecorder(model, self._layout) as rec:
                if rec.num_points != self._layout.num_local_layers + 1:
                    raise ValueError(
                        "SensitivityHooks: the model has no final norm to mark the last layer's "
                        "output."
                    )
                per_layer: list[list[torch.Tensor]] | None = None
                if grads:
                    names, leaves = self._leaves()
                    with torch.enable_grad():
                        loss = batch_loss(model_logits(model, batch, leaves), batch, kind)
                        got = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
                    grad_of = dict(zip(leaves, got, strict=True))
                    per_layer = [
                        [
                            grad_of[n] if grad_of[n] is not None else torch.zeros_like(leaves[n])
                            for n in layer
                        ]
                        for layer in names
                    ]
                else:
                    with torch.no_grad():
                        loss = batch_loss(model_logits(model, batch), batch, kind)
                states = rec.take()
        finally:
            model.train(was_training)
        return ProbeRun(
            loss=float(loss.detach()),
            inputs=states[:-1],
            outputs=states[1:],
            token_mask=batch.attention_mask != 0,
            grads=per_layer,
        )

    def _leaves(self) -> tuple[list[list[str]], dict[str, torch.Tensor]]:
        names: list[list[str]] = []
        leaves: dict[str, torch.Tensor] = {}
        for info in self._layout.layers:
            layer = []
            for n, p in info.module.named_parameters():
                full = f"{info.name}.{n}"
                leaves[full] = p.detach().requires_grad_(True)
                layer.append(full)
            names.append(layer)
        return names, leaves

    def counts_activations(self) -> bool:
        return True  # every rank ran its own rows

    def counts_param(self, param: torch.Tensor) -> bool:
        return get_rank() == 0  # every rank holds (or gathers) the same weights

    def gathered(
        self, model: nn.Module | None, params: Sequence[torch.Tensor], gather: Any
    ) -> AbstractContextManager[Any]:
        assert model is not None
        by_id = {id(p): n for n, p in model.named_parameters()}
        return (gather or no_gather)([by_id[id(p)] for p in params])


def check_measures(measures: Sequence[str], engine: HookEngine) -> None:
    """Refuse measures the engine cannot compute (its message) or that do not exist.

    Raises:
        ValueError: an unsupported, unknown or empty list of measures.
    """
    for m in measures:
        if m in engine.unsupported:
            raise ValueError(engine.unsupported[m])
    supported = [m for m in HOOK_MEASURES if m not in engine.unsupported]
    unknown = [m for m in measures if m not in supported]
    if unknown or not measures:
        raise ValueError(
            f"diagnostics.measures: unknown or empty, got {list(measures)}. "
            f"Choose from {', '.join(supported)}{engine.measures_note}."
        )


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
        engine: what differs per engine (default :class:`LocalLayers` of ``layout``).

    Raises:
        ValueError: unknown measures, a measure the engine cannot compute, or an unknown kind.
    """

    def __init__(
        self,
        layout: ModelLayout | None,
        probe_batch: Any,
        measures: Iterable[str] = HOOK_MEASURES,
        kind: str = "text",
        engine: HookEngine | None = None,
    ) -> None:
        measures = list(measures)
        engine = engine if engine is not None else LocalLayers(layout)  # type: ignore[arg-type]
        check_measures(measures, engine)
        if kind not in ("text", "choice"):
            raise ValueError(f"kind: expected 'text' or 'choice', got {kind!r}.")
        self.layout = layout
        self.engine = engine
        self.batch = _as_probe_batch(probe_batch)
        self.measures = tuple(m for m in HOOK_MEASURES if m in measures)
        self.kind = kind
        self._reference: dict[int, torch.Tensor] | None = None  # first-call outputs, by index
        self._previous: dict[tuple[int, str], torch.Tensor] | None = None  # trainable, last call

    # ------------------------------------------------------------------ main
    def compute(self, model: nn.Module | None, step: int, gather: Any = None) -> dict[str, float]:
        """Run the probe batch once and return the flat per-layer series for ``step``.

        Collective under ``torch.distributed``: every rank calls it in lockstep.

        Args:
            model: the module whose blocks ``layout`` describes (an engine's unwrapped module).
            step: the training step (only used in messages; keys carry no step).
            gather: for ZeRO-3 partitioned parameters, the engine's
                ``gathered_parameters(names, modifier_rank)``: ``update_ratio`` gathers one
                layer's trainable parameters at a time; the forward gathers by itself.

        Returns:
            ``{"diag/<measure>/layers.<i>": value, ..., "diag/probe_loss": loss}``, the same on
            every rank.

        Raises:
            RuntimeError: ZeRO-3 partitioned parameters with ``grad_norm`` in the measures
                (use the engine's per-layer gradient norms), or without ``gather`` for
                ``update_ratio``.
        """
        eng = self.engine
        eng.check(model, self.measures, gather)
        want = set(self.measures)
        run = eng.run_probe(model, self.batch, self.kind, "grad_norm" in want)
        layout = eng.layout()
        infos, total = list(layout.layers), layout.num_layers
        if self._reference is None and "drift" in want:
            self._reference = {
                info.index: o.detach().clone() for info, o in zip(infos, run.outputs, strict=True)
            }
        # [angular sums | drift sums | token counts] per global layer, then (loss sum, count)
        sums = torch.zeros(3 * total + 2, dtype=torch.float64)
        keep = run.token_mask
        if eng.counts_activations():
            if "angular" in want:
                for i, total_sum in _angular_sums(infos, run).items():
                    sums[i] = total_sum
            for info, y in zip(infos, run.outputs, strict=True):
                i = info.index
                if "drift" in want:
                    ref = self._reference[i].to(y.device)  # type: ignore[index]
                    sums[total + i] = _token_sum(angular_distance(y.float(), ref.float()), keep)
                sums[2 * total + i] = float(keep.sum()) if keep is not None else y[..., 0].numel()
        if run.loss is not None:
            sums[3 * total] = run.loss
            sums[3 * total + 1] = 1.0
        all_reduce_sum(sums)
        out: dict[str, float] = {"diag/probe_loss": float(sums[3 * total] / sums[3 * total + 1])}
        if run.grads is not None:
            out.update(self._grad_norms(infos, run.grads))
        counts = sums[2 * total : 3 * total]
        for name, base in (("angular", 0), ("drift", total)):
            if name in want:
                for i in eng.reported():
                    out[f"diag/{name}/layers.{i}"] = float(sums[base + i] / counts[i])
        del run
        if "update_ratio" in want:
            out.update(self._update_ratio(model, infos, total, gather))
        return out

    def _grad_norms(
        self, infos: Sequence[LayerInfo], grads: list[list[torch.Tensor]]
    ) -> dict[str, float]:
        world = get_world_size()
        out = {}
        for info, layer in zip(infos, grads, strict=True):
            flat = (
                torch.cat([g.detach().float().flatten() for g in layer])
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
    def _update_ratio(
        self, model: nn.Module | None, infos: Sequence[LayerInfo], total: int, gather: Any
    ) -> dict[str, float]:
        eng = self.engine
        now: dict[tuple[int, str], torch.Tensor] = {}
        counted: dict[tuple[int, str], bool] = {}
        for info in infos:  # one layer's trainable parameters whole at a time
            mine = [(n, p) for n, p in info.module.named_parameters() if p.requires_grad]
            with eng.gathered(model, [p for _, p in mine], gather):
                for n, p in mine:
                    now[(info.index, n)] = p.detach().float().cpu().clone()
                    counted[(info.index, n)] = eng.counts_param(p)
        prev, self._previous = self._previous, now
        if prev is None:
            return {}
        sums = torch.zeros(2 * total, dtype=torch.float64)  # [num | den] per global layer
        for key, w in now.items():
            if key in prev and counted[key]:
                i = key[0]
                sums[i] += (w.double() - prev[key].double()).pow(2).sum()
                sums[total + i] += prev[key].double().pow(2).sum()
        all_reduce_sum(sums)
        return {
            f"diag/update_ratio/layers.{i}": (
                math.sqrt(float(sums[i])) / math.sqrt(float(sums[total + i]))
                if sums[total + i] > 0
                else 0.0
            )
            for i in eng.reported()
        }


def _angular_sums(infos: Sequence[LayerInfo], run: ProbeRun) -> dict[int, float]:
    """Per global layer index, the sum over kept tokens of ``d(input, output)``.

    Layers with consecutive global indices form a chain (the output of one is the input of the
    next): each chain goes through one :class:`AngularAccumulator`, the same computation as
    :func:`layerfreeze.diagnostics.trace.run_trace` (a whole model is one chain; a pipeline stage
    or a virtual-pipeline chunk is one).
    """
    out: dict[int, float] = {}
    start = 0
    for end in range(1, len(infos) + 1):
        if end < len(infos) and infos[end].index == infos[end - 1].index + 1:
            continue
        states = [run.inputs[start], *run.outputs[start:end]]
        acc = AngularAccumulator(len(states))
        acc.update(states, run.token_mask)
        for j in range(end - start):
            out[infos[start + j].index] = float(acc.token_sum[j, j + 1])
        start = end
    return out


def _token_sum(d: torch.Tensor, keep: torch.Tensor | None) -> float:
    """Sum in float64 of the per-token distances ``d`` over the kept tokens."""
    return float((d[keep] if keep is not None else d).double().sum())
