"""Megatron runner checkpoints: weights by global key, the runner's save / resume, any-layout
weight loading.

Weights are stored by *global* key ``<part>.<owner>.<path>``
(``layers.3.lora.mlp.linear_fc1.lora_a.weight``,
``layers.3.base.self_attention.linear_qkv.weight``,
``embeddings.base.embedding.word_embeddings.weight``; ``owner`` is the adapter's policy or
``base``), tensor-parallel shards gathered into whole tensors, so a trainable-only checkpoint
loads into any TP/PP layout (:func:`load_trainable_weights`). Optimizer state is stored per rank;
full resume (:func:`load_checkpoint`) needs the same layout. With the runner's
``checkpoint_format="dist"`` weights and optimizer state go through megatron-core's distributed
checkpointing instead (:mod:`~layerfreeze.engines.megatron.dist_checkpoint`: full resume at
another layout); the metadata's ``storage`` says which, and loading reads either. Every checkpoint is committed
atomically with a sha256 manifest (:mod:`layerfreeze.checkpoint`, :mod:`layerfreeze.resume`).

The functions take the :class:`~layerfreeze.engines.megatron.runner.MegatronRunner` whose
methods of the same name call them (collective where those say so).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from safetensors import safe_open
from safetensors.torch import save_file

from layerfreeze import checkpoint as ckpt
from layerfreeze.checkpoint_meta import META_FORMAT, META_KEY, CheckpointMeta
from layerfreeze.client_state import load_client_state, save_client_state
from layerfreeze.engines.common import commit_engine_checkpoint, trained_then_frozen
from layerfreeze.engines.megatron.dist_checkpoint import load_dist, load_weights_dist, save_dist
from layerfreeze.engines.megatron.optim_state import ADAM_KEYS, inner_optimizers
from layerfreeze.registry import POLICIES
from layerfreeze.resume import check_content, engine_problems, field_diff
from layerfreeze.utils.dist import broadcast_object
from layerfreeze.utils.logging import get_logger, log_rank0

if TYPE_CHECKING:
    from layerfreeze.engines.megatron.runner import MegatronRunner

__all__ = [
    "META_KEY",
    "META_FORMAT",
    "global_keys",
    "stage_tensors",
    "is_tied_copy",
    "layout_meta",
    "save_checkpoint",
    "resolve",
    "load_trainable_weights",
    "load_checkpoint",
]

logger = get_logger(__name__)

_META_KEY, _META_FORMAT = META_KEY, META_FORMAT
#: Megatron's own fields of the checkpoint metadata (``CheckpointMeta.engine_state``);
#: ``storage`` (``safetensors`` / ``dist``) is optional: checkpoints before it are safetensors.
_ENGINE_STATE = {"layout": dict, "num_layers": int, "global_step": int}
#: vocabulary-parallel parameters (rows = the padded vocabulary, split over TP)
_VOCAB_PARAMS = ("word_embeddings.weight", "output_layer.weight")
#: most padding rows two layouts can differ by (Megatron-LM pads to 128 x TP size)
_MAX_VOCAB_PADDING = 128 * 8


def split_full(full: torch.Tensor, param: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This TP rank's shard of a whole tensor (megatron's ``partition_dim`` / ``partition_stride``:
    the whole tensor is cut into ``world * stride`` chunks dealt round-robin to the ranks)."""
    if world == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim, stride = int(param.partition_dim), int(getattr(param, "partition_stride", 1))
    chunk = full.shape[dim] // (world * stride)
    pieces = torch.split(full, chunk, dim=dim)
    return torch.cat(pieces[rank::world], dim=dim)


def gather_tp(param: torch.Tensor, group: Any, world: int) -> torch.Tensor:
    """The whole tensor of a TP-split parameter (collective over the TP group); others as is."""
    local = param.detach()
    if world == 1 or not getattr(param, "tensor_model_parallel", False):
        return local.clone()
    dim, stride = int(param.partition_dim), int(getattr(param, "partition_stride", 1))
    shards = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(shards, local.contiguous(), group=group)
    chunk = local.shape[dim] // stride
    split = [torch.split(s, chunk, dim=dim) for s in shards]  # split[r][j] = chunk j*world + r
    return torch.cat([split[r][j] for j in range(stride) for r in range(world)], dim=dim)


