"""Sensitivity hooks on a megatron-core model (tensor and pipeline parallel): the Megatron
:class:`~layerfreeze.diagnostics.hooks.HookEngine` behind
:class:`layerfreeze.diagnostics.hooks.SensitivityHooks`.

Run (what ``train.py`` does for ``engine: megatron`` every ``diagnostics.every_steps`` steps)::

    from layerfreeze.engines.megatron.diagnostics import MegatronSensitivityHooks
    hooks = MegatronSensitivityHooks(runner, probe_ids, ["update_ratio", "drift", "angular"])
    stats = hooks.compute(runner.model, step)   # every rank, in lockstep; the same dict on each

The measures are computed by :class:`~layerfreeze.diagnostics.hooks.SensitivityHooks` (see its
module for their definitions); this module only says what differs under Megatron
(:class:`MegatronLayers`). One ``compute`` is one forward of the probe batch through the
runner's public :meth:`eval_model` (its pipeline schedule with ``forward_only``, the chunks in
eval mode, dropout off) with a forward pre-hook and a forward hook on every ``TransformerLayer``
this rank holds; the hooks are removed when the call ends, also after an exception. Nothing
touches the gradient buffers, ``requires_grad`` or the optimizer.

``diag/probe_loss`` is the next-token NLL of the probe batch over the model's real vocabulary
(``runner.hf_config.vocab_size`` when known; Megatron's padding rows left out), mean over
data-parallel replicas. ``grad_norm`` is not computed here: a probe backward would run through
Megatron's DDP gradient buffers (and its data-parallel reduction), and the gradients of frozen
parameters, which the Hugging Face measure includes, do not exist under Megatron. Log the
engine's per-layer gradient norms of the training loss (``logging.per_layer_every``) instead.

Parallelism: each pipeline stage measures the layers it holds; layer activations (``[s, b, h]``)
are replicated across tensor-parallel ranks, so only TP rank 0 adds them (with sequence
parallelism each TP rank holds its own part of the sequence and every rank adds its part); each
data-parallel replica passes its own probe sequences. ``update_ratio``: tensor-parallel shards
are disjoint (every TP rank adds its own; replicated parameters: TP rank 0), data-parallel
replicas hold equal weights (DP rank 0 adds). Per-layer sums and token counts are all-reduced
over the world, so every rank returns the numbers of the union of the probe batches for every
global layer.

Memory: the first call's output of every local layer on the probe batch (``L_local * b * s * h``
elements), a CPU float32 copy of this rank's shards of the trainable layer parameters, and during
a call the inputs/outputs of the local layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from megatron.core import parallel_state as ps
from torch import nn

from layerfreeze.diagnostics.hooks import (
    HOOK_MEASURES,
    LayerIORecorder,
    ProbeRun,
    SensitivityHooks,
    check_measures,
)
from layerfreeze.diagnostics.probe import ProbeBatch
from layerfreeze.engines.base import EngineAdapter
from layerfreeze.models import ModelLayout

__all__ = ["MEGATRON_MEASURES", "MegatronLayers", "MegatronSensitivityHooks"]

#: The measures :class:`MegatronSensitivityHooks` computes (``grad_norm`` is not one of them).
MEGATRON_MEASURES: tuple[str, ...] = tuple(m for m in HOOK_MEASURES if m != "grad_norm")

_GRAD_NORM = (
    "diagnostics.measures: grad_norm is not available with engine: megatron (a probe "
    "backward would go through Megatron's DDP gradient buffers); drop it and log the "
    "engine's per-layer gradient norms (logging.per_layer_every) instead."
)


class MegatronLayers:
    """The :class:`~layerfreeze.diagnostics.hooks.HookEngine` of a Megatron runner.

    Uses only the runner's :class:`~layerfreeze.engines.base.EngineAdapter` surface:
    ``applied.layout`` (this rank's layers by global index), ``model`` and ``eval_model()``.

    Args:
        runner: the :class:`~layerfreeze.engines.megatron.runner.MegatronRunner` training the
            model.
    """

    unsupported: Mapping[str, str] = {"grad_norm": _GRAD_NORM}
    measures_note = " (engine: megatron)"

    def __init__(self, runner: EngineAdapter) -> None:
        self.runner = runner

    def layout(self) -> ModelLayout:
        return self.runner.applied.layout

    def reported(self) -> Sequence[int]:
        return range(self.layout().num_layers)

    def check(self, model: nn.Module | None, measures: Sequence[str], gather: Any) -> None:
        if model is not None and model is not self.runner.model:
            raise ValueError("MegatronSensitivityHooks.compute: model is not the runner's model.")

    def run_probe(
        self, model: nn.Module | None, batch: ProbeBatch, kind: str, grads: bool
    ) -> ProbeRun:
        """The probe forward through ``runner.eval_model()``; the loss is the next-token NLL of
        the whole logits (gathered over TP, cut to the real vocabulary, broadcast from the last
        stage), added by the last stage's TP rank 0 only."""
        infos = list(self.layout().layers)
        ids = batch.input_ids
        with LayerIORecorder([i.module for i in infos]) as rec:
            logits = self.runner.eval_model()(ids)
        for info, x, y in zip(infos, rec.inputs, rec.outputs, strict=True):
            if x is None or y is None:
                raise RuntimeError(
                    f"MegatronSensitivityHooks: layer {info.index} ({info.name}) did not run in "
                    "the probe forward."
                )
        vocab = logits.shape[-1]
        nll = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1).to(logits.device)
        )
        last_stage = (
            ps.get_pipeline_model_parallel_rank() == ps.get_pipeline_model_parallel_world_size() - 1
        )
        return ProbeRun(
            loss=float(nll) if last_stage and ps.get_tensor_model_parallel_rank() == 0 else None,
            inputs=rec.inputs,  # type: ignore[arg-type]
            outputs=rec.outputs,  # type: ignore[arg-type]
        )

    def counts_activations(self) -> bool:
        """Whether this rank's activations are its own (not a TP replica of rank 0's)."""
        layers = self.layout().layers
        config = getattr(layers[0].module, "config", None) if layers else None
        seq_par = bool(getattr(config, "sequence_parallel", False))
        return seq_par or ps.get_tensor_model_parallel_rank() == 0

    def counts_param(self, param: torch.Tensor) -> bool:
        tp_shard = bool(getattr(param, "tensor_model_parallel", False))
        return (tp_shard or ps.get_tensor_model_parallel_rank() == 0) and (
            ps.get_data_parallel_rank() == 0
        )

    def gathered(
        self, model: nn.Module | None, params: Sequence[torch.Tensor], gather: Any
    ) -> AbstractContextManager[Any]:
        return contextlib.nullcontext()  # shards are measured in place


