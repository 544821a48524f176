"""The engine seam: what an engine *module* offers (:class:`EngineModule`), what its runner
offers (:class:`EngineAdapter`), and what the runner can do (:class:`EngineCapabilities`).
No base classes: both engines satisfy the Protocols structurally.

An adapter owns everything engine-specific (process groups, sharding, optimizer construction,
checkpoint format) and nothing about policies: the plan is applied by
:func:`layerfreeze.apply.apply_plan` before the adapter builds its optimizer, and the adapter only
reads ``requires_grad`` and the plan's optimizer groups. ``DeepSpeedRunner`` in
:mod:`layerfreeze.engines.deepspeed` and ``MegatronRunner`` in :mod:`layerfreeze.engines.megatron`
satisfy it; ``train.py``, the evaluation callback and the diagnostics hooks talk to an engine
only through it. :class:`StepOutput` is what one optimizer step reports, on every engine.

``layerfreeze.engines.get_engine(name)`` returns the engine module, which satisfies
:class:`EngineModule` (checks a run config, starts the process group, builds the runner,
describes its config for ``layerfreeze validate``). Code outside ``layerfreeze/engines/`` names
no engine: where behaviour differs between engines it reads the runner's
:attr:`EngineAdapter.capabilities` instead of comparing engine names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["EngineAdapter", "EngineCapabilities", "EngineModule", "StepOutput"]


@dataclass(frozen=True)
class EngineCapabilities:
    """What a runner supports, read by the recipe instead of engine-name checks.

    Attributes:
        export_adapter: ``export_trainable`` writes layerfreeze's adapter format
            (``checkpoint.export_adapter``); False: the run exports only the merged checkpoint.
        sensitivity_measures: the in-training sensitivity measures
            (:data:`layerfreeze.diagnostics.hooks.HOOK_MEASURES`) this runner's
            ``sensitivity_hooks`` compute; empty: no in-training diagnostics.
        unsupported_measures: ``(measure, why)`` for each hook measure it does not compute (the
            recipe logs the reason when a config asks for one).
        partitioned_params: parameters are partitioned across data-parallel ranks (ZeRO-3):
            whole-weight work runs under :meth:`EngineAdapter.gathered_parameters`.
        model_parallel_params: parameters stay tensor-/pipeline-parallel shards even inside
            ``gathered_parameters`` (Megatron); whole tensors come from
            :meth:`EngineAdapter.consolidated_state_dict` / ``export_merged``.
    """

    export_adapter: bool
    sensitivity_measures: frozenset[str]
    unsupported_measures: tuple[tuple[str, str], ...] = ()
    partitioned_params: bool = False
    model_parallel_params: bool = False

    def why_unsupported(self, measure: str) -> str | None:
        """Why ``measure`` is not computed (None when it is, or no reason is recorded)."""
        return dict(self.unsupported_measures).get(measure)


@runtime_checkable
class EngineModule(Protocol):
    """What ``get_engine(name)`` returns: the engine's module-level entry points.

    ``layerfreeze train`` calls ``check_run_config`` before writing anything, then
    ``init_distributed`` and ``runner_from_run_config``; ``layerfreeze validate`` prints
    ``describe_run_config``.
    """

    def check_run_config(self, cfg: Any, world_size: int) -> list[str]:
        """Validate the engine's side of a ``RunConfig`` for ``world_size`` ranks; returns
        warning lines (raises ``ConfigError`` on a bad value)."""
        ...

    def init_distributed(self, backend: str | None = None) -> None:
        """Start (or join) the process group the engine needs."""
        ...

    def runner_from_run_config(
        self,
        cfg: Any,
        *,
        schedule: Any,
        vocab_size: int,
        lr_scheduler: Callable | None = None,
        special_ids: dict[str, int] | None = None,
    ) -> EngineAdapter:
        """Build the model of ``cfg.model``, apply every phase of ``schedule`` and return the
        runner (an :class:`EngineAdapter`)."""
        ...

    def describe_run_config(self, cfg: Any) -> list[str]:
        """Lines ``layerfreeze validate`` prints for the engine (its resolved config or layout
        and notes), for ``WORLD_SIZE`` ranks or the engine's smallest world; CUDA not required
        (raises ``ConfigError`` on a bad value)."""
        ...


@dataclass
class StepOutput:
    """Result of one optimizer step (one accumulation window), identical on every rank.

    Attributes:
        step: the global step this window advanced to (1-based count of optimizer steps).
        loss: mean loss over the window's finite micro-batches and all data-parallel ranks
            (NaN when every micro-batch was bad).
        lr: the scheduled base lr used by this step (a group with ``lr_scale`` 1).
        bad_micro_batches: micro-batches whose loss was NaN/Inf on some rank (their gradients
            were not accumulated).
        skipped: True when every micro-batch was bad: parameters did not move this step.
        grad_norms: per layer group (``layers.<i>`` by global index, ``embeddings``, ...) L2
            norm of the averaged gradient, when requested; empty otherwise.
        phase: plan-schedule phase this step ran in.
        grad_norm: global L2 norm of the gradient this step applied (before clipping), when the
            engine computed one; None otherwise.
    """

    step: int
    loss: float
    lr: float
    bad_micro_batches: int = 0
    skipped: bool = False
    grad_norms: dict[str, float] = field(default_factory=dict)
    phase: int = 0
    grad_norm: float | None = None


@runtime_checkable
class EngineAdapter(Protocol):
    """A model under a layer plan (or plan schedule) being trained by one engine.

    Attributes:
        applied: the ``AppliedPlan`` of the current phase.
        phase: index of the current plan-schedule phase.
        global_step: optimizer steps completed.
        bad_micro_batches: micro-batches skipped for a NaN/Inf loss so far.
        skipped_steps: optimizer steps in which every micro-batch was bad.
    """

    applied: Any
    schedule: Any
    phase: int
    global_step: int
    bad_micro_batches: int
    skipped_steps: int

    @property
    def rank(self) -> int:
        """Global rank of this process."""
        ...

    @property
    def world_size(self) -> int:
        """Number of data-parallel ranks (each consumes its own micro-batches)."""
        ...

    @property
    def data_parallel_rank(self) -> int:
        """This process's data-parallel rank (which shard of the data it reads)."""
        ...

    @property
    def device(self) -> torch.device:
        """Where micro-batches go."""
        ...

    @property
    def model(self) -> nn.Module:
        """This rank's unwrapped module (a pipeline stage holds a slice of the layers)."""
        ...

    def eval_model(self) -> Callable[[torch.Tensor], torch.Tensor] | nn.Module:
        """What the C-Eval/CMMLU scorer and the diagnostics run: a Hugging Face model, or a
        callable ``input_ids [B, T] -> logits [B, T, V]`` that returns the whole logits on every
        rank of a model-parallel group (all of them must call it in lockstep)."""
        ...

    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro-batches per optimizer step."""
        ...

    def iter_layers(self) -> Iterator[tuple[int, nn.Module]]:
        """``(global 0-based layer index, block module)`` of the layers this rank holds."""
        ...

    @staticmethod
    def linear_kinds() -> tuple[type, ...]:
        """Linear module types that adapters (LoRA) wrap under this engine."""
        ...

    def train_step(
        self, micro_batches: Sequence[Mapping[str, Any]], grad_norms: bool = False
    ) -> Any:
        """Forward/backward over one accumulation window and one optimizer step (``StepOutput``)."""
        ...

    def maybe_switch_phase(self, global_step: int | None = None) -> bool:
        """Move to the plan-schedule phase of ``global_step`` if it differs; True when it did."""
        ...

    def save_checkpoint(
        self,
        ckpt_dir: str | os.PathLike,
        step: int | None = None,
        client_state: Mapping[str, Any] | None = None,
        keep_last: int | None = None,
        trainable_only: bool = False,
        run_meta: Mapping[str, Any] | None = None,
    ) -> Path:
        """Atomic checkpoint under ``ckpt_dir``; returns the committed directory. ``run_meta``
        (engine-neutral, e.g. tokenizer / model fingerprints) is stored beside the engine's."""
        ...

    def load_checkpoint(
        self, ckpt_dir: str | os.PathLike, tag: str | None = None, verify: bool = True
    ) -> dict[str, Any]:
        """Resume (phase, weights, optimizer, counters); returns this rank's client state.
        ``verify`` checks the files' sha256 first (False: the caller has just done so)."""
        ...

    def evaluate_loss(self, micro_batch: Mapping[str, Any]) -> float:
        """Loss of one batch without training (mean over data-parallel ranks; collective)."""
        ...

    @property
    def capabilities(self) -> EngineCapabilities:
        """What this runner supports (adapter export, diagnostics measures, partitioning)."""
        ...

    def sensitivity_hooks(self, probe_ids: torch.Tensor, measures: Sequence[str]) -> Any:
        """The in-training sensitivity hooks (``compute(model, step, gather=)``) on the probe
        batch ``probe_ids``; ``measures`` is a non-empty subset of
        ``capabilities.sensitivity_measures``."""
        ...

    def export_trainable(self, out_dir: str | os.PathLike) -> Path | None:
        """The trained tensors and the plan in layerfreeze's adapter format (collective); the
        directory on rank 0, None elsewhere. Only when ``capabilities.export_adapter``."""
        ...

    def gathered_parameters(
        self, names: Sequence[str] | None = None, modifier_rank: int | None = None
    ) -> AbstractContextManager[None]:
        """Context in which the named parameters (default: all) are no longer partitioned
        across data-parallel ranks (ZeRO-3 gathers them; on exit changes made on
        ``modifier_rank`` are re-partitioned). Tensor-/pipeline-parallel shards stay shards
        (``capabilities.model_parallel_params``): with tensor and pipeline parallel size 1,
        every parameter is whole inside the context on every engine."""
        ...

    def consolidated_state_dict(self) -> dict[str, Any] | None:
        """Whole model state dict on rank 0, None elsewhere."""
        ...

    def export_merged(self, out_dir: str | os.PathLike, tokenizer: Any = None) -> Path | None:
        """Write the merged Hugging Face checkpoint (collective); the directory on rank 0."""
        ...

    def close(self) -> None:
        """Release the engine (process-group state, buffers); the runner is unusable after."""
        ...
