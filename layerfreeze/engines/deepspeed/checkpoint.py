"""DeepSpeed checkpoints of :class:`DeepSpeedRunner`: atomic save, resume, the elastic format.

Owns what goes into a checkpoint directory besides the engine-neutral commit
(:mod:`layerfreeze.checkpoint`): DeepSpeed's own per-rank checkpoint under ``ds/``, weights of
parameters trained in an earlier phase, the layout-independent ``elastic/`` part (each
parameter's whole weight, fp32 master and Adam moments, one owner rank each) from which a run
resumes on another world size or ZeRO stage, and the layerfreeze metadata in the manifest.
The runner's ``save_checkpoint`` / ``load_checkpoint`` call these functions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
from safetensors.torch import load_file, save_file

from layerfreeze import checkpoint as ckpt
from layerfreeze.checkpoint_meta import META_FORMAT, META_KEY, CheckpointMeta
from layerfreeze.client_state import load_client_state, save_client_state
from layerfreeze.engines.common import commit_engine_checkpoint
from layerfreeze.engines.deepspeed.zero_state import (
    _ADAM_STATE_KEYS,
    _balanced_owners,
    _plain_master,
    _relink_optimizer_state,
    _torch_optimizer,
)
from layerfreeze.optim import GroupSpec
from layerfreeze.resume import check_content, engine_problems
from layerfreeze.utils.dist import barrier, broadcast_object, get_rank, get_world_size
from layerfreeze.utils.logging import get_logger, log_rank0

if TYPE_CHECKING:
    from layerfreeze.engines.deepspeed.runner import DeepSpeedRunner

#: The package's logger: records keep the name ``layerfreeze.engines.deepspeed`` whichever module
#: of the package logs them (what users and tests filter on).
logger = get_logger("layerfreeze.engines.deepspeed")

_DS_TAG = "ds"
#: DeepSpeed's own fields of the checkpoint metadata (:class:`CheckpointMeta.engine_state`).
_ENGINE_STATE = {
    "zero_stage": int,
    "world_size": int,
    "trained_frozen_params": list,
    "groups": list,
}
#: Layout-independent part of a checkpoint (see :func:`_save_elastic`).
_ELASTIC_DIR = "elastic"
_ELASTIC_INDEX = "index.json"
_ELASTIC_FORMAT = "layerfreeze.elastic/1"


def _meta(
    runner: DeepSpeedRunner, trainable_only: bool, trained_before: list[str]
) -> CheckpointMeta:
    """The checkpoint metadata of ``runner`` now (the manifest's ``"layerfreeze"`` object)."""
    return CheckpointMeta(
        engine="deepspeed",
        step=runner.global_step,
        phase=runner.phase,
        schedule=runner.schedule.to_dict(),
        plan=runner.schedule.plans[runner.phase].to_dict(),
        trainable_only=trainable_only,
        bad_micro_batches=runner.bad_micro_batches,
        skipped_steps=runner.skipped_steps,
        engine_state={
            "zero_stage": runner.zero_stage,
            "world_size": get_world_size(),
            "trained_frozen_params": trained_before,
            "groups": [s.to_dict() for s in runner._specs],
        },
    )


def save_checkpoint(
    runner: DeepSpeedRunner,
    ckpt_dir: str | os.PathLike,
    step: int | None = None,
    client_state: Mapping[str, Any] | None = None,
    keep_last: int | None = None,
    trainable_only: bool = False,
    run_meta: Mapping[str, Any] | None = None,
) -> Path:
    """:meth:`DeepSpeedRunner.save_checkpoint` (see there; collective)."""
    root = Path(ckpt_dir)
    step = runner.global_step if step is None else step
    trained_before = runner._trained_but_frozen() if trainable_only else []
    staging = ckpt.prepare_staging(root, step) if get_rank() == 0 else None
    staging = Path(broadcast_object(str(staging) if staging else None))
    runner.engine.save_checkpoint(
        str(staging),
        tag=_DS_TAG,
        client_state={META_KEY: {"step": step, "phase": runner.phase}},
        save_latest=False,
        exclude_frozen_parameters=trainable_only,
    )
    if trained_before:
        params = dict(runner.model.named_parameters())
        tensors = {}
        for n in trained_before:  # one parameter gathered at a time
            with runner.gathered_parameters([n]):
                if get_rank() == 0:
                    tensors[n] = params[n].detach().cpu().clone().contiguous()
        if get_rank() == 0:
            save_file(tensors, str(staging / "trained_frozen.safetensors"))
        del tensors
    _save_elastic(runner, staging / _ELASTIC_DIR, trainable_only, trained_before)
    save_client_state(staging / "client", get_rank(), client_state or {})
    barrier()
    return commit_engine_checkpoint(
        root,
        staging,
        step,
        lambda: _meta(runner, trainable_only, trained_before),
        run_meta=run_meta,
        keep_last=keep_last,
        logger=logger,
    )


def load_checkpoint(
    runner: DeepSpeedRunner,
    ckpt_dir: str | os.PathLike,
    tag: str | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """:meth:`DeepSpeedRunner.load_checkpoint` (see there; collective)."""
    info = ckpt.resolve_checkpoint(ckpt_dir, tag)
    if verify:
        check_content(info)
    raw = info.meta.get(META_KEY)
    if not isinstance(raw, dict) or raw.get("format") != META_FORMAT:
        raise ckpt.CheckpointError(
            f"{info.path}: not a layerfreeze DeepSpeed checkpoint (no layerfreeze metadata)."
        )
    meta = CheckpointMeta.from_dict(raw, source=str(info.path))
    problems = engine_problems(meta, engine="deepspeed", schedule=runner.schedule.to_dict())
    if problems:
        raise ckpt.CheckpointError(
            f"{info.path}: cannot resume this run from it: " + "; ".join(problems) + "."
        )
    meta.check_engine_state(_ENGINE_STATE, source=str(info.path))
    saved = meta.engine_state
    specs = _saved_groups(saved["groups"], info.path)
    elastic = saved["world_size"] != get_world_size() or saved["zero_stage"] != runner.zero_stage
    if elastic and not (info.path / _ELASTIC_DIR / _ELASTIC_INDEX).is_file():
        problems.append(
            f"saved with {saved['world_size']} ranks at ZeRO stage {saved['zero_stage']}, this "
            f"run has {get_world_size()} at stage {runner.zero_stage}, and the checkpoint has no "
            f"layout-independent '{_ELASTIC_DIR}/' part (older layerfreeze); resume it on "
            "its own layout"
        )
    if problems:
        raise ckpt.CheckpointError(
            f"{info.path}: cannot resume this run from it: " + "; ".join(problems) + "."
        )
    if meta.phase != runner.phase or [s.to_dict() for s in specs] != [
        s.to_dict() for s in runner._specs
    ]:
        runner._switch_phase(meta.phase, carry=False, specs=specs)
    if elastic:
        log_rank0(
            logger,
            "elastic resume: checkpoint of %d ranks at ZeRO-%d onto %d ranks at ZeRO-%d",
            saved["world_size"], saved["zero_stage"], get_world_size(), runner.zero_stage,
        )
        _load_elastic(runner, info.path / _ELASTIC_DIR, meta.step)
    else:
        _load_ds(runner, info.path, meta)
    runner.global_step = meta.step
    runner.bad_micro_batches = meta.bad_micro_batches
    runner.skipped_steps = meta.skipped_steps
    client_dir = info.path / "client"
    rank = get_rank()
    if not (client_dir / f"rank_{rank:05d}.json").exists():
        rank = 0  # an elastic resume onto more ranks: the new ranks start from rank 0's
    state = load_client_state(client_dir, rank)
    barrier()
    log_rank0(
        logger, "resumed from %s (step %d, phase %d)", info.path, runner.global_step, runner.phase
    )
    return state


def _saved_groups(groups: list[Any], path: Path) -> list[GroupSpec]:
    """The optimizer groups a checkpoint recorded, each checked to be a ``GroupSpec``."""
    specs = []
    for i, g in enumerate(groups):
        try:
            specs.append(GroupSpec(**g))
        except TypeError as e:  # not a mapping, or other keys than GroupSpec's
            raise ckpt.CheckpointError(
                f"{path}: manifest.json {META_KEY}.groups[{i}]: not an optimizer group ({e}), "
                f"got {g!r}. The checkpoint's metadata is damaged or was not written by "
                "layerfreeze; resume from another checkpoint."
            ) from None
    return specs


def _load_ds(runner: DeepSpeedRunner, path: Path, meta: CheckpointMeta) -> None:
    """Load DeepSpeed's own checkpoint (same world size and ZeRO stage as saved)."""
    try:
        load_path, _ = runner.engine.load_checkpoint(
            str(path),
            tag=_DS_TAG,
            load_module_strict=not meta.trainable_only,
        )
    except Exception as e:
        # torch found a damaged file (a checkpoint without checksums, or one changed after
        # it was verified): name the file instead of a deep traceback. Anything else that
        # is not a file torch cannot read goes up unchanged.
        damaged = _unreadable_ds_file(path / _DS_TAG)
        if damaged is None:
            raise
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ckpt.CheckpointError(
            f"{path}: {damaged} cannot be loaded ({type(e).__name__}: {reason}): the "
            "checkpoint is damaged. Resume from an earlier checkpoint or delete this one."
        ) from None
    if load_path is None:
        raise ckpt.CheckpointError(
            f"{path}: DeepSpeed could not load the checkpoint in '{_DS_TAG}/'."
        )
    if meta.engine_state["trained_frozen_params"]:
        tensors = load_file(str(path / "trained_frozen.safetensors"))
        params = dict(runner.model.named_parameters())
        for n in meta.engine_state["trained_frozen_params"]:  # one parameter gathered at a time
            with runner.gathered_parameters([n], modifier_rank=0):
                # ZeRO-3 re-partitions rank 0's values on exit; other stages hold whole copies
                if get_rank() == 0 or runner.zero_stage != 3:
                    with torch.no_grad():
                        params[n].copy_(tensors[n])


def _save_elastic(
    runner: DeepSpeedRunner, directory: Path, trainable_only: bool, trained_before: Sequence[str]
) -> None:
    """Write the layout-independent part of a checkpoint (collective).

    Per parameter: its whole weight (module dtype) and, for a trainable one, its whole fp32
    master and Adam moments. Each parameter has one owner rank (balanced by size) that keeps
    and writes its tensors to ``rank_<r>.safetensors``; at most one parameter is gathered at
    a time, so a rank holds O(model / world) extra CPU bytes. ``index.json`` (rank 0) maps
    every name to its file and holds each group's Adam step and the lr scheduler's state.
    """
    _relink_optimizer_state(runner.engine.optimizer)
    group_steps = runner._step_of_groups()
    params = dict(runner.model.named_parameters())
    step_of = {
        n: st for spec, st in zip(runner._specs, group_steps, strict=True) for n in spec.params
    }
    keep = set(step_of) | set(trained_before)
    names = [n for n in params if not trainable_only or n in keep]
    owners = _balanced_owners(names, params)
    rank = get_rank()
    mine: dict[str, torch.Tensor] = {}
    for n in names:  # the same order on every rank: the gathers below are collective
        p, is_mine = params[n], owners[n] == rank
        with runner.gathered_parameters([n]):
            if is_mine:
                mine[f"weight:{n}"] = p.detach().cpu().clone()
        if n in step_of:
            keys = ("master", *(_ADAM_STATE_KEYS if step_of[n] > 0 else ()))
            for key in keys:
                full = runner._full_fp32(p) if key == "master" else runner._full_state(p, key)
                if is_mine:
                    mine[f"{key}:{n}"] = full.contiguous()
                del full
    directory.mkdir(parents=True, exist_ok=True)
    save_file(mine, str(directory / f"rank_{rank:05d}.safetensors"))
    del mine
    if rank == 0:
        from layerfreeze.utils.io import atomic_write_json

        atomic_write_json(
            directory / _ELASTIC_INDEX,
            {
                "format": _ELASTIC_FORMAT,
                "files": {n: f"rank_{owners[n]:05d}.safetensors" for n in names},
                "trainable": {n: step_of[n] for n in names if n in step_of},
                "group_steps": group_steps,
                "lr_scheduler": runner.lr_scheduler.state_dict(),
                "skipped_steps": int(runner.engine.skipped_steps),
            },
        )


def _load_elastic(runner: DeepSpeedRunner, directory: Path, step: int) -> None:
    """Load the layout-independent part written by :func:`_save_elastic` (collective).

    Every rank reads each whole tensor from the shared checkpoint directory, one parameter
    at a time, and keeps what its layout needs (its partition under ZeRO)."""
    from safetensors import safe_open

    index = json.loads((directory / _ELASTIC_INDEX).read_text(encoding="utf-8"))
    if index.get("format") != _ELASTIC_FORMAT:
        raise ckpt.CheckpointError(
            f"{directory / _ELASTIC_INDEX}: unknown format {index.get('format')!r}, "
            f"expected {_ELASTIC_FORMAT!r}."
        )
    params = dict(runner.model.named_parameters())
    unknown = sorted(set(index["files"]) - set(params))
    missing = sorted({n for n, _ in runner._named_trainable()} - set(index["trainable"]))
    if unknown or missing:
        raise ckpt.CheckpointError(
            f"{directory}: does not match this model ("
            + "; ".join(
                ([f"unknown parameters {unknown[:5]}"] if unknown else [])
                + ([f"no optimizer state for trainable {missing[:5]}"] if missing else [])
            )
            + "). Resume with the model and plan the checkpoint was saved with."
        )
    handles = {
        f: safe_open(str(directory / f), framework="pt")
        for f in sorted(set(index["files"].values()))
    }

    def read(key: str, n: str) -> torch.Tensor | None:
        h = handles[index["files"][n]]
        return h.get_tensor(f"{key}:{n}") if f"{key}:{n}" in h.keys() else None

    for n in index["files"]:  # the same order on every rank
        with runner.gathered_parameters([n], modifier_rank=0):
            # ZeRO-3 re-partitions rank 0's values on exit; other stages hold whole copies
            if get_rank() == 0 or runner.zero_stage != 3:
                with torch.no_grad():
                    params[n].copy_(read("weight", n))
    runner._materialize_state(list(index["group_steps"]))
    opt = _torch_optimizer(runner.engine.optimizer)
    for n, p in runner._named_trainable():
        master = read("master", n)
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            safe_set_full_fp32_param(p, master.to(p.device))
            for key in _ADAM_STATE_KEYS:
                t = read(key, n)
                if t is not None:
                    safe_set_full_optimizer_state(p, t.to(p.device), key)
        else:  # ZeRO-0: torch optimizer over the parameters or their fp32 copies
            hp = _plain_master(runner.engine.optimizer, p)
            with torch.no_grad():
                hp.copy_(master.to(hp.dtype))
                for key in _ADAM_STATE_KEYS:
                    t = read(key, n)
                    if t is not None:
                        opt.state[hp][key].copy_(t)
    runner.lr_scheduler.load_state_dict(index["lr_scheduler"])
    runner.engine.global_steps = step
    runner.engine.global_samples = step * int(runner.engine.train_batch_size())
    runner.engine.skipped_steps = int(index["skipped_steps"])
    barrier()


def _unreadable_ds_file(directory: Path) -> str | None:
    """The first file of a DeepSpeed checkpoint directory torch cannot load (relative to its
    parent), or None when all load; only called after a load failed."""
    for f in sorted(directory.glob("*.pt")):
        try:
            torch.load(str(f), map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - any failure marks the damaged file
            return f"{directory.name}/{f.name}"
    return None
