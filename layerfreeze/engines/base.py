"""The ``EngineAdapter`` Protocol: what a training engine adapter offers the recipe (no base class).

An adapter owns everything engine-specific (process groups, sharding, optimizer construction,
checkpoint format) and nothing about policies: the plan is applied by
:func:`layerfreeze.apply.apply_plan` before the adapter builds its optimizer, and the adapter only
reads ``requires_grad`` and the plan's optimizer groups. ``DeepSpeedRunner`` in
:mod:`layerfreeze.engines.deepspeed` satisfies it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import nn


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
        """Number of data-parallel ranks."""
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
    ) -> Path:
        """Atomic checkpoint under ``ckpt_dir``; returns the committed directory."""
        ...

    def load_checkpoint(
        self, ckpt_dir: str | os.PathLike, tag: str | None = None
    ) -> dict[str, Any]:
        """Resume (phase, weights, optimizer, counters); returns this rank's client state."""
        ...

    def gathered_parameters(
        self, names: Sequence[str] | None = None, modifier_rank: int | None = None
    ) -> AbstractContextManager[None]:
        """Context in which parameters are whole on every rank (for export)."""
        ...

    def consolidated_state_dict(self) -> dict[str, Any] | None:
        """Whole model state dict on rank 0, None elsewhere."""
        ...