def fit_vocab(full: torch.Tensor, rows: int) -> torch.Tensor:
    """``full`` with its vocabulary rows cut or zero-padded to ``rows`` (layouts pad the
    vocabulary to different multiples of their TP size; the padding rows carry no token)."""
    if full.shape[0] >= rows:
        return full[:rows]
    pad = full.new_zeros((rows - full.shape[0], *full.shape[1:]))
    return torch.cat([full, pad], dim=0)


def is_tied_copy(name: str, param: torch.Tensor) -> bool:
    """The last pipeline stage's copy of tied word embeddings (kept in sync by Megatron)."""
    return bool(getattr(param, "shared_embedding", False)) and name.endswith("output_layer.weight")


def global_keys(runner: MegatronRunner) -> dict[str, str]:
    """Local parameter name -> global key ``<part>.<owner>.<path>`` (see module docstring)."""
    prefixes = {p.param_prefix: name for name, p in POLICIES.items() if p.param_prefix}
    layers = {f"layers.{x.index}": x for x in runner.applied.layout.layers}
    chunk_prefix = len(runner.chunks) > 1
    out = {}
    for part, names in runner.applied._partition().items():
        for n in names:
            if part in layers:
                rel = n[len(layers[part].name) + 1 :]
            else:
                rel = n.split(".", 1)[1] if chunk_prefix else n
            owner = "base"
            for piece in rel.split("."):
                hit = next((pol for pre, pol in prefixes.items() if piece.startswith(pre)), None)
                if hit:
                    owner = hit
                    break
            out[n] = f"{part}.{owner}.{rel}"
    return out


