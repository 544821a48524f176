"""The training loop on DeepSpeed: :class:`DeepSpeedRunner`, what ``layerfreeze train`` drives.

Owns the runner: engine build over the plan's optimizer groups, ``train_step`` (forward/backward
over one accumulation window with a NaN/Inf guard, per-layer-group grad norms), plan-schedule
phase switches (through :func:`~layerfreeze.engines.deepspeed.switch.switch_engine_plan`),
exports and the :class:`~layerfreeze.engines.base.EngineAdapter` surface. Its checkpoints are
:mod:`layerfreeze.engines.deepspeed.checkpoint`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
from deepspeed.utils import safe_get_full_grad
from torch import nn

from layerfreeze.engines.base import EngineCapabilities, StepOutput
from layerfreeze.engines.common import (
    agree_finite,
    default_loss,
    maybe_switch_phase,
    trained_then_frozen,
)
from layerfreeze.engines.deepspeed import checkpoint as _ckpt
from layerfreeze.engines.deepspeed.config import _check_config, _zero_stage, load_config
from layerfreeze.engines.deepspeed.dropin import _apply_plan
from layerfreeze.engines.deepspeed.engine import _ds_initialize
from layerfreeze.engines.deepspeed.switch import destroy_engine, switch_engine_plan
from layerfreeze.engines.deepspeed.zero_state import (
    _full_fp32,
    _full_state,
    _materialize_state,
    _named_trainable,
    _state_tensors,
    _step_of_groups,
    _torch_optimizer,
    gathered_parameters,
    optimizer_state_numel,
)
from layerfreeze.optim import (
    GroupSpec,
    ScaledLRScheduler,
    assert_requires_grad_final,
    group_specs,
    torch_groups,
)
from layerfreeze.utils.dist import barrier, get_rank, get_world_size
from layerfreeze.utils.logging import get_logger, log_rank0

__all__ = ["DeepSpeedRunner"]

#: The package's logger: records keep the name ``layerfreeze.engines.deepspeed`` whichever module
#: of the package logs them (what users and tests filter on).
logger = get_logger("layerfreeze.engines.deepspeed")


class DeepSpeedRunner:
    """Trains a model under a layer plan or plan schedule on DeepSpeed (what ``train.py`` drives).

    Usage::

        runner = DeepSpeedRunner(model, ds_config, schedule=schedule, lr=1e-4, weight_decay=0.1)
        for step in range(runner.global_step, total_steps):
            out = runner.train_step(next_window())        # list of GAS micro-batch dicts
            if out.step % save_every == 0:
                runner.save_checkpoint(ckpt_dir, client_state={"data": loader.state_dict()})

    Phase switches happen inside :meth:`train_step` when the global step crosses a phase boundary.

    Adapters (LoRA ``A``, prefixes, gates) draw their initial values from torch's global
    generator when the plan is applied, and torch seeds it from the OS in every new process: call
    ``torch.manual_seed`` before applying a plan for runs that repeat bit for bit (``layerfreeze
    train`` does, from ``train.seed``; two seeded 2-rank runs are tested bit-identical).

    Args:
        model: the model (adapters of every phase are installed here unless ``applied`` is given).
        config: DeepSpeed config (dict or JSON path); ``optimizer`` must be Adam/AdamW.
        plan: a plan spec (single phase), or
        schedule: a ``PlanSchedule`` spec (several phases), or
        applied: an ``AppliedPlan`` already applied to ``model`` (with ``schedule`` when it was
            applied with ``install=`` of the schedule's later phases).
        lr: base lr (default ``config.optimizer.params.lr``).
        weight_decay: default weight decay (default config's or 0).
        lr_scheduler: callable ``optimizer -> scheduler``; default: the config's ``scheduler``.
        loss_fn: ``(engine, micro_batch) -> loss tensor``; default calls ``engine(**micro_batch)``
            and reads ``.loss`` (Hugging Face causal LMs with ``labels`` in the batch).
    """

    def __init__(
        self,
        model: nn.Module,
        config: str | os.PathLike | Mapping[str, Any],
        *,
        plan: Any = None,
        schedule: Any = None,
        applied: Any = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        lr_scheduler: Callable | None = None,
        loss_fn: Callable[[Any, Mapping[str, Any]], torch.Tensor] | None = None,
    ):
        from layerfreeze.schedule import PlanSchedule

        self.config = load_config(config)
        self.lr = _check_config(self.config, lr)
        self.weight_decay = (
            float(self.config["optimizer"]["params"].get("weight_decay", 0.0))
            if weight_decay is None
            else float(weight_decay)
        )
        if plan is not None and schedule is not None:
            raise ValueError(
                "DeepSpeedRunner: pass plan= or schedule=, not both (a plan is a "
                "one-phase schedule)."
            )
        if schedule is None:
            if plan is None and applied is None:
                raise ValueError("DeepSpeedRunner: pass plan=, schedule= or applied=.")
            schedule = PlanSchedule.single(plan if plan is not None else applied.plan)
        self.schedule = PlanSchedule.parse(schedule)
        if applied is None:
            applied = _apply_plan(model, None, self.schedule)
        elif applied.plan.to_dict() != self.schedule.plans[0].to_dict():
            raise ValueError(
                f"DeepSpeedRunner: applied= trains {applied.plan} but the schedule starts with "
                f"{self.schedule.plans[0]}. Apply the schedule's first plan (install= the others)."
            )
        self.applied = applied
        self.model = model
        self.zero_stage = _zero_stage(self.config)
        self._lr_scheduler_fn = lr_scheduler
        self._loss_fn = loss_fn or default_loss
        self.phase = 0
        self.global_step = 0
        self.bad_micro_batches = 0
        self.skipped_steps = 0
        self.engine: Any = None
        self.lr_scheduler: ScaledLRScheduler | None = None
        #: fp32 bytes this rank held across the last phase switch (master + Adam moments)
        self.switch_carry_bytes = 0
        self._specs: list[GroupSpec] = []
        self._build_engine(group_specs(self.applied, self.weight_decay))

    # ---- engine construction ---------------------------------------------------------------

    def _take_engine(self) -> Any:
        """The engine, leaving ``self.engine`` None (the caller then owns the only reference)."""
        engine, self.engine = self.engine, None
        return engine

    def _build_engine(self, specs: list[GroupSpec]) -> None:
        assert_requires_grad_final(self.model, specs, "deepspeed.initialize")
        groups = torch_groups(self.model, specs, self.lr)
        engine, _opt, _loader, sched = _ds_initialize(
            self.model,
            json.loads(json.dumps(self.config)),
            groups,
            lr_scheduler=self._lr_scheduler_fn,
        )
        self.engine, self.lr_scheduler, self._specs = engine, sched, specs

    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro-batches per optimizer step (from the DeepSpeed config)."""
        return int(self.engine.gradient_accumulation_steps())

    @property
    def rank(self) -> int:
        """Global rank."""
        return get_rank()

    @property
    def world_size(self) -> int:
        """Number of data-parallel ranks."""
        return get_world_size()

    @property
    def data_parallel_rank(self) -> int:
        """Data-parallel rank (every rank is a data-parallel rank under DeepSpeed ZeRO)."""
        return get_rank()

    @property
    def device(self) -> torch.device:
        """Where micro-batches go (the engine's device)."""
        return self.engine.device

    def eval_model(self) -> nn.Module:
        """The model for scoring and diagnostics: the Hugging Face module itself (under ZeRO-3
        DeepSpeed's hooks gather each layer's parameters inside its forward, so every rank must
        run the same number of forwards)."""
        return self.model

    def export_merged(self, out_dir: str | os.PathLike, tokenizer: Any = None) -> Path | None:
        """Merged Hugging Face checkpoint from the whole parameters (collective).

        Under ZeRO-3 the export streams: one layer group at a time is gathered, merged and
        written by rank 0 as its own safetensors shard (see :func:`layerfreeze.export.export_merged`),
        so no rank ever holds the whole model. Other stages hold whole parameters already.

        Returns:
            The export directory on rank 0, None on other ranks.
        """
        from layerfreeze.export import export_merged

        out = None
        if self.zero_stage == 3:
            path = export_merged(
                self.applied, out_dir, tokenizer=tokenizer,
                gather=self.gathered_parameters, is_writer=get_rank() == 0,
            )
            out = Path(path) if get_rank() == 0 else None
        elif get_rank() == 0:
            out = Path(export_merged(self.applied, out_dir, tokenizer=tokenizer))
        barrier()
        return out

    @property
    def capabilities(self) -> EngineCapabilities:
        """Adapter export; every hook measure but ``grad_norm`` under ZeRO-3 (whose
        partitioned parameters the hooks gather layer by layer)."""
        from layerfreeze.diagnostics.hooks import HOOK_MEASURES
        from layerfreeze.diagnostics.measures import is_partitioned

        partitioned = is_partitioned(self.model)
        unsupported: tuple[tuple[str, str], ...] = ()
        if partitioned:
            unsupported = ((
                "grad_norm",
                "grad_norm needs whole parameters and ZeRO-3 partitions them; the engine's "
                "per-layer gradient norms (logging.per_layer_every) stand in",
            ),)
        skip = {m for m, _ in unsupported}
        return EngineCapabilities(
            export_adapter=True,
            sensitivity_measures=frozenset(m for m in HOOK_MEASURES if m not in skip),
            unsupported_measures=unsupported,
            partitioned_params=partitioned,
            model_parallel_params=False,
        )

    def sensitivity_hooks(self, probe_ids: torch.Tensor, measures: Sequence[str]) -> Any:
        """:class:`~layerfreeze.diagnostics.hooks.SensitivityHooks` on this model's layout
        (under ZeRO-3 pass ``gather=self.gathered_parameters`` to ``compute``)."""
        from layerfreeze.diagnostics.hooks import SensitivityHooks

        return SensitivityHooks(self.applied.layout, probe_ids, list(measures))

    def export_trainable(self, out_dir: str | os.PathLike) -> Path | None:
        """The trained tensors and the plan in layerfreeze's adapter format (collective).

        :func:`layerfreeze.export.save_trainable` on rank 0, with the trainable parameters
        gathered under ZeRO-3 (they are small for adapter plans); ``layerfreeze export
        --adapter-dir`` turns plain-LoRA ones into a PEFT / vLLM adapter.

        Returns:
            The directory on rank 0, None on other ranks.
        """
        from layerfreeze.export import save_trainable

        out = None
        with self.gathered_parameters([n for n, _ in self._named_trainable()]):
            if get_rank() == 0:
                out = Path(save_trainable(self.applied, out_dir))
        barrier()
        return out

    def close(self) -> None:
        """Destroy the DeepSpeed engine (idempotent)."""
        if self.engine is not None:
            destroy_engine(self.engine)
            self.engine = None

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's groups (``name``, ``lr``, ``lr_scale``, ``weight_decay``, ...)."""
        return _torch_optimizer(self.engine.optimizer).param_groups

    def iter_layers(self) -> Iterator[tuple[int, nn.Module]]:
        """``(global layer index, block module)`` pairs of the model."""
        for layer in self.applied.layout.layers:
            yield layer.index, layer.module

    @staticmethod
    def linear_kinds() -> tuple[type, ...]:
        """Linear module types adapters wrap under this engine (plain ``nn.Linear``)."""
        return (nn.Linear,)

    # ---- optimizer state access (ZeRO-aware, collective under ZeRO) -------------------------

    def _named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        return _named_trainable(self.model, self._specs)

    def _full_fp32(self, p: nn.Parameter) -> torch.Tensor:
        return _full_fp32(self.engine, p)

    def _full_state(self, p: nn.Parameter, key: str) -> torch.Tensor:
        return _full_state(self.engine, p, key)

    def optimizer_state_numel(self) -> dict[str, int]:
        """See :func:`optimizer_state_numel` (collective under ZeRO)."""
        return optimizer_state_numel(self.engine)

    def _step_of_groups(self) -> list[int]:
        return _step_of_groups(self.engine)

    def _materialize_state(self, steps: Sequence[int]) -> None:
        _materialize_state(self.engine, steps)

    def _optimizer_state_snapshot(self) -> dict[int, tuple[torch.Tensor, dict[str, Any]]]:
        """This rank's Adam state (its own partitions only), to undo the lr-0 step of a window
        whose micro-batches were all bad: DeepSpeed must still run its step (collectives, grad
        reset), but the moments must not decay and the step count must not advance."""
        opt = _torch_optimizer(self.engine.optimizer)
        saved = {}
        for tensors in _state_tensors(self.engine.optimizer):
            for p in tensors:
                st = opt.state.get(p, {})
                saved[id(p)] = (p, {
                    k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                    for k, v in st.items()
                })
        return saved

    def _restore_optimizer_state(
        self, saved: Mapping[int, tuple[torch.Tensor, Mapping[str, Any]]]
    ) -> None:
        opt = _torch_optimizer(self.engine.optimizer)
        for p, before in saved.values():
            st = opt.state.get(p)
            if not st:
                continue
            for k, v in st.items():
                if k in before:
                    if isinstance(v, torch.Tensor):
                        v.copy_(before[k])
                    else:
                        st[k] = before[k]
                elif isinstance(v, torch.Tensor):
                    # no state before this step (the run's first window was all bad): zero
                    # moments at step 0 are exactly what Adam starts from
                    v.zero_()
                else:
                    st[k] = 0

    # ---- plan-schedule phases ---------------------------------------------------------------

    def maybe_switch_phase(self, global_step: int | None = None) -> bool:
        """Switch to the phase ``global_step`` falls in (default: the current step), if different.

        Returns:
            True when a switch happened.
        """
        return maybe_switch_phase(self, global_step)

    def _switch_phase(
        self, target: int, carry: bool, specs: list[GroupSpec] | None = None
    ) -> None:
        """Rebuild the engine for phase ``target``; carry master weights + Adam state when asked."""
        new_plan = self.schedule.plans[target]
        # Neither the runner nor the old scheduler may hold the old engine while the new one is
        # built: the old optimizer state would stay alive next to the new (a LISA switch would
        # peak at two phases' states). switch_engine_plan drops the last reference.
        position = self.lr_scheduler.position()
        self.lr_scheduler = None

        def build(new_specs: list[GroupSpec]) -> Any:
            self._build_engine(new_specs)
            self.lr_scheduler.carry_from(position)
            return self.engine

        self.engine, self.applied, self._specs, self.switch_carry_bytes = switch_engine_plan(
            self._take_engine(), self.applied, new_plan, self._specs,
            weight_decay=self.weight_decay, build=build, carry=carry, new_specs=specs,
        )
        self.phase = target
        log_rank0(
            logger,
            "plan-schedule phase %d: %s (%d trainable params)",
            target,
            new_plan,
            sum(
                p.numel() if not hasattr(p, "ds_numel") else p.ds_numel
                for _, p in self._named_trainable()
            ),
        )

    # ---- training ---------------------------------------------------------------------------

    def _agree(self, loss: torch.Tensor) -> tuple[bool, float]:
        return agree_finite(loss)

    def _zero_backward(self, micro_batch: Mapping[str, Any]) -> None:
        """Backward of an exact zero through the model (keeps DeepSpeed's per-micro-batch
        communication intact while adding nothing to the accumulated gradients)."""
        ids = micro_batch["input_ids"][:, :1]
        out = self.engine(input_ids=ids)
        logits = out.logits if hasattr(out, "logits") else out[0]
        self.engine.backward(logits.float().sum() * 0.0)

    def layer_grad_norms(self) -> dict[str, float]:
        """L2 norm of the averaged gradient per layer group (call at an accumulation boundary,
        after the last backward and before the step; collective under ZeRO)."""
        params = dict(self.model.named_parameters())
        out = {}
        for group, names in self.applied.layer_groups().items():
            sq = 0.0
            for n in names:
                g = safe_get_full_grad(params[n])
                if g is not None:
                    sq += float(g.detach().float().pow(2).sum())
            if names:
                out[group] = math.sqrt(sq)
        return out

    def train_step(
        self, micro_batches: Sequence[Mapping[str, Any]], grad_norms: bool = False
    ) -> StepOutput:
        """Run one optimizer step over ``gradient_accumulation_steps`` micro-batches.

        Switches plan-schedule phase first when the step crosses a boundary. A micro-batch whose
        loss is NaN/Inf on any rank is skipped on every rank (counted in ``bad_micro_batches``);
        when all are bad the step runs with lr 0, so no parameter moves (counted in
        ``skipped_steps``).

        Args:
            micro_batches: exactly ``gradient_accumulation_steps`` dicts for the model (e.g.
                ``input_ids`` and ``labels`` tensors on this rank's device).
            grad_norms: also return per-layer-group gradient norms (one all-gather per parameter).

        Returns:
            The :class:`StepOutput` of this step (same values on every rank).
        """
        gas = self.gradient_accumulation_steps
        if len(micro_batches) != gas:
            raise ValueError(
                f"train_step: got {len(micro_batches)} micro-batches, the DeepSpeed config's "
                f"gradient_accumulation_steps is {gas}. Pass exactly {gas}."
            )
        self.maybe_switch_phase()
        self.engine.train()
        losses, bad = [], 0
        norms: dict[str, float] = {}
        for i, mb in enumerate(micro_batches):
            loss = self._loss_fn(self.engine, mb)
            is_bad, mean_loss = self._agree(loss)
            if is_bad:
                bad += 1
                del loss
                self._zero_backward(mb)
            else:
                losses.append(mean_loss)
                self.engine.backward(loss)
            if i == gas - 1:
                if grad_norms:
                    norms = self.layer_grad_norms()
                skipped = bad == gas
                if skipped:
                    for g in self.param_groups:
                        g["lr"] = 0.0
            lr = self.lr_scheduler.base_lr
            saved = self._optimizer_state_snapshot() if i == gas - 1 and skipped else None
            self.engine.step()
            if saved is not None:
                self._restore_optimizer_state(saved)
        grad_norm = self.engine.get_global_grad_norm()
        self.global_step += 1
        self.bad_micro_batches += bad
        self.skipped_steps += int(skipped)
        return StepOutput(
            step=self.global_step,
            loss=float(np.mean(losses)) if losses else float("nan"),
            lr=lr,
            bad_micro_batches=bad,
            skipped=skipped,
            grad_norms=norms,
            phase=self.phase,
            grad_norm=None if grad_norm is None or skipped else float(grad_norm),
        )

    @torch.no_grad()
    def evaluate_loss(self, micro_batch: Mapping[str, Any]) -> float:
        """Loss of one batch without training (mean over ranks)."""
        self.engine.eval()
        loss = self._loss_fn(self.engine, micro_batch)
        self.engine.train()
        return self._agree(loss)[1]

    # ---- whole parameters, checkpoints (their save / load is checkpoint.py) ------------------

    def _trained_but_frozen(self) -> list[str]:
        return trained_then_frozen(self.applied, self.schedule, self.phase)

    @contextlib.contextmanager
    def gathered_parameters(
        self, names: Sequence[str] | None = None, modifier_rank: int | None = None
    ):
        """Context in which the named parameters (default: all) are whole on every rank.

        Under ZeRO-3 this gathers the partitions (``deepspeed.zero.GatheredParameters``); on
        exit, changes made on ``modifier_rank`` are re-partitioned. Other stages hold whole
        parameters already. Use it for the final export::

            with runner.gathered_parameters():
                if runner.rank == 0:
                    export_merged(runner.applied, out_dir)
        """
        with gathered_parameters(self.model, names, modifier_rank):
            yield

    def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Whole model state dict (CPU, module dtype) on rank 0; None on other ranks.

        Collective. Under ZeRO-3 the parameters are gathered one at a time (rank 0 builds the
        dict on CPU), never the whole model on a device at once."""
        if self.zero_stage != 3:
            if get_rank() == 0:
                return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            return None
        out: dict[str, torch.Tensor] = {}
        for key, t in self.model.state_dict(keep_vars=True).items():
            if isinstance(t, nn.Parameter) and hasattr(t, "ds_id"):
                with deepspeed.zero.GatheredParameters([t]):
                    if get_rank() == 0:
                        out[key] = t.detach().cpu().clone()
            elif get_rank() == 0:
                out[key] = t.detach().cpu().clone()
        return out if get_rank() == 0 else None

    def save_checkpoint(
        self,
        ckpt_dir: str | os.PathLike,
        step: int | None = None,
        client_state: Mapping[str, Any] | None = None,
        keep_last: int | None = None,
        trainable_only: bool = False,
        run_meta: Mapping[str, Any] | None = None,
    ) -> Path:
        """Save an atomic checkpoint (all ranks must call it).

        Besides DeepSpeed's own checkpoint (per-rank partitions: fastest to reload on the same
        layout) it holds a layout-independent part, ``elastic/``: each parameter's whole weight,
        fp32 master and Adam moments, written by one owner rank each (one parameter gathered at
        a time), from which :meth:`load_checkpoint` resumes on another world size or ZeRO stage.

        The DeepSpeed checkpoint (weights, optimizer, scheduler), this rank's ``client_state``
        (e.g. data position and RNG; JSON + safetensors, no pickle) and the layerfreeze state
        (plan, schedule, phase, optimizer groups) go into a staging directory that is renamed to
        ``<ckpt_dir>/step_<8-digit step>`` once complete; ``latest`` is updated after that.

        Args:
            ckpt_dir: checkpoint root.
            step: step to name the checkpoint by (default ``global_step``).
            client_state: per-rank picklable-free state (tensors, numpy arrays, numbers, strings,
                lists, tuples, str-keyed dicts) returned by :meth:`load_checkpoint`.
            keep_last: keep only this many newest checkpoints (None keeps all).
            trainable_only: store only parameters that are or were trainable (frozen base
                weights are excluded; loading needs the same base model).
            run_meta: engine-neutral run metadata stored beside the engine's (the recipe's
                tokenizer and model fingerprints, see :mod:`layerfreeze.resume`).

        Returns:
            The committed checkpoint directory.
        """
        return _ckpt.save_checkpoint(
            self, ckpt_dir, step, client_state, keep_last, trainable_only, run_meta
        )

    def load_checkpoint(
        self, ckpt_dir: str | os.PathLike, tag: str | None = None, verify: bool = True
    ) -> dict[str, Any]:
        """Resume from a checkpoint saved by :meth:`save_checkpoint` (all ranks must call it).

        Lands in the saved plan-schedule phase with the saved optimizer groups, weights,
        optimizer and scheduler state and counters.

        Args:
            ckpt_dir: checkpoint root (follows ``latest``) or one checkpoint directory.
            tag: checkpoint name under the root (``step_00000010``); default ``latest``.
            verify: check every file against the sha256 in the manifest first (the ranks share
                the reading; see :func:`layerfreeze.resume.verify_content`). The recipe passes
                False for a checkpoint it has just verified.

        Returns:
            This rank's ``client_state`` as given to :meth:`save_checkpoint`.

        Raises:
            CheckpointError: nothing loadable there, a damaged checkpoint, one from another
                plan/schedule, or one from another ZeRO stage or world size without the
                layout-independent part (the message says which).
        """
        return _ckpt.load_checkpoint(self, ckpt_dir, tag, verify)

