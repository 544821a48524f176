"""Sensitivity hooks on a megatron-core model (tensor and pipeline parallel): the Megatron twin of
:class:`layerfreeze.diagnostics.hooks.SensitivityHooks`.

Run (what ``train.py`` does for ``engine: megatron`` every ``diagnostics.every_steps`` steps)::

    from layerfreeze.engines.megatron.diagnostics import MegatronSensitivityHooks
    hooks = MegatronSensitivityHooks(runner, probe_ids, ["update_ratio", "drift", "angular"])
    stats = hooks.compute(runner.model, step)   # every rank, in lockstep; the same dict on each

One :meth:`MegatronSensitivityHooks.compute` is one ``forward_only`` pass of the probe batch
through the runner's pipeline schedule (``get_forward_backward_func``, the chunks in eval mode,
dropout off) with a forward pre-hook and a forward hook on every ``TransformerLayer`` this rank
holds; the hooks are removed when the call ends, also after an exception. Nothing touches the
gradient buffers, ``requires_grad`` or the optimizer.

Per layer (global index ``i``), keys ``diag/<measure>/layers.<i>``, as the Hugging Face hooks:

* ``angular``: token mean of the angular distance between the layer's input and output;
* ``drift``: token mean of the angular distance between the layer's output now and at the
  first call;
* ``update_ratio``: ``||W_now - W_prev||_F / ||W_prev||_F`` over the layer's trainable
  parameters against the previous call (tensor-parallel shards: squares summed over the TP
  group; 0 without trainable parameters; absent on the first call).

Plus ``diag/probe_loss``: next-token NLL of the probe batch over the model's real vocabulary
(``runner.hf_config.vocab_size`` when known; Megatron's padding rows left out), mean over
data-parallel replicas, as the Hugging Face hooks compute it.
``grad_norm`` is not computed here: a probe backward would run through Megatron's DDP gradient
buffers (and its data-parallel reduction), and the gradients of frozen parameters, which the
Hugging Face measure includes, do not exist under Megatron. Log the engine's per-layer gradient
norms of the training loss (``logging.per_layer_every``) instead.

Parallelism: each pipeline stage measures the layers it holds; layer activations (``[s, b, h]``)
are replicated across tensor-parallel ranks, so only TP rank 0 adds them (with sequence
parallelism each TP rank holds its own part of the sequence and every rank adds its part); each
data-parallel replica passes its own probe sequences. Per-layer sums and token counts are then
all-reduced over the world, so every rank returns the numbers of the union of the probe batches
for every global layer.

Memory: the first call's output of every local layer on the probe batch (``L_local * b * s * h``
elements) and a CPU float32 copy of this rank's shards of the trainable layer parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from megatron.core import parallel_state as ps
from torch import nn

from layerfreeze.diagnostics.angular import angular_distance
from layerfreeze.diagnostics.hooks import HOOK_MEASURES
from layerfreeze.utils.dist import all_reduce_sum

__all__ = ["MEGATRON_MEASURES", "MegatronSensitivityHooks"]

#: The measures :class:`MegatronSensitivityHooks` computes (``grad_norm`` is not one of them).
MEGATRON_MEASURES: tuple[str, ...] = tuple(m for m in HOOK_MEASURES if m != "grad_norm")


def _unwrap(module: nn.Module) -> nn.Module:
    while hasattr(module, "module") and isinstance(module.module, nn.Module):
        module = module.module
    return module


def _hidden_in(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    h = kwargs.get("hidden_states")
    if isinstance(h, torch.Tensor):
        return h
    raise RuntimeError("MegatronSensitivityHooks: a layer was called without hidden_states.")


def _hidden_out(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


class _LayerRecorder:
    """Context manager: the input and output of every layer of this rank (first call only)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.inputs: list[torch.Tensor | None] = [None] * len(modules)
        self.outputs: list[torch.Tensor | None] = [None] * len(modules)
        self._handles: list[Any] = []

    def __enter__(self) -> _LayerRecorder:
        try:
            self._register()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _register(self) -> None:
        for i, m in enumerate(self.modules):

            def pre(_m: nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
                if self.inputs[i] is None:  # the interleaved schedule repeats the batch
                    self.inputs[i] = _hidden_in(args, kwargs).detach().clone()

            def post(_m: nn.Module, args: tuple, kwargs: dict, out: Any, i: int = i) -> None:
                if self.outputs[i] is None:
                    self.outputs[i] = _hidden_out(out).detach().clone()

            self._handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            self._handles.append(m.register_forward_hook(post, with_kwargs=True))

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class MegatronSensitivityHooks:
    """Per-layer update ratios, drift and angular distances of a Megatron model on a probe batch.

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
        measures = list(measures)
        if "grad_norm" in measures:
            raise ValueError(
                "diagnostics.measures: grad_norm is not available with engine: megatron (a probe "
                "backward would go through Megatron's DDP gradient buffers); drop it and log the "
                "engine's per-layer gradient norms (logging.per_layer_every) instead."
            )
        unknown = [m for m in measures if m not in MEGATRON_MEASURES]
        if unknown or not measures:
            raise ValueError(
                f"diagnostics.measures: unknown or empty, got {measures}. "
                f"Choose from {', '.join(MEGATRON_MEASURES)} (engine: megatron)."
            )
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
        self.runner = runner
        self.ids = probe_ids.long()
        self.measures = tuple(m for m in MEGATRON_MEASURES if m in measures)
        self._reference: dict[int, torch.Tensor] | None = None  # first-call outputs, by index
        self._previous: dict[str, torch.Tensor] | None = None  # trainable shards, last call

    # ------------------------------------------------------------------ helpers
    def _contributes_activations(self) -> bool:
        """Whether this rank's activations are its own (not a TP replica of rank 0's)."""
        seq_par = bool(getattr(self.runner.chunks[0].config, "sequence_parallel", False))
        return seq_par or ps.get_tensor_model_parallel_rank() == 0

    def _vocab(self) -> int:
        vocab = int(_unwrap(self.runner.chunks[-1]).vocab_size)  # padded to a multiple of TP
        hf_config = getattr(self.runner, "hf_config", None)
        return min(vocab, int(hf_config.vocab_size)) if hf_config is not None else vocab

    def _forward(self, layers: list[nn.Module]) -> tuple[_LayerRecorder, float | None]:
        """The probe forward; the loss (last stage only, else None) is the next-token NLL of
        the logits cut to the model's real vocabulary (the padding rows Megatron adds to the
        vocabulary would otherwise take probability mass)."""
        from megatron.core.tensor_parallel.mappings import (
            gather_from_tensor_model_parallel_region,
        )

        runner = self.runner
        vocab = self._vocab()
        ids = self.ids.to(runner.device)
        got: list[float] = []

        def loss_func(output: torch.Tensor, loss_mask: Any):
            logits = gather_from_tensor_model_parallel_region(output)[..., :vocab].float()
            nll = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1)
            )
            got.append(float(nll))
            return output.sum() * 0.0, {}

        was = [c.training for c in runner.ddp_chunks]
        for c in runner.ddp_chunks:
            c.eval()
        try:
            with _LayerRecorder(layers) as rec, torch.no_grad():
                runner._run(
                    [{"input_ids": ids}] * runner._eval_copies,
                    forward_only=True,
                    loss_func=loss_func,
                )
        finally:
            for c, w in zip(runner.ddp_chunks, was, strict=True):
                c.train(w)
        return rec, (got[0] if got else None)

    # ------------------------------------------------------------------ main
    def compute(self, model: nn.Module | None, step: int, gather: Any = None) -> dict[str, float]:
        """Run the probe batch once and return the flat per-layer series for ``step``.

        Collective: every rank of the world calls it in lockstep. Same signature as
        :meth:`SensitivityHooks.compute <layerfreeze.diagnostics.hooks.SensitivityHooks.compute>`.

        Args:
            model: ``runner.model`` (or None); the runner's model is what runs.
            step: the training step (keys carry no step).
            gather: ignored (Megatron parameters stay sharded in place).

        Returns:
            ``{"diag/<measure>/layers.<i>": value, ..., "diag/probe_loss": loss}`` for every
            global layer of the model, the same on every rank.

        Raises:
            ValueError: ``model`` is not the runner's model.
        """
        runner = self.runner
        if model is not None and model is not runner.model:
            raise ValueError("MegatronSensitivityHooks.compute: model is not the runner's model.")
        layout = runner.applied.layout
        total = layout.num_layers
        infos = list(layout.layers)
        rec, loss = self._forward([info.module for info in infos])
        mine = self._contributes_activations()
        want = set(self.measures)
        # [angular sums | drift sums | token counts] per global layer, then (loss sum, replicas)
        sums = torch.zeros(3 * total + 2, dtype=torch.float64)
        if "drift" in want and self._reference is None:
            self._reference = {}
            for info, o in zip(infos, rec.outputs, strict=True):
                self._reference[info.index] = o.detach().clone()
        for info, x, y in zip(infos, rec.inputs, rec.outputs, strict=True):
            if x is None or y is None:
                raise RuntimeError(
                    f"MegatronSensitivityHooks: layer {info.index} ({info.name}) did not run in "
                    "the probe forward."
                )
            if not mine:
                continue
            i = info.index
            if "angular" in want:
                sums[i] = float(angular_distance(x.float(), y.float()).double().sum())
            if "drift" in want:
                ref = self._reference[i].to(y.device)
                sums[total + i] = float(angular_distance(y.float(), ref.float()).double().sum())
            sums[2 * total + i] = y.shape[0] * y.shape[1]  # [s, b, h]: tokens
        if loss is not None and ps.get_tensor_model_parallel_rank() == 0:
            sums[3 * total] = loss
            sums[3 * total + 1] = 1.0
        del rec
        all_reduce_sum(sums)
        out: dict[str, float] = {"diag/probe_loss": float(sums[3 * total] / sums[3 * total + 1])}
        counts = sums[2 * total : 3 * total]
        for name, base in (("angular", 0), ("drift", total)):
            if name in want:
                for i in range(total):
                    out[f"diag/{name}/layers.{i}"] = float(sums[base + i] / counts[i])
        if "update_ratio" in want:
            out.update(self._update_ratio())
        return out

    @torch.no_grad()
    def _update_ratio(self) -> dict[str, float]:
        layout = self.runner.applied.layout
        total = layout.num_layers
        now: dict[str, torch.Tensor] = {}
        counted: dict[str, bool] = {}
        tp_rank = ps.get_tensor_model_parallel_rank()
        for info in layout.layers:
            for n, p in info.module.named_parameters():
                if not p.requires_grad:
                    continue
                key = f"{info.index}:{n}"
                now[key] = p.detach().float().cpu().clone()
                # TP shards are disjoint: every TP rank adds its own; replicas: TP rank 0 only
                counted[key] = bool(getattr(p, "tensor_model_parallel", False)) or tp_rank == 0
        prev, self._previous = self._previous, now
        if prev is None:
            return {}
        # [num | den] per global layer; data-parallel replicas hold equal weights: DP rank 0 adds
        sums = torch.zeros(2 * total, dtype=torch.float64)
        if ps.get_data_parallel_rank() == 0:
            for key, w in now.items():
                if key not in prev or not counted[key]:
                    continue
                i = int(key.split(":", 1)[0])
                sums[i] += (w.double() - prev[key].double()).pow(2).sum()
                sums[total + i] += prev[key].double().pow(2).sum()
        all_reduce_sum(sums)
        return {
            f"diag/update_ratio/layers.{i}": (
                math.sqrt(float(sums[i])) / math.sqrt(float(sums[total + i]))
                if sums[total + i] > 0
                else 0.0
            )
            for i in range(total)
        }
