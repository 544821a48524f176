"""Megatron-core runner: a layer plan trained with megatron-core's DDP, optimizer and pipeline schedule.

:class:`MegatronRunner` satisfies the ``EngineAdapter`` Protocol (:mod:`layerfreeze.engines.base`)
the training recipe drives, the way ``DeepSpeedRunner`` does for DeepSpeed:

* the plan is applied (adapters installed, ``requires_grad`` set) *before*
  ``megatron.core.distributed.DistributedDataParallel`` wraps the model, so gradient buffers and
  the (distributed) optimizer hold exactly the trainable parameters;
* the optimizer comes from ``get_megatron_optimizer(OptimizerConfig(...), chunks,
  config_overrides=optimizer_overrides(applied, ...))``: per-policy lr scale and no-decay rules;
* forward/backward runs through ``get_forward_backward_func()`` (1F1B when pipeline-parallel),
  one accumulation window of micro-batch dicts (``input_ids``, ``labels``) per optimizer step,
  with a NaN/Inf guard agreed across data-parallel ranks;
* plan-schedule phase switches rebuild DDP and the optimizer and carry the fp32 master weights
  and Adam moments of parameters that stay trainable;
* checkpoints (:mod:`~layerfreeze.engines.megatron.checkpoint`) are atomic, weights by global
  key with TP shards gathered (a trainable-only checkpoint loads into any TP/PP layout with
  :meth:`MegatronRunner.load_trainable_weights`); full resume
  (:meth:`MegatronRunner.load_checkpoint`) needs the same layout, unless the runner saves with
  ``checkpoint_format="dist"`` (:mod:`~layerfreeze.engines.megatron.dist_checkpoint`).
  Optimizer-state access lives in :mod:`~layerfreeze.engines.megatron.optim_state`.

Why this module is over 700 lines: it is one class, the ``EngineAdapter`` surface the recipe
drives, and its training step (DDP / optimizer build, the NaN guard agreed across ranks, the
per-layer gradient norms) shares private state that would only be passed around if cut up; the
bodies of checkpoints, optimizer-state access, the phase switch, evaluation and the merged
export live in the sibling modules named above.

The caller initialises megatron's model-parallel state (``parallel_state.initialize_model_parallel``)
and builds the model for this rank's stage; :meth:`MegatronRunner.close` tears it down.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from layerfreeze.engines.base import EngineCapabilities, StepOutput
from layerfreeze.engines.common import maybe_switch_phase, unwrap_module
from layerfreeze.engines.megatron import checkpoint as mcheckpoint
from layerfreeze.engines.megatron import evaluation, optim_state
from layerfreeze.engines.megatron.dist_checkpoint import FORMATS, check_supported
from layerfreeze.engines.megatron.optim_state import optimizer_state_numel
from layerfreeze.engines.megatron.provider import apply_megatron_plan, optimizer_overrides
from layerfreeze.engines.megatron.switch import switch_phase
from layerfreeze.utils.logging import get_logger

__all__ = ["MegatronRunner", "optimizer_state_numel"]

logger = get_logger(__name__)

_IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------------


class MegatronRunner:
    """Trains a megatron-core model under a layer plan or plan schedule (what ``train.py`` drives).

    Usage (after ``parallel_state.initialize_model_parallel(tp, pp)`` and building this rank's
    ``GPTModel``; see ``launch/megatron_example.py``)::

        runner = MegatronRunner(model, schedule=schedule, lr=1e-4, weight_decay=0.1,
                                gradient_accumulation_steps=4)
        for step in range(runner.global_step, total_steps):
            out = runner.train_step(next_window())   # list of GAS {"input_ids", "labels"} dicts
            if out.step % save_every == 0:
                runner.save_checkpoint(ckpt_dir, client_state={"data": loader.state_dict()})
        runner.close()

    Every rank of a data-parallel replica (its TP and PP ranks) passes the same micro-batches;
    replicas differ by :attr:`data_parallel_rank`.

    Args:
        model: this rank's ``GPTModel`` (a pipeline stage), or the list of its virtual-pipeline
            chunks; not yet wrapped in DDP. Adapters of every schedule phase are installed here
            unless ``applied`` is given.
        plan: a plan spec (single phase), or
        schedule: a ``PlanSchedule`` spec (several phases), or
        applied: an ``AppliedPlan`` already applied to the model (with ``schedule`` when it was
            applied with ``install=`` of the schedule's later phases).
        lr: peak (base) learning rate.
        weight_decay: default weight decay (policies may override per parameter).
        min_lr: the ``min_lr`` of the Megatron ``OptimizerConfig`` (scaled per group like ``lr``).
        gradient_accumulation_steps: micro-batches per optimizer step (the pipeline's
            ``num_microbatches``).
        clip_grad: global gradient-norm clip (0 disables).
        adam_beta1, adam_beta2, adam_eps: AdamW hyper-parameters.
        use_distributed_optimizer: shard optimizer state over data-parallel ranks (Megatron's
            distributed optimizer; DDP then reduce-scatters gradients).
        lr_scheduler: callable ``optimizer -> torch lr scheduler``. It drives the *unscaled*
            base lr (the optimizer it gets holds one group with lr ``lr``); each Megatron
            parameter group then gets ``base lr * its lr scale``. None keeps ``lr`` constant.
        loss_fn: ``(token_losses [b, s], loss_mask [b, s]) -> scalar`` on the last pipeline
            stage; default: mean over unmasked tokens (Hugging Face causal-LM loss).
        optimizer_config: extra ``OptimizerConfig`` fields (e.g. ``{"bf16": True}``).
        ddp_config: extra ``DistributedDataParallelConfig`` fields.
        hf_config: the model's Hugging Face config (needed by :meth:`export_merged` only).
        shift_labels: micro-batch ``labels`` follow the Hugging Face convention (aligned with
            ``input_ids``; the runner shifts them by one, the last position is ignored). False:
            ``labels[t]`` already is the token after ``input_ids[t]`` (Megatron's convention and
            that of layerfreeze's ``PackedDataset``). Label ``-100`` is ignored either way.
        checkpoint_format: how :meth:`save_checkpoint` stores weights and optimizer state:
            ``safetensors`` (whole tensors by global key, optimizer state per rank: full resume
            needs the same layout) or ``dist`` (megatron-core distributed checkpointing: full
            resume at another TP / PP / virtual-pipeline layout; plain optimizer only, see
            :mod:`~layerfreeze.engines.megatron.dist_checkpoint`). :meth:`load_checkpoint`
            reads either.
    """

    def __init__(
        self,
        model: nn.Module | Sequence[nn.Module],
        *,
        plan: Any = None,
        schedule: Any = None,
        applied: Any = None,
        lr: float,
        weight_decay: float = 0.0,
        min_lr: float = 0.0,
        gradient_accumulation_steps: int = 1,
        clip_grad: float = 1.0,
        adam_beta1: float = 0.9,
        adam_beta2: float = 0.999,
        adam_eps: float = 1e-8,
        use_distributed_optimizer: bool = False,
        lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        optimizer_config: Mapping[str, Any] | None = None,
        ddp_config: Mapping[str, Any] | None = None,
        hf_config: Any = None,
        shift_labels: bool = True,
        checkpoint_format: str = "safetensors",
    ):
        from layerfreeze.schedule import PlanSchedule

        if not ps.model_parallel_is_initialized():
            raise RuntimeError(
                "MegatronRunner: megatron's model-parallel state is not initialised. Call "
                "megatron.core.parallel_state.initialize_model_parallel(tp, pp) and build the "
                "model for this rank before creating the runner."
            )
        if int(gradient_accumulation_steps) < 1:
            raise ValueError(
                f"gradient_accumulation_steps: must be >= 1, got {gradient_accumulation_steps}."
            )
        if plan is not None and schedule is not None:
            raise ValueError(
                "MegatronRunner: pass plan= or schedule=, not both (a plan is a one-phase schedule)."
            )
        chunks = list(model) if isinstance(model, (list, tuple, nn.ModuleList)) else [model]
        pp = ps.get_pipeline_model_parallel_world_size()
        if len(chunks) > 1 and int(gradient_accumulation_steps) < pp:
            raise ValueError(
                f"gradient_accumulation_steps: the interleaved pipeline schedule ({len(chunks)} "
                f"virtual chunks) needs at least as many micro-batches as pipeline stages ({pp}), "
                f"got {gradient_accumulation_steps}."
            )
        if any(isinstance(c, DistributedDataParallel) for c in chunks):
            raise ValueError(
                "MegatronRunner: the model is already wrapped in DistributedDataParallel. Pass the "
                "bare model: the plan must set requires_grad before DDP builds its gradient buffers."
            )
        self.chunks: list[nn.Module] = chunks
        self._root: nn.Module = chunks[0] if len(chunks) == 1 else nn.ModuleList(chunks)
        if schedule is None:
            if plan is None and applied is None:
                raise ValueError("MegatronRunner: pass plan=, schedule= or applied=.")
            schedule = PlanSchedule.single(plan if plan is not None else applied.plan)
        self.schedule = PlanSchedule.parse(schedule)
        if applied is None:
            applied = apply_megatron_plan(
                self._root, self.schedule.plans[0], install=tuple(self.schedule.plans[1:])
            )
        elif applied.plan.to_dict() != self.schedule.plans[0].to_dict():
            raise ValueError(
                f"MegatronRunner: applied= trains {applied.plan} but the schedule starts with "
                f"{self.schedule.plans[0]}. Apply the schedule's first plan (install= the others)."
            )
        if checkpoint_format not in FORMATS:
            raise ValueError(
                f"checkpoint.format: must be one of {', '.join(FORMATS)}, got "
                f"{checkpoint_format!r}."
            )
        self.checkpoint_format = checkpoint_format
        self.applied = applied
        self.hf_config = hf_config
        self.shift_labels = bool(shift_labels)
        self.lr = float(lr)
        self.min_lr = float(min_lr)
        self.weight_decay = float(weight_decay)
        self._gas = int(gradient_accumulation_steps)
        self._loss_fn = loss_fn or _masked_mean
        self._opt_kwargs = dict(
            optimizer="adam",
            lr=self.lr,
            min_lr=self.min_lr,
            weight_decay=self.weight_decay,
            adam_beta1=float(adam_beta1),
            adam_beta2=float(adam_beta2),
            adam_eps=float(adam_eps),
            clip_grad=float(clip_grad),
            use_distributed_optimizer=bool(use_distributed_optimizer),
        )
        self._opt_kwargs.update(dict(optimizer_config or {}))
        cfg0 = self.chunks[0].config
        self._opt_kwargs.setdefault("params_dtype", cfg0.params_dtype)
        self._opt_kwargs.setdefault("bf16", cfg0.params_dtype == torch.bfloat16)
        self._opt_kwargs.setdefault("fp16", cfg0.params_dtype == torch.float16)
        self._ddp_kwargs = dict(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=bool(self._opt_kwargs["use_distributed_optimizer"]),
        )
        self._ddp_kwargs.update(dict(ddp_config or {}))
        # The base-lr schedule lives on a one-group tracker so it survives optimizer rebuilds and
        # ranks without trainable parameters; every Megatron group gets base lr * its lr scale.
        self._tracker = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=self.lr)
        self._tracker._opt_called = True  # never stepped itself; silences torch's order warning
        self.lr_scheduler = lr_scheduler(self._tracker) if lr_scheduler is not None else None
        self.phase = 0
        self.global_step = 0
        self.bad_micro_batches = 0
        self.skipped_steps = 0
        self.ddp_chunks: list[DistributedDataParallel] = []
        self.optimizer: Any = None
        self._backward_bad = [False]  # set at the start of each loss backward (see _build)
        self._hooks: list[Any] = []
        if checkpoint_format == "dist":
            check_supported(self)
        self._build()

    # ---- construction ----------------------------------------------------------------------

    def _build(self) -> None:
        """Wrap the chunks in DDP and build the optimizer from the current ``requires_grad``."""
        trainable = {n for n, p in self._root.named_parameters() if p.requires_grad}
        expected = set(self.applied.trainable_names())
        if trainable != expected:
            raise AssertionError(
                "requires_grad is not final before Megatron DDP: trainable but not in the plan "
                f"{sorted(trainable - expected)[:5]}; in the plan but frozen "
                f"{sorted(expected - trainable)[:5]}"
            )
        self.ddp_chunks = []
        for i, chunk in enumerate(self.chunks):
            ddp_cfg = DistributedDataParallelConfig(**self._ddp_kwargs)
            self.ddp_chunks.append(
                DistributedDataParallel(
                    config=chunk.config, ddp_config=ddp_cfg, module=chunk, disable_bucketing=i > 0
                )
            )
        config = self.chunks[0].config
        config.finalize_model_grads_func = finalize_model_grads
        no_sync = [c.no_sync for c in self.ddp_chunks]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        config.grad_sync_func = None
        config.param_sync_func = None
        opt_cfg = OptimizerConfig(**self._opt_kwargs)
        self.optimizer = get_megatron_optimizer(
            opt_cfg,
            self.ddp_chunks,
            config_overrides=optimizer_overrides(
                self.applied, lr=self.lr, min_lr=self.min_lr, weight_decay=self.weight_decay
            ),
        )
        self._apply_lr()
        # Bad micro-batches: on the chunk computing the loss, a backward that starts from a bad
        # loss leaves zero gradients (its own parameters and what it sends upstream), even
        # where the NaN/Inf values in its saved activations would turn a zero into NaN.
        self._hooks = []
        for chunk in self.chunks:
            if getattr(unwrap_module(chunk), "post_process", True):
                for p in chunk.parameters():
                    if p.requires_grad:
                        self._hooks.append(p.register_hook(self._mask_grad))

    def _mask_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad) if self._backward_bad[0] else grad

    def _teardown(self) -> None:
        """Detach the current DDP wrappers: their gradient hooks stay registered on the
        parameters' accumulators, so they are emptied (no bucket lookups, no buffers kept)."""
        for c in self.ddp_chunks:
            c.param_to_bucket_group = {}
            c.buffers, c.bucket_groups = [], []
            c.expert_parallel_buffers, c.expert_parallel_bucket_groups = [], []
        for _, p in self._root.named_parameters():
            for attr in ("main_grad", "grad_added_to_main_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)
            p.grad = None
        for h in getattr(self, "_hooks", []):
            h.remove()
        self._hooks = []
        self.ddp_chunks = []
        self.optimizer = None

    # ---- Protocol: facts -------------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        """This rank's unwrapped module (a ``ModuleList`` of chunks under virtual pipelining)."""
        return self._root

    @property
    def rank(self) -> int:
        """Global rank."""
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        """Data-parallel size (each replica reads its own micro-batches)."""
        return ps.get_data_parallel_world_size()

    @property
    def data_parallel_rank(self) -> int:
        """This rank's data-parallel rank (which data shard it reads)."""
        return ps.get_data_parallel_rank()

    @property
    def device(self) -> torch.device:
        """Where micro-batches go (the model's device)."""
        for p in self._root.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro-batches per optimizer step."""
        return self._gas

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The Megatron optimizer's parameter groups (``lr``, ``lr_mult``, ``weight_decay``, ...)."""
        return list(self.optimizer.param_groups)

    def iter_layers(self) -> Iterator[tuple[int, nn.Module]]:
        """``(global layer index, TransformerLayer)`` of the layers this rank holds."""
        for layer in self.applied.layout.layers:
            yield layer.index, layer.module

    @staticmethod
    def linear_kinds() -> tuple[type, ...]:
        """Linear module types adapters wrap under Megatron (tensor-parallel linears)."""
        return (ColumnParallelLinear, RowParallelLinear)

    # ---- learning rate ---------------------------------------------------------------------

    @property
    def base_lr(self) -> float:
        """The scheduled, unscaled lr (a group with lr scale 1 uses it)."""
        return float(self._tracker.param_groups[0]["lr"])

    def _apply_lr(self) -> None:
        base = self.base_lr
        for g in self.optimizer.param_groups:
            g["lr"] = base * float(g.get("lr_mult", 1.0))
            g["weight_decay"] = float(g.get("start_wd", self.weight_decay)) * float(
                g.get("wd_mult", 1.0)
            )

    # ---- optimizer state access --------------------------------------------------------------

    def _owner(self, param: nn.Parameter) -> Any:
        return optim_state.owner(self.optimizer, param)

    def _local_state(self, param: nn.Parameter) -> tuple[dict[str, torch.Tensor], slice | None]:
        """See :func:`~layerfreeze.engines.megatron.optim_state.local_state`."""
        return optim_state.local_state(self.optimizer, param)

    def _full_state(self, param: nn.Parameter) -> dict[str, torch.Tensor]:
        """See :func:`~layerfreeze.engines.megatron.optim_state.full_state` (collective over the
        data-parallel group under the distributed optimizer)."""
        distributed = bool(self._opt_kwargs["use_distributed_optimizer"])
        return optim_state.full_state(self.optimizer, param, distributed)

    def _set_state(self, param: nn.Parameter, full: Mapping[str, torch.Tensor]) -> None:
        optim_state.set_state(self.optimizer, param, full)

    def optimizer_state_numel(self) -> dict[str, int]:
        """See :func:`.optim_state.optimizer_state_numel` (collective)."""
        return optimizer_state_numel(self.optimizer)

    def grad_buffer_numel(self) -> int:
        """Elements in this rank's DDP gradient buffers (padding excluded): the trainable
        parameters it holds, never a frozen one."""
        total = 0
        for c in self.ddp_chunks:
            for buf in c.buffers + c.expert_parallel_buffers:
                total += sum(p.numel() for p in buf.params)
        return total

    # ---- plan-schedule phases ---------------------------------------------------------------

    def maybe_switch_phase(self, global_step: int | None = None) -> bool:
        """Switch to the phase ``global_step`` falls in (default: the current step), if different.

        Returns:
            True when a switch happened.
        """
        return maybe_switch_phase(self, global_step)

    def _switch_phase(self, target: int, carry: bool) -> None:
        switch_phase(self, target, carry)

    # ---- forward / backward ------------------------------------------------------------------

    def _batch(
        self, mb: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(input_ids, shifted labels, loss mask) on the model's device."""
        ids = mb["input_ids"].to(self.device)
        mask = mb.get("attention_mask")
        if mask is not None and not bool(torch.all(mask != 0)):
            raise ValueError(
                "micro-batch attention_mask: padding (zeros) is not supported by the Megatron "
                "runner; pack sequences to full length (the recipe's PackedDataset does) or drop "
                "the mask."
            )
        labels = mb.get("labels")
        if labels is None:
            return ids, None, None
        labels = labels.to(self.device)
        if self.shift_labels:  # Hugging Face convention: labels are the inputs, shift by one
            shifted = torch.full_like(labels, _IGNORE_INDEX)
            shifted[:, :-1] = labels[:, 1:]
            labels = shifted
        loss_mask = (labels != _IGNORE_INDEX).float()
        return ids, labels.clamp(min=0), loss_mask

    def _run(
        self,
        micro_batches: Sequence[Mapping[str, Any]],
        forward_only: bool,
        loss_func: Callable[..., Any],
    ) -> list[Any]:
        """One pass of megatron's schedule over ``micro_batches``; returns the last stage's
        per-micro-batch ``loss_func`` outputs (empty on other stages)."""
        shapes = {tuple(mb["input_ids"].shape) for mb in micro_batches}
        if len(shapes) != 1:
            raise ValueError(
                f"micro-batches: every input_ids of one window must have one shape, got {sorted(shapes)}."
            )
        b, t = next(iter(shapes))

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            ids, labels, loss_mask = self._batch(mb)
            pos = torch.arange(t, device=ids.device).unsqueeze(0).expand(b, t)
            inner = unwrap_module(model)
            stage_input = getattr(getattr(inner, "decoder", None), "input_tensor", None)
            if (
                not forward_only
                and getattr(inner, "post_process", False)
                and isinstance(stage_input, torch.Tensor)
                and stage_input.requires_grad
            ):
                stage_input.register_hook(self._mask_grad)  # what goes to the previous stage
            out = model(ids, pos, None, labels=labels)
            return out, lambda output: loss_func(output, loss_mask)

        iters: Any = [iter(micro_batches) for _ in self.ddp_chunks]
        fb = get_forward_backward_func()
        return fb(
            forward_step_func=forward_step,
            data_iterator=iters if len(iters) > 1 else iters[0],
            model=self.ddp_chunks if len(self.ddp_chunks) > 1 else self.ddp_chunks[0],
            num_microbatches=len(micro_batches),
            seq_length=t,
            micro_batch_size=b,
            forward_only=forward_only,
        )

    def _from_last_stage(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as held by this pipeline's last stage, on every rank of the pipeline group."""
        if ps.get_pipeline_model_parallel_world_size() == 1:
            return t
        dist.broadcast(
            t,
            src=ps.get_pipeline_model_parallel_last_rank(),
            group=ps.get_pipeline_model_parallel_group(),
        )
        return t

    def train_step(
        self, micro_batches: Sequence[Mapping[str, Any]], grad_norms: bool = False
    ) -> StepOutput:
        """Run one optimizer step over ``gradient_accumulation_steps`` micro-batches.

        Switches plan-schedule phase first when the step crosses a boundary. A micro-batch whose
        loss is NaN/Inf on any data-parallel rank contributes zero gradient on every rank
        (counted in ``bad_micro_batches``): the chunk computing the loss zeroes its parameters'
        gradients and the gradient it sends to the previous pipeline stage. When every
        micro-batch is bad, or a reduced gradient is still not finite (non-finite activations
        on an earlier stage), no parameter moves (counted in ``skipped_steps``).

        Args:
            micro_batches: exactly ``gradient_accumulation_steps`` dicts with ``input_ids`` and
                ``labels`` of one shape (label convention: ``shift_labels``).
            grad_norms: also return per-layer-group gradient norms (``layers.<global i>``, ...).

        Returns:
            The :class:`StepOutput` of this step (same values on every rank).
        """
        gas = self._gas
        if len(micro_batches) != gas:
            raise ValueError(
                f"train_step: got {len(micro_batches)} micro-batches, gradient_accumulation_steps "
                f"is {gas}. Pass exactly {gas}."
            )
        if any(mb.get("labels") is None for mb in micro_batches):
            raise ValueError(
                "train_step: every micro-batch needs 'labels' (see shift_labels for the convention)."
            )
        self.maybe_switch_phase()
        for c in self.ddp_chunks:
            c.train()
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        dp_group = ps.get_data_parallel_group()
        dp_size = ps.get_data_parallel_world_size()
        flags: list[float] = []
        losses: list[float] = []

        def loss_func(output: torch.Tensor, loss_mask: torch.Tensor):
            loss = self._loss_fn(output.float(), loss_mask)
            value = float(loss.detach())
            finite = math.isfinite(value)
            agree = torch.tensor(
                [value if finite else 0.0, 0.0 if finite else 1.0], dtype=torch.float64
            )
            dist.all_reduce(agree, group=dp_group)  # every last-stage rank runs this in step
            bad = float(agree[1]) > 0
            flags.append(1.0 if bad else 0.0)
            if bad:
                loss = output.sum() * 0.0
            else:
                losses.append(float(agree[0]) / dp_size)
            loss = _MarkBackward.apply(loss, self._backward_bad, bad)
            return loss, {"loss": loss.detach()}

        try:
            self._run(micro_batches, forward_only=False, loss_func=loss_func)
        finally:
            self._backward_bad[0] = False
        summary = torch.zeros(gas + 2, dtype=torch.float64)
        if flags:
            summary[:gas] = torch.tensor(flags, dtype=torch.float64)
            summary[gas] = sum(losses)
            summary[gas + 1] = len(losses)
        summary = self._from_last_stage(summary)
        bad = int(summary[:gas].sum())
        mean_loss = float(summary[gas] / summary[gas + 1]) if summary[gas + 1] > 0 else float("nan")
        finite_grads = self._grads_finite()
        skipped = bad == gas or not finite_grads
        norms = self.layer_grad_norms() if grad_norms and finite_grads else {}
        lr = self.base_lr
        self._apply_lr()
        grad_norm = None
        if skipped:
            for c in self.ddp_chunks:
                c.zero_grad_buffer()
            self.optimizer.zero_grad()
        else:
            ok, gnorm, _ = self.optimizer.step()
            if not ok:
                skipped = True
            grad_norm = None if gnorm is None else float(gnorm)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.global_step += 1
        self.bad_micro_batches += bad
        self.skipped_steps += int(skipped)
        return StepOutput(
            step=self.global_step,
            loss=mean_loss,
            lr=lr,
            bad_micro_batches=bad,
            skipped=skipped,
            grad_norms=norms,
            phase=self.phase,
            grad_norm=grad_norm,
        )

    def _grads_finite(self) -> bool:
        """Whether every reduced gradient is finite on every rank (collective over the world)."""
        local = 0.0
        for c in self.ddp_chunks:
            for buf in c.buffers + c.expert_parallel_buffers:
                if not bool(torch.isfinite(buf.grad_data).all()):
                    local = 1.0
        t = torch.tensor([local], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t[0]) == 0.0

    def _group_index(self) -> tuple[list[str], dict[str, int]]:
        keys = [f"layers.{i}" for i in range(self.applied.layout.num_layers)]
        keys += ["embeddings", "final_norm", "lm_head", "other"]
        return keys, {k: i for i, k in enumerate(keys)}

    def layer_grad_norms(self) -> dict[str, float]:
        """L2 norm of the reduced gradient per layer group (``layers.<global i>``, ``embeddings``,
        ``final_norm``, ``lm_head``) over the whole model; groups with no trainable parameter on
        any rank are left out. Collective over all ranks (a stage with every layer frozen joins
        with zeros). Call after the backward pass, before the optimizer step."""
        keys, index = self._group_index()
        sq = torch.zeros(len(keys), dtype=torch.float64)
        has = torch.zeros(len(keys), dtype=torch.float64)
        params = dict(self._root.named_parameters())
        tp_rank = ps.get_tensor_model_parallel_rank()
        dp_rank = ps.get_data_parallel_rank()
        use_do = self._opt_kwargs["use_distributed_optimizer"]
        for group, names in self.applied.layer_groups().items():
            for n in names:
                p = params[n]
                if mcheckpoint.is_tied_copy(n, p):
                    continue
                has[index[group]] = 1.0
                if not getattr(p, "tensor_model_parallel", False) and tp_rank != 0:
                    continue  # replicated across TP: count once
                g = getattr(p, "main_grad", None)
                if g is None:
                    continue
                g = g.detach().float().reshape(-1)
                if use_do:
                    opt = self._owner(p)
                    if opt is None or p not in opt.model_param_group_index_map:
                        continue
                    rng = opt._get_model_param_range_map(p)["param"]
                    g = g[rng.start : rng.end]
                elif dp_rank != 0:
                    continue
                sq[index[group]] += float(g.pow(2).sum())
        if dist.is_initialized():
            dist.all_reduce(sq)
            dist.all_reduce(has, op=dist.ReduceOp.MAX)
        return {k: math.sqrt(float(sq[i])) for i, k in enumerate(keys) if has[i] > 0}

    # ---- evaluation (layerfreeze.engines.megatron.evaluation) --------------------------------

    def evaluate_loss(self, micro_batch: Mapping[str, Any]) -> float:
        """Loss of one batch without training: mean over data-parallel ranks, on every rank
        (collective); see :func:`.evaluation.evaluate_loss`."""
        return evaluation.evaluate_loss(self, micro_batch)

    def eval_model(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A callable ``input_ids [B, T] -> logits [B, T, V]`` (float32, CPU) for the scorer and
        diagnostics, called in lockstep by the model-parallel group; see
        :func:`.evaluation.eval_model`."""
        return evaluation.eval_model(self)

    # ---- checkpoints (layerfreeze.engines.megatron.checkpoint) -------------------------------

    def _global_keys(self) -> dict[str, str]:
        """Local parameter name -> global key (see :func:`.checkpoint.global_keys`)."""
        return mcheckpoint.global_keys(self)

    def save_checkpoint(
        self,
        ckpt_dir: str | os.PathLike,
        step: int | None = None,
        client_state: Mapping[str, Any] | None = None,
        keep_last: int | None = None,
        trainable_only: bool = False,
        run_meta: Mapping[str, Any] | None = None,
    ) -> Path:
        """Save an atomic checkpoint (every rank must call it, also stages with no trainable
        parameter); see :func:`layerfreeze.engines.megatron.checkpoint.save_checkpoint`.

        Args:
            ckpt_dir: checkpoint root.
            step: step to name the checkpoint by (default ``global_step``).
            client_state: per-rank state, returned by :meth:`load_checkpoint`.
            keep_last: keep only this many newest checkpoints (None keeps all).
            trainable_only: store only parameters that are, or were in an earlier phase,
                trainable, plus every adapter (frozen base weights come from the base model).
            run_meta: engine-neutral run metadata stored beside the engine's.

        Returns:
            The committed checkpoint directory.
        """
        return mcheckpoint.save_checkpoint(
            self, ckpt_dir, step, client_state, keep_last, trainable_only, run_meta
        )

    def load_trainable_weights(
        self, ckpt_dir: str | os.PathLike, tag: str | None = None, strict: bool = True
    ) -> list[str]:
        """Load the weights of a checkpoint saved under *any* TP/PP layout; optimizer state and
        counters are not touched (see :func:`.checkpoint.load_trainable_weights`).

        Args:
            ckpt_dir: checkpoint root (follows ``latest``) or one checkpoint directory.
            tag: checkpoint name under the root; default ``latest``.
            strict: require a tensor for every adapter parameter of this rank.

        Returns:
            Local names of the parameters that were loaded.
        """
        return mcheckpoint.load_trainable_weights(self, ckpt_dir, tag, strict)

    def load_checkpoint(
        self, ckpt_dir: str | os.PathLike, tag: str | None = None, verify: bool = True
    ) -> dict[str, Any]:
        """Resume from a checkpoint saved by :meth:`save_checkpoint` on the same layout (every
        rank must call it): phase, weights, optimizer state, lr schedule and counters (see
        :func:`.checkpoint.load_checkpoint`).

        Args:
            ckpt_dir: checkpoint root (follows ``latest``) or one checkpoint directory.
            tag: checkpoint name under the root (``step_00000010``); default ``latest``.
            verify: check every file against the sha256 in the manifest first.

        Returns:
            This rank's ``client_state`` as given to :meth:`save_checkpoint`.

        Raises:
            CheckpointError: nothing loadable, a damaged checkpoint, another schedule, or another
                parallel layout (then use :meth:`load_trainable_weights`).
        """
        return mcheckpoint.load_checkpoint(self, ckpt_dir, tag, verify)

    # ---- whole parameters, export, teardown ---------------------------------------------------

    @property
    def capabilities(self) -> EngineCapabilities:
        """No adapter export; the hook measures but ``grad_norm``; parameters are never
        partitioned across data-parallel ranks, and stay TP/PP shards."""
        from layerfreeze.engines.megatron.diagnostics import MEGATRON_MEASURES

        return EngineCapabilities(
            export_adapter=False,
            sensitivity_measures=frozenset(MEGATRON_MEASURES),
            unsupported_measures=((
                "grad_norm",
                "grad_norm is not computed with engine: megatron (a probe backward would go "
                "through Megatron's DDP gradient buffers); the engine's per-layer gradient norms "
                "(logging.per_layer_every) stand in",
            ),),
            partitioned_params=False,
            model_parallel_params=True,
        )

    def sensitivity_hooks(self, probe_ids: torch.Tensor, measures: Sequence[str]) -> Any:
        """:class:`~layerfreeze.engines.megatron.diagnostics.MegatronSensitivityHooks`: TP/PP
        stages measured in place, merged over ranks (collective ``compute``)."""
        from layerfreeze.engines.megatron.diagnostics import MegatronSensitivityHooks

        return MegatronSensitivityHooks(self, probe_ids, list(measures))

    def export_trainable(self, out_dir: str | os.PathLike) -> Path | None:
        """Not offered (``capabilities.export_adapter`` is False): use :meth:`export_merged`.

        Raises:
            NotImplementedError: always.
        """
        raise NotImplementedError(
            "export_trainable: the Megatron runner does not write layerfreeze's adapter format; "
            "use export_merged (its sidecar holds the adapters)."
        )

    @contextlib.contextmanager
    def gathered_parameters(
        self, names: Sequence[str] | None = None, modifier_rank: int | None = None
    ) -> Iterator[None]:
        """Protocol context (see :meth:`EngineAdapter.gathered_parameters`): Megatron never
        partitions parameters across data-parallel ranks, so this context changes nothing;
        TP shards and PP stages stay as they are (``capabilities.model_parallel_params``; use
        :meth:`consolidated_state_dict` or :meth:`export_merged` for whole tensors)."""
        yield

    def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model by global key (TP gathered, every stage) on rank 0; None elsewhere.
        Collective over all ranks."""
        tensors = mcheckpoint.stage_tensors(self, None)
        writer = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
        parts = [None] * dist.get_world_size()
        dist.gather_object(tensors if writer else {}, parts if self.rank == 0 else None, dst=0)
        if self.rank != 0:
            return None
        out: dict[str, torch.Tensor] = {}
        for p in parts:
            out.update(p or {})
        return out

    def export_merged(self, out_dir: str | os.PathLike, tokenizer: Any = None) -> Path | None:
        """Write a merged Hugging Face checkpoint (collective; every rank calls it): see
        :func:`layerfreeze.engines.megatron.hf_export.export_runner_to_hf`.

        Returns:
            The export directory on rank 0, None on other ranks.

        Raises:
            ValueError: the runner was built without ``hf_config``.
        """
        from layerfreeze.engines.megatron.hf_export import export_runner_to_hf

        return export_runner_to_hf(self, out_dir, tokenizer=tokenizer)

    def close(self, destroy_model_parallel: bool = True) -> None:
        """Release DDP buffers and the optimizer; tear down megatron's model-parallel state
        unless ``destroy_model_parallel`` is False. The runner is unusable after."""
        self._teardown()
        if destroy_model_parallel and ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()


# --------------------------------------------------------------------------------------------
# module functions
# --------------------------------------------------------------------------------------------


class _MarkBackward(torch.autograd.Function):
    """Identity on the loss whose backward first records whether this micro-batch is bad (the
    gradient hooks of the loss chunk read it while the rest of its backward runs)."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, box: list, bad: bool) -> torch.Tensor:
        ctx.box, ctx.bad = box, bad
        return loss.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.box[0] = ctx.bad
        return grad, None, None


def _masked_mean(token_losses: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token loss over unmasked tokens (the Hugging Face causal-LM loss)."""
    mask = loss_mask.to(token_losses.dtype)
    return (token_losses * mask).sum() / mask.sum().clamp(min=1.0)