def stage_tensors(runner: MegatronRunner, names: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """Whole (TP-gathered) tensors of this rank's ``names`` (all parameters when None), by
    global key; collective over the TP group. Tied output copies are left out."""
    keys = global_keys(runner)
    params = dict(runner._root.named_parameters())
    group, world = (
        ps.get_tensor_model_parallel_group(),
        ps.get_tensor_model_parallel_world_size(),
    )
    wanted = list(params) if names is None else [n for n in params if n in set(names)]
    out = {}
    for n in wanted:
        if is_tied_copy(n, params[n]):
            continue
        out[keys[n]] = gather_tp(params[n], group, world).cpu().contiguous()
    return out


def write_weights(runner: MegatronRunner, directory: Path, names: Sequence[str] | None) -> None:
    """Write :func:`stage_tensors` of ``names`` as ``stage_<pp>.safetensors`` (by TP rank 0 of
    data-parallel replica 0; collective over the TP group)."""
    tensors = stage_tensors(runner, names)
    if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        pp = ps.get_pipeline_model_parallel_rank()
        save_file(tensors, str(directory / f"stage_{pp:03d}.safetensors"))


@torch.no_grad()
def read_weights(runner: MegatronRunner, directory: Path, required: Sequence[str]) -> list[str]:
    """Copy every tensor this rank holds from ``directory`` (any TP/PP layout); returns the
    local names that were loaded. Raises when a name in ``required`` has no tensor."""
    files = sorted(directory.glob("stage_*.safetensors"))
    if not files:
        raise ckpt.CheckpointError(f"{directory}: no weight files (stage_*.safetensors).")
    keys = global_keys(runner)
    params = dict(runner._root.named_parameters())
    rank, world = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    loaded = []
    with contextlib.ExitStack() as stack:
        found: dict[str, tuple[Path, Any]] = {}
        for f in files:
            h = stack.enter_context(safe_open(str(f), framework="pt"))
            found.update({k: (f, h) for k in h.keys()})
        for n, p in params.items():
            key = keys[n]
            if is_tied_copy(n, p):  # the last stage's copy of tied embeddings
                key = next(
                    (k for k in found if k.endswith(".embedding.word_embeddings.weight")), key
                )
            if key not in found:
                continue
            f, h = found[key]
            full = h.get_tensor(key)
            rows = p.shape[0] * world
            if (
                n.endswith(_VOCAB_PARAMS)
                and getattr(p, "tensor_model_parallel", False)
                and 0 < abs(full.shape[0] - rows) < _MAX_VOCAB_PADDING
            ):
                full = fit_vocab(full, rows)  # layouts pad the vocabulary differently
            shard = split_full(full, p, rank, world)
            if tuple(shard.shape) != tuple(p.shape):
                raise ckpt.CheckpointError(
                    f"{f}: {key} has shape {tuple(full.shape)}, which does not fit {n} "
                    f"{tuple(p.shape)} at tensor-parallel size {world}. The checkpoint belongs "
                    "to another model."
                )
            p.copy_(shard.to(device=p.device, dtype=p.dtype))
            loaded.append(n)
    missing = sorted(set(required) - set(loaded))
    if missing:
        raise ckpt.CheckpointError(
            f"{directory}: no tensor for {[keys[n] for n in missing][:5]}"
            f"{' ...' if len(missing) > 5 else ''}. The checkpoint was saved for another plan."
        )
    return loaded


def layout_meta(runner: MegatronRunner) -> dict[str, Any]:
    """The parallel layout a full checkpoint is tied to (saved in its metadata)."""
    return {
        "tensor_parallel": ps.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": ps.get_pipeline_model_parallel_world_size(),
        "virtual_chunks": len(runner.chunks),
        "data_parallel": ps.get_data_parallel_world_size(),
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "distributed_optimizer": bool(runner._opt_kwargs["use_distributed_optimizer"]),
    }


def save_checkpoint(
    runner: MegatronRunner,
    ckpt_dir: str | os.PathLike,
    step: int | None = None,
    client_state: Mapping[str, Any] | None = None,
    keep_last: int | None = None,
    trainable_only: bool = False,
    run_meta: Mapping[str, Any] | None = None,
) -> Path:
    """Save an atomic checkpoint (every rank must call it, also stages with no trainable
    parameter).

    Layout: ``weights/stage_<pp>.safetensors`` (whole tensors by global key, written by TP
    rank 0 of data-parallel replica 0 of each stage), ``optim/rank_<r>.*`` (this rank's
    master weights, Adam moments and steps), ``client/rank_<r>.*`` (``client_state``), and
    the layerfreeze metadata (plan, schedule, phase, layout, counters) in the manifest.

    Args:
        ckpt_dir: checkpoint root.
        step: step to name the checkpoint by (default ``global_step``).
        client_state: per-rank state (tensors, numpy arrays, numbers, strings, lists, tuples,
            str-keyed dicts), returned by :meth:`load_checkpoint`.
        keep_last: keep only this many newest checkpoints (None keeps all).
        trainable_only: store only parameters that are, or were in an earlier phase,
            trainable, plus every adapter (frozen base weights come from the base model).
        run_meta: engine-neutral run metadata stored beside the engine's (the recipe's
            tokenizer and model fingerprints, see :mod:`layerfreeze.resume`).

    Returns:
        The committed checkpoint directory.
    """
    root = Path(ckpt_dir)
    step = runner.global_step if step is None else step
    staging = ckpt.prepare_staging(root, step) if runner.rank == 0 else None
    staging = Path(broadcast_object(str(staging) if staging else None))
    names = _saved_names(runner) if trainable_only else None
    storage = runner.checkpoint_format
    if storage == "dist":
        save_dist(runner, staging, names)
    else:
        write_weights(runner, staging / "weights", names)
        keys = global_keys(runner)
        params = dict(runner._root.named_parameters())
        optim: dict[str, torch.Tensor] = {}
        for n in runner.applied.trainable_names():
            local, _ = runner._local_state(params[n])
            for k, v in local.items():
                optim[f"{keys[n]}::{k}"] = v.detach().reshape(v.shape).cpu().contiguous().clone()
        (staging / "optim").mkdir(parents=True, exist_ok=True)
        save_file(optim, str(staging / "optim" / f"rank_{runner.rank:05d}.safetensors"))
    save_client_state(
        staging / "runner",
        runner.rank,
        {
            "scheduler": runner.lr_scheduler.state_dict()
            if runner.lr_scheduler is not None
            else {},
            "base_lr": runner.base_lr,
        },
    )
    save_client_state(staging / "client", runner.rank, client_state or {})
    dist.barrier()
    return commit_engine_checkpoint(
        root,
        staging,
        step,
        lambda: CheckpointMeta(
            engine="megatron",
            step=step,
            phase=runner.phase,
            schedule=runner.schedule.to_dict(),
            plan=runner.schedule.plans[runner.phase].to_dict(),
            trainable_only=trainable_only,
            bad_micro_batches=runner.bad_micro_batches,
            skipped_steps=runner.skipped_steps,
            engine_state={
                "layout": layout_meta(runner),
                "num_layers": runner.applied.layout.num_layers,
                "storage": storage,
                "global_step": runner.global_step,
            },
        ),
        run_meta=run_meta,
        keep_last=keep_last,
        logger=logger,
    )


def resolve(
    runner: MegatronRunner, ckpt_dir: str | os.PathLike, tag: str | None, verify: bool = True
) -> tuple[Any, CheckpointMeta]:
    """``(CheckpointInfo, runner metadata)`` of a layerfreeze Megatron checkpoint for this
    model (sha256-verified unless ``verify`` is False).

    Raises:
        CheckpointError: nothing loadable, damaged, another engine, format or layer count.
    """
    info = ckpt.resolve_checkpoint(ckpt_dir, tag)
    if verify:  # sha256 of every file against the manifest, the reading shared by the ranks
        check_content(info)
    meta = info.meta.get(_META_KEY)
    if not isinstance(meta, dict):
        raise ckpt.CheckpointError(
            f"{info.path}: not a layerfreeze Megatron checkpoint (no layerfreeze metadata)."
        )
    wrong_engine = engine_problems(meta, engine="megatron", schedule=meta.get("schedule"))
    if wrong_engine:
        raise ckpt.CheckpointError(f"{info.path}: cannot load it: " + "; ".join(wrong_engine) + ".")
    if meta.get("format") != _META_FORMAT:
        raise ckpt.CheckpointError(
            f"{info.path}: not a layerfreeze Megatron checkpoint (metadata format "
            f"{meta.get('format')!r}, expected {_META_FORMAT!r})."
        )
    meta = CheckpointMeta.from_dict(meta, source=str(info.path))
    meta.check_engine_state(_ENGINE_STATE, source=str(info.path))
    num_layers = meta.engine_state["num_layers"]
    if num_layers != runner.applied.layout.num_layers:
        raise ckpt.CheckpointError(
            f"{info.path}: saved for a {num_layers}-layer model, this model has "
            f"{runner.applied.layout.num_layers} layers."
        )
    return info, meta


def load_trainable_weights(
    runner: MegatronRunner, ckpt_dir: str | os.PathLike, tag: str | None = None, strict: bool = True
) -> list[str]:
    """Load the weights of a checkpoint saved under *any* TP/PP layout (e.g. adapters trained
    at TP=2, PP=1 into a TP=1, PP=2 model): every tensor whose global key this rank holds is
    copied (its TP shard). Optimizer state and counters are not touched; the optimizer's
    master copies are refreshed from the new weights. Collective-free except the final sync.

    Args:
        ckpt_dir: checkpoint root (follows ``latest``) or one checkpoint directory.
        tag: checkpoint name under the root; default ``latest``.
        strict: require a tensor for every adapter parameter of this rank.

    Returns:
        Local names of the parameters that were loaded.
    """
    from layerfreeze.apply import adapter_param_names

    info, meta = resolve(runner, ckpt_dir, tag)
    required = adapter_param_names(runner._root) if strict else []
    if _storage(meta) == "dist":
        loaded = load_weights_dist(runner, info.path, required)
    else:
        loaded = read_weights(runner, info.path / "weights", required)
    runner.optimizer.reload_model_params()
    dist.barrier()
    return loaded


def load_checkpoint(
    runner: MegatronRunner, ckpt_dir: str | os.PathLike, tag: str | None = None, verify: bool = True
) -> dict[str, Any]:
    """Resume from a checkpoint saved by :meth:`save_checkpoint` on the same layout (every
    rank must call it): phase, weights, optimizer state, lr schedule and counters.

    Args:
        ckpt_dir: checkpoint root (follows ``latest``) or one checkpoint directory.
        tag: checkpoint name under the root (``step_00000010``); default ``latest``.
        verify: check every file against the sha256 in the manifest first (the recipe
            passes False for a checkpoint it has just verified).

    Returns:
        This rank's ``client_state`` as given to :meth:`save_checkpoint`.

    Raises:
        CheckpointError: nothing loadable, a damaged checkpoint, another schedule, or another
            parallel layout (then use :meth:`load_trainable_weights`).
    """
    info, meta = resolve(runner, ckpt_dir, tag, verify)
    problems = engine_problems(meta, engine="megatron", schedule=runner.schedule.to_dict())
    storage = _storage(meta)
    if storage == "dist":  # reshards to any layout, with the plain optimizer
        if runner._opt_kwargs["use_distributed_optimizer"]:
            problems.append(
                "it was saved in checkpoint.format dist, which needs the plain optimizer, and "
                "this run uses megatron.use_distributed_optimizer: true"
            )
    elif meta.engine_state["layout"] != layout_meta(runner):
        diff = field_diff(meta.engine_state["layout"], layout_meta(runner), "layout")
        problems.append(
            f"saved with another parallel layout ({'; '.join(diff)}) (to move trained "
            "weights to another layout use load_trainable_weights)"
        )
    if problems:
        raise ckpt.CheckpointError(
            f"{info.path}: cannot resume this run from it: " + "; ".join(problems) + "."
        )
    if meta.phase != runner.phase:
        runner._switch_phase(meta.phase, carry=False)
    if storage == "dist":
        load_dist(runner, info.path, _saved_names(runner) if meta.trainable_only else None)
    else:
        _load_safetensors_state(runner, info.path, meta)
    return _finish_resume(runner, info, meta)


def _saved_names(runner: MegatronRunner) -> list[str]:
    """What a trainable-only checkpoint holds: parameters that are, or were in an earlier
    phase, trainable, plus every adapter (frozen base weights come from the base model)."""
    from layerfreeze.apply import adapter_param_names

    trained_before = trained_then_frozen(runner.applied, runner.schedule, runner.phase)
    return sorted(
        set(runner.applied.trainable_names())
        | set(adapter_param_names(runner._root))
        | set(trained_before)
    )


def _storage(meta: CheckpointMeta) -> str:
    """``safetensors`` or ``dist`` (checkpoints written before the dist format have no field)."""
    storage = meta.engine_state.get("storage", "safetensors")
    if storage not in ("safetensors", "dist"):
        raise ckpt.CheckpointError(
            f"manifest.json {META_KEY}.storage: must be safetensors or dist, got {storage!r}. "
            "The checkpoint's metadata is damaged; resume from another checkpoint."
        )
    return storage


def _load_safetensors_state(runner: MegatronRunner, root: Path, meta: CheckpointMeta) -> None:
    """Weights and per-rank optimizer state of a ``safetensors`` checkpoint (same layout)."""
    required = [] if meta.trainable_only else list(dict(runner._root.named_parameters()))
    read_weights(runner, root / "weights", required)
    runner.optimizer.reload_model_params()
    keys = global_keys(runner)
    params = dict(runner._root.named_parameters())
    path = root / "optim" / f"rank_{runner.rank:05d}.safetensors"
    if not path.exists():
        raise ckpt.CheckpointError(f"{path}: missing; the checkpoint is incomplete.")
    with safe_open(str(path), framework="pt") as h:
        saved = {k: h.get_tensor(k) for k in h.keys()}
    with torch.no_grad():
        for n in runner.applied.trainable_names():
            local, _ = runner._local_state(params[n])
            if not local:
                continue
            opt = runner._owner(params[n])
            main = local["master"]
            src = saved.get(f"{keys[n]}::master")
            if src is None:
                raise ckpt.CheckpointError(f"{path}: no optimizer state for {keys[n]}.")
            main.copy_(src.to(main.dtype))
            if f"{keys[n]}::step" in saved:
                st = opt.optimizer.state[main]
                st["step"] = saved[f"{keys[n]}::step"].clone()
                for k in ADAM_KEYS:
                    st[k] = saved[f"{keys[n]}::{k}"].to(device=main.device, dtype=main.dtype)
        for opt in inner_optimizers(runner.optimizer):  # master -> model params
            if hasattr(opt, "_copy_main_params_to_model_params"):
                opt._copy_main_params_to_model_params()


def _own_or_rank0(directory: Path, rank: int) -> int:
    """``rank`` when its per-rank file exists in ``directory``, else 0 (a ``dist`` checkpoint
    loaded on more ranks than saved it: the lr schedule is the same on every rank, and client
    state falls back to rank 0's)."""
    return rank if (directory / f"rank_{rank:05d}.json").exists() else 0


def _finish_resume(runner: MegatronRunner, info: Any, meta: CheckpointMeta) -> dict[str, Any]:
    """lr schedule, counters and client state of either format; returns this rank's client
    state."""
    runner_dir = info.path / "runner"
    runner_state = load_client_state(runner_dir, _own_or_rank0(runner_dir, runner.rank))
    if runner.lr_scheduler is not None and runner_state.get("scheduler"):
        runner.lr_scheduler.load_state_dict(runner_state["scheduler"])
    runner._tracker.param_groups[0]["lr"] = float(runner_state["base_lr"])
    runner._apply_lr()
    runner.global_step = meta.engine_state["global_step"]
    runner.bad_micro_batches = meta.bad_micro_batches
    runner.skipped_steps = meta.skipped_steps
    client_dir = info.path / "client"
    state = load_client_state(client_dir, _own_or_rank0(client_dir, runner.rank))
    dist.barrier()
    log_rank0(
        logger, "resumed from %s (step %d, phase %d)", info.path, runner.global_step, runner.phase
    )
    return state