class MegatronSensitivityHooks(SensitivityHooks):
    """:class:`~layerfreeze.diagnostics.hooks.SensitivityHooks` fed by :class:`MegatronLayers`.

    ``compute(runner.model or None, step)`` is collective (every rank, in lockstep) and returns
    the same dict on every rank, for every global layer; its ``gather`` is ignored.

    Args:
        runner: the :class:`~layerfreeze.engines.megatron.runner.MegatronRunner` training the
            model (its layout carries this rank's global layer indices).
        probe_ids: token ids ``(batch, seq)``, the same on every TP/PP rank of a data-parallel
            replica (replicas may pass their own); no padding (the runner has no attention mask).
            The loss is next-token NLL over positions ``0..seq-2``.
        measures: subset of :data:`MEGATRON_MEASURES`.

    Raises:
        ValueError: unknown or empty measures (``grad_norm`` names the replacement), or
            ``probe_ids`` not a 2-D integer tensor with at least 2 tokens per row.
    """

    def __init__(self, runner: Any, probe_ids: torch.Tensor, measures: Iterable[str]) -> None:
        engine = MegatronLayers(runner)
        measures = list(measures)
        check_measures(measures, engine)
        if (
            not isinstance(probe_ids, torch.Tensor)
            or probe_ids.dim() != 2
            or probe_ids.dtype.is_floating_point
            or probe_ids.shape[1] < 2
        ):
            raise ValueError(
                "probe_ids: expected a (batch, seq) integer tensor with seq >= 2, got "
                f"{type(probe_ids).__name__} {tuple(getattr(probe_ids, 'shape', ()))}."
            )
        super().__init__(None, probe_ids.long(), measures, engine=engine)
        self.runner = runner
