"""The ``EngineAdapter`` Protocol: what a training engine adapter offers the recipe (no base class).

An adapter owns everything engine-specific (process groups, sharding, optimizer construction,
checkpoint format) and nothing about policies: the plan is applied by
:func:`layerfreeze.apply.apply_plan` before the adapter builds its optimizer, and the adapter only
reads ``requires_grad`` and the plan's optimizer groups. ``DeepSpeedRunner`` in
:mod:`layerfreeze.engines.deepspeed` and ``MegatronRunner`` in :mod:`layerfreeze.engines.megatron`
satisfy it; ``train.py``, the evaluation callback and the diagnostics hooks talk to an engine
only through it. :class:`StepOutput` is what one optimizer step reports, on every engine.
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

__all__ = ["EngineAdapter", "StepOutput"]


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

    def gathered_parameters(
        self, names: Sequence[str] | None = None, modifier_rank: int | None = None
    ) -> AbstractContextManager[None]:
        """Context in which parameters are whole on every rank (for export)."""
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
