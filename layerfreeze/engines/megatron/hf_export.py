"""The merged Hugging Face export of a TP/PP-distributed megatron model: base weights gathered
layer by layer, mergeable LoRA folded in, and the sidecar of adapters that cannot be merged.

* :func:`gather_hf_state_dict` collects a distributed model layer by layer on one rank;
  :func:`save_hf_checkpoint` writes ``config.json`` + safetensors atomically;
  :func:`export_hf_checkpoint` does both (a collective call); :func:`export_runner_to_hf`
  exports a ``MegatronRunner`` (``MegatronRunner.export_merged`` calls it).
* :func:`gather_hf_sidecar`: the adapters that are not merged, in HF naming, written with
  :func:`layerfreeze.export.write_sidecar` (one writer for every engine's merged export, as
  ``layerfreeze.export.export_merged`` writes it), so
  ``load_trainable(AutoModelForCausalLM.from_pretrained(dir), dir)`` restores the adapted model.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from layerfreeze.engines.megatron.convert import _HF_PATH_ATTR, Backend, _check_supported, _geometry
from layerfreeze.engines.megatron.hf_weights import (
    _backend_of,
    _chunks,
    _megatron_layer_names,
    _megatron_layer_to_hf,
    _qkv_split,
    _stage_info,
    _tp,
    _vocab_cat,
    megatron_to_hf,
    to_local_spec,
)
from layerfreeze.export import tensors_for_file, write_safetensors_index, write_sidecar
from layerfreeze.utils.io import atomic_directory
from layerfreeze.utils.logging import get_logger, log_rank0

__all__ = [
    "gather_hf_state_dict",
    "save_hf_checkpoint",
    "export_hf_checkpoint",
    "export_runner_to_hf",
    "gather_hf_sidecar",
]

logger = get_logger(__name__)

#: HF model class written into ``config.json`` when the config does not name one.
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


# ---------------------------------------------------------------------------------------------
# Megatron -> HF: gather and save


def gather_hf_state_dict(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    hf_config: Any,
    *,
    state_dict: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor] | None:
    """Collect the full HF state dict of a TP/PP-distributed model on global rank 0.

    A collective: every rank of the job calls it. Only data-parallel (and context-parallel)
    rank 0 replicas take part; the TP ranks of a stage gather one layer's shards on their TP
    rank 0, which converts them and sends the HF tensors to rank 0, layer by layer, so no rank
    holds more than one layer of another stage at a time (rank 0 accumulates the result, on
    the CPU).

    Args:
        model: this rank's ``GPTModel`` (possibly wrapped) or its virtual-pipeline chunks.
        hf_config: the model's HF config.
        state_dict: this rank's megatron state dicts, one per chunk, to use instead of the
            model's (e.g. with LoRA merged into the base weights); default the model's own.
            Local or Transformer Engine spec names (:func:`~.hf_weights.to_local_spec`).

    Returns:
        The HF state dict (CPU tensors) on global rank 0, None elsewhere.
    """
    import torch.distributed as dist

    chunks = _chunks(model)
    if state_dict is None:
        sds = [c.state_dict() for c in chunks]
    elif isinstance(state_dict, Mapping):
        sds = [state_dict]
    else:
        sds = list(state_dict)
    if len(sds) != len(chunks):
        raise ValueError(f"state_dict: {len(sds)} state dicts for {len(chunks)} model chunks.")
    # a Transformer Engine spec model: its fused-norm names become the local spec's, its
    # _extra_state entries are dropped (pure renaming; a local-spec dict is unchanged)
    sds = [to_local_spec(sd) for sd in sds]
    infos = [_stage_info(c) for c in chunks]

    if not dist.is_initialized() or dist.get_world_size() == 1:
        out: dict[str, torch.Tensor] = {}
        for sd, (layers, pre, post) in zip(sds, infos, strict=True):
            out.update(
                megatron_to_hf([sd], hf_config, layers=layers, pre_process=pre, post_process=post)
            )
        return tensors_for_file(out)

    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_rank() != 0 or ps.get_context_parallel_rank() != 0:
        return None
    tp_group = ps.get_tensor_model_parallel_group()
    tp_rank, tp_size = _tp()
    pp_group = ps.get_pipeline_model_parallel_group()
    pp_ranks = dist.get_process_group_ranks(pp_group)
    my_stage = ps.get_pipeline_model_parallel_rank()
    # TP rank 0 of each stage sends; TP rank 0 of the first stage (global rank 0) receives.
    is_sender = tp_rank == 0
    dst = pp_ranks[0]
    is_dst = is_sender and my_stage == 0
    tp_root = dist.get_global_rank(tp_group, 0)

    # Which stage holds each global layer / the embeddings / the head: every rank of the
    # pipeline group learns it once (the TP ranks of a stage hold the same layers).
    mine = {
        "layers": [i for layers, _, _ in infos for i in layers],
        "pre": any(pre for _, pre, _ in infos),
        "post": any(post for _, _, post in infos),
    }
    stages: list[Any] = [None] * len(pp_ranks)
    dist.all_gather_object(stages, mine, group=pp_group)
    owner = {i: s for s, info in enumerate(stages) for i in info["layers"]}
    missing = sorted(set(range(hf_config.num_hidden_layers)) - set(owner))
    if missing:
        raise ValueError(f"gather_hf_state_dict: no pipeline stage holds layers {missing}.")
    pre_stage = next(s for s, info in enumerate(stages) if info["pre"])
    post_stage = next(s for s, info in enumerate(stages) if info["post"])

    def tp_gather(
        sd: Mapping[str, torch.Tensor], names: Sequence[str]
    ) -> list[dict[str, torch.Tensor]]:
        """Every TP rank's tensors ``names``, gathered on TP rank 0 (empty list elsewhere)."""
        if tp_size == 1:
            return [{n: sd[n] for n in names}]
        shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp_size)]
        for n in names:
            t = sd[n].detach().contiguous()
            bufs = [torch.empty_like(t) for _ in range(tp_size)] if is_sender else None
            dist.gather(t, bufs, dst=tp_root, group=tp_group)
            for r in range(tp_size if is_sender else 0):
                shards[r][n] = bufs[r]
        return shards if is_sender else []

    result: dict[str, torch.Tensor] = {}

    def deliver(stage: int, produce) -> None:
        """Run ``produce()`` on ``stage``; its TP rank 0 sends the result to ``dst``."""
        if my_stage == stage:
            piece = produce()
            if is_dst:
                result.update(tensors_for_file(piece))
            elif is_sender:
                dist.send_object_list([tensors_for_file(piece)], dst=dst)
        elif is_dst:
            box: list[Any] = [None]
            dist.recv_object_list(box, src=pp_ranks[stage])
            result.update(box[0])

    def find(pred) -> tuple[Mapping[str, torch.Tensor], list[int]]:
        for sd, (layers, pre, post) in zip(sds, infos, strict=True):
            if pred(layers, pre, post):
                return sd, layers
        raise AssertionError("this stage holds no such chunk")

    def embed() -> dict[str, torch.Tensor]:
        sd, _ = find(lambda _l, pre, _p: pre)
        shards = tp_gather(sd, ["embedding.word_embeddings.weight"])
        if not is_sender:
            return {}
        return {
            "model.embed_tokens.weight": _vocab_cat(
                shards, "embedding.word_embeddings.weight", hf_config.vocab_size
            )
        }

    deliver(pre_stage, embed)
    for i in range(hf_config.num_hidden_layers):

        def layer(i: int = i) -> dict[str, torch.Tensor]:
            sd, layers = find(lambda ls, _pre, _post: i in ls)
            local = layers.index(i)
            prefix = f"decoder.layers.{local}."
            names = [prefix + n for n in _megatron_layer_names(hf_config)]
            absent = [n for n in names if n not in sd]
            if absent:
                raise KeyError(f"megatron state dict has no {absent} (global layer {i}).")
            shards = tp_gather(sd, names)
            return _megatron_layer_to_hf(shards, hf_config, local, i) if is_sender else {}

        deliver(owner[i], layer)

    def head() -> dict[str, torch.Tensor]:
        sd, _ = find(lambda _l, _pre, post: post)
        piece = {"model.norm.weight": sd["decoder.final_layernorm.weight"]}
        if not getattr(hf_config, "tie_word_embeddings", False):
            shards = tp_gather(sd, ["output_layer.weight"])
            if not is_sender:
                return {}
            piece["lm_head.weight"] = _vocab_cat(
                shards, "output_layer.weight", hf_config.vocab_size
            )
        return piece

    deliver(post_stage, head)
    return result if is_dst else None


def save_hf_checkpoint(
    hf_state_dict: Mapping[str, torch.Tensor],
    hf_config: Any,
    directory: str | os.PathLike,
    *,
    tokenizer: Any = None,
    max_shard_bytes: int = 5 * 1024**3,
    sidecar: tuple[Mapping[str, torch.Tensor], Mapping[str, Any]] | None = None,
) -> Path:
    """Write a standard HF checkpoint (``config.json`` + safetensors) atomically.

    ``AutoModelForCausalLM.from_pretrained(directory)`` loads it. Files larger than
    ``max_shard_bytes`` are split into ``model-0000k-of-0000n.safetensors`` with the usual
    ``model.safetensors.index.json``. With tied embeddings no ``lm_head.weight`` is written.

    Args:
        hf_state_dict: HF names -> full tensors (e.g. from :func:`gather_hf_state_dict`).
        hf_config: the HF config to write (``architectures`` filled in when missing).
        directory: output directory (replaced if it exists; never left half-written).
        tokenizer: optional tokenizer, saved alongside.
        max_shard_bytes: largest safetensors file.
        sidecar: ``(tensors, plan.json content)`` of the adapters that are not merged (see
            :func:`gather_hf_sidecar`), written as ``layerfreeze.export`` writes them.

    Returns:
        The directory.
    """
    _check_supported(hf_config)
    directory = Path(directory)
    sd = tensors_for_file(hf_state_dict)
    if getattr(hf_config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(sd):
        nbytes = sd[k].numel() * sd[k].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = sd[k]
        size += nbytes
    hf_config = copy.deepcopy(hf_config)
    if not getattr(hf_config, "architectures", None):
        hf_config.architectures = [_ARCHITECTURES[hf_config.model_type]]
    with atomic_directory(directory) as tmp:
        hf_config.save_pretrained(str(tmp))
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for n, shard in enumerate(shards, 1):
                name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in sd.values())
            write_safetensors_index(tmp, weight_map, total)
        if tokenizer is not None:
            from layerfreeze.data.tokenizer import save_tokenizer

            save_tokenizer(tokenizer, tmp)  # loads as itself through AutoTokenizer
        if sidecar is not None:
            write_sidecar(tmp, *sidecar)
    log_rank0(logger, "saved Hugging Face checkpoint (%d tensors) to %s", len(sd), directory)
    return directory


def export_hf_checkpoint(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    hf_config: Any,
    directory: str | os.PathLike,
    *,
    tokenizer: Any = None,
    state_dict: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]] | None = None,
    backend: Backend = "auto",
    applied: Any = None,
) -> Path:
    """Gather a distributed megatron model and write it as an HF checkpoint (collective).

    Every rank calls it; rank 0 writes (atomically), then all ranks meet at a barrier.

    Args:
        model: this rank's ``GPTModel`` (possibly wrapped) or its virtual-pipeline chunks.
        hf_config: the model's HF config.
        directory: output directory.
        tokenizer: optional tokenizer saved alongside.
        state_dict: per-chunk megatron state dicts to export instead of the model's.
        backend: as in :func:`load_hf_weights`. A model built by Megatron-Bridge is exported by
            its ``save_hf_pretrained`` against the HF directory it was built from (Bridge writes
            in place, not through a staging directory).
        applied: the model's ``AppliedPlan``: also write the sidecar of the adapters that are
            not merged (:func:`gather_hf_sidecar`), as ``layerfreeze.export.export_merged``
            does, so ``load_trainable(AutoModelForCausalLM.from_pretrained(dir), dir)`` restores
            the adapted model.

    Returns:
        The directory.
    """
    import torch.distributed as dist

    chunks = _chunks(model)
    side = gather_hf_sidecar(chunks, hf_config, applied) if applied is not None else None
    if _backend_of(chunks, backend) == "bridge":  # pragma: no cover - needs Megatron-Bridge
        from megatron.bridge import AutoBridge

        hf_path = getattr(chunks[0], _HF_PATH_ATTR, None)
        if hf_path is None:
            raise ValueError("backend='bridge': the model was not built by Megatron-Bridge.")
        AutoBridge.from_hf_pretrained(hf_path).save_hf_pretrained(chunks, str(directory))
        if side is not None:
            write_sidecar(Path(directory), *side)
        return Path(directory)
    sd = gather_hf_state_dict(chunks, hf_config, state_dict=state_dict)
    if sd is not None:
        save_hf_checkpoint(sd, hf_config, directory, tokenizer=tokenizer, sidecar=side)
    if dist.is_initialized():
        dist.barrier()
    return Path(directory)


def export_runner_to_hf(
    runner: Any,
    directory: str | os.PathLike,
    *,
    tokenizer: Any = None,
    hf_config: Any = None,
) -> Path | None:
    """Write a ``MegatronRunner``'s model as a merged HF checkpoint (collective; every rank calls
    it). ``MegatronRunner.export_merged`` is this function.

    Mergeable LoRA is folded into the base weights for the export (and unfolded after); the
    base weights (adapter tensors left out) go through :func:`export_hf_checkpoint` (TP
    gathered, every stage, written atomically by rank 0). Adapters that cannot be merged (gated
    LoRA, prefixes, their gates) go to the sidecar in Hugging Face naming
    (:func:`gather_hf_sidecar`), as on the DeepSpeed / HF path.

    Args:
        runner: the runner (its ``chunks``, ``applied``; ``hf_config`` as set by the recipe).
        directory: output directory (written atomically on rank 0).
        tokenizer: optional tokenizer saved alongside.
        hf_config: the HF config; default ``runner.hf_config``.

    Returns:
        The directory on global rank 0, None on the other ranks.

    Raises:
        ValueError: no HF config (neither given nor the runner's).
    """
    import torch.distributed as dist

    from layerfreeze.apply import adapter_param_names
    from layerfreeze.registry import POLICIES

    hf_config = hf_config if hf_config is not None else getattr(runner, "hf_config", None)
    if hf_config is None:
        raise ValueError(
            "export_merged: the Megatron runner needs the model's Hugging Face config to "
            "name the exported weights; pass hf_config= (e.g. AutoConfig.from_pretrained(path)) "
            "to MegatronRunner."
        )
    prefixes = tuple(p.param_prefix for p in POLICIES.values() if p.param_prefix)

    def is_adapter(name: str) -> bool:
        return any(part.startswith(prefixes) for part in name.split("."))

    applied = runner.applied
    merged = applied.merge()
    try:
        kept = sorted(
            set(adapter_param_names(runner.model)) - set(applied.merged_adapter_param_names())
        )
        if kept:
            keys = runner._global_keys()
            log_rank0(
                logger,
                "export_merged: %d adapter tensors cannot be merged into Hugging Face weights "
                "(gated LoRA / prefix), e.g. %s; they go to the export's sidecar.",
                len(kept),
                [keys[n] for n in kept[:3]],
                level=logging.INFO,
            )
        base = [
            {k: v for k, v in c.state_dict().items() if not is_adapter(k)} for c in runner.chunks
        ]
        out = export_hf_checkpoint(
            runner.chunks,
            hf_config,
            directory,
            tokenizer=tokenizer,
            state_dict=base,
            applied=applied,
        )
    finally:
        if merged:
            applied.unmerge()
    return Path(out) if not dist.is_initialized() or dist.get_rank() == 0 else None


# ---------------------------------------------------------------------------------------------
# Megatron -> HF: the sidecar of adapters that cannot be merged


#: LoRA base linears of a megatron (local spec) layer -> (parallel style, the HF linears it
#: stands for). A fused linear's one ``A`` becomes a copy per HF linear; its ``B`` rows split.
_LORA_LINEARS: dict[str, tuple[str, tuple[str, ...]]] = {
    "self_attention.linear_qkv": (
        "column",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ),
    "self_attention.linear_proj": ("row", ("self_attn.o_proj",)),
    "mlp.linear_fc1": ("column", ("mlp.gate_proj", "mlp.up_proj")),
    "mlp.linear_fc2": ("row", ("mlp.down_proj",)),
}
#: Sub-blocks that own a LoRA gate (``<sub>.lora_gate``): megatron name -> HF name.
_GATE_OWNERS = {"self_attention": "self_attn", "mlp": "mlp"}
_MEGATRON_PREFIX = "self_attention.prefix_adapter."
_HF_PREFIX = "self_attn.prefix_adapter."

#: ``(tensor-parallel split dim, stride)`` of a split parameter, None for a replicated one.
_Split = tuple[int, int] | None


def _adapter_layer_to_hf(
    shards: Sequence[Mapping[str, torch.Tensor]],
    splits: Mapping[str, _Split],
    hf_config: Any,
    local: int,
    i: int,
) -> dict[str, tuple[str, torch.Tensor]]:
    """HF adapter tensors of one layer from the adapter tensors of all its TP ranks.

    Args:
        shards: per TP rank (in order), adapter names relative to ``decoder.layers.{local}.``
            -> tensors.
        splits: the same names -> how megatron splits them across TP (``_Split``).
        hf_config: the model's HF config.
        local: the layer's index in its pipeline stage (for messages).
        i: the layer's global index.

    Returns:
        HF name -> (the megatron name it came from, full tensor).

    Raises:
        ValueError: a parameter with no HF counterpart (named, with its layer).
    """
    heads, groups, hd = _geometry(hf_config)
    m, p = f"decoder.layers.{local}.", f"model.layers.{i}."
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for rel in shards[0]:
        parts = [sd[rel] for sd in shards]
        where = f"layer {i} ({m}{rel})"
        split = splits.get(rel)
        if split is None and any(t.shape != parts[0].shape for t in parts):
            raise ValueError(f"{where}: replicated adapter parameter differs in shape across TP.")
        base, sep, leaf = rel.rpartition(".lora_adapter.")
        if sep:
            if base not in _LORA_LINEARS or leaf not in ("lora_a", "lora_b"):
                raise ValueError(
                    f"{where}: LoRA on megatron {base!r} has no Hugging Face counterpart (mapped: "
                    f"{', '.join(_LORA_LINEARS)}), so the export cannot represent it. Target the "
                    "attention or MLP linears (lora target=mlp/attn/all/down)."
                )
            style, targets = _LORA_LINEARS[base]
            if (style, leaf) == ("row", "lora_a"):  # split by input columns
                pieces: tuple[torch.Tensor, ...] = (torch.cat(parts, dim=1),) * len(targets)
            elif (style, leaf) == ("column", "lora_b") and base == "mlp.linear_fc1":
                halves = [t.chunk(2, dim=0) for t in parts]  # each rank: [gate_r; up_r]
                pieces = tuple(torch.cat([h[k] for h in halves], dim=0) for k in (0, 1))
            elif (style, leaf) == ("column", "lora_b"):  # QKV rows grouped by query group
                pieces = _qkv_split(torch.cat(parts, dim=0), heads, groups, hd)
            else:  # replicated: column A, row B
                pieces = (parts[0],) * len(targets)
            for target, piece in zip(targets, pieces, strict=True):
                out[f"{p}{target}.lora_adapter.{leaf}"] = (rel, piece.clone())
            continue
        sub, sep, leaf = rel.partition(".lora_gate.")
        if sep and sub in _GATE_OWNERS:
            out[f"{p}{_GATE_OWNERS[sub]}.lora_gate.{leaf}"] = (rel, parts[0].clone())
        elif rel.startswith(_MEGATRON_PREFIX):
            if split is None:
                full = parts[0]
            elif split[1] != 1:
                raise ValueError(f"{where}: prefix parameter split with stride {split[1]}.")
            else:  # keys/values by query group, factors by head: contiguous per rank
                full = torch.cat(parts, dim=split[0])
            out[p + _HF_PREFIX + rel[len(_MEGATRON_PREFIX) :]] = (rel, full.clone())
        else:
            raise ValueError(
                f"{where}: adapter parameter with no Hugging Face counterpart; the export "
                "cannot represent it (mapped: LoRA on linear_qkv/linear_proj/linear_fc1/"
                "linear_fc2, lora_gate of self_attention/mlp, self_attention.prefix_adapter)."
            )
    return out


def _local_adapters(chunks: Sequence[torch.nn.Module]) -> tuple[list[tuple], list[str]]:
    """This rank's adapter tensors: ``(global layer, local index, name in the layer, tensor,
    split, merged)`` entries, and problems (adapters outside the decoder layers)."""
    from layerfreeze.apply import adapter_param_names
    from layerfreeze.policies.new_rows import merged_param_names

    entries, problems = [], []
    for chunk in chunks:
        merged = set()  # the rule of AppliedPlan.merged_adapter_param_names
        for name, mod in chunk.named_modules():
            if getattr(mod, "merged", False) is True and callable(getattr(mod, "unmerge", None)):
                merged.update(f"{name}.{n}" for n, _ in mod.named_parameters())
        params = dict(chunk.named_parameters())
        numbers = [layer.layer_number - 1 for layer in chunk.decoder.layers]
        rows_in_place = set(merged_param_names(chunk))  # merged new_rows: in the full weight
        for name in adapter_param_names(chunk):
            if name in rows_in_place:
                continue
            parts = name.split(".", 3)
            if len(parts) < 4 or parts[:2] != ["decoder", "layers"]:
                problems.append(
                    f"{name}: adapter parameter outside the decoder layers has no Hugging Face "
                    "counterpart; the export cannot represent it."
                )
                continue
            t = params[name]
            split = None
            if getattr(t, "tensor_model_parallel", False):
                split = (int(t.partition_dim), int(getattr(t, "partition_stride", 1)))
            j = int(parts[2])
            entries.append(
                (numbers[j], j, parts[3], t.detach().cpu().clone(), split, name in merged)
            )
    return entries, problems


def _assemble_adapters(
    payloads: Sequence[tuple[int, list[tuple], list[str]]], hf_config: Any
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """HF adapter tensors (every adapter, merged or not) and the HF names of merged ones, from
    every (TP rank, entries, problems) payload of the model-parallel ranks."""
    problems = [msg for _, _, probs in payloads for msg in probs]
    if problems:
        raise ValueError("; ".join(problems))
    tp_size = max(tp for tp, _, _ in payloads) + 1
    by_layer: dict[int, list[dict[str, torch.Tensor]]] = {}
    splits: dict[int, dict[str, _Split]] = {}
    local_of: dict[int, int] = {}
    merged_rel: set[tuple[int, str]] = set()
    for tp, entries, _ in payloads:
        for i, j, rel, t, split, merged in entries:
            by_layer.setdefault(i, [{} for _ in range(tp_size)])[tp][rel] = t
            splits.setdefault(i, {})[rel] = split
            local_of[i] = j
            if merged:
                merged_rel.add((i, rel))
    tensors: dict[str, torch.Tensor] = {}
    merged_hf: set[str] = set()
    for i in sorted(by_layer):
        shards = by_layer[i]
        names = [sorted(sd) for sd in shards]
        if any(n != names[0] for n in names):
            raise ValueError(
                f"layer {i}: the tensor-parallel ranks hold different adapter parameters "
                f"({names}); export from a model whose ranks applied the same plan."
            )
        for hf_name, (rel, t) in _adapter_layer_to_hf(
            shards, splits[i], hf_config, local_of[i], i
        ).items():
            tensors[hf_name] = t
            if (i, rel) in merged_rel:
                merged_hf.add(hf_name)
    return tensors, merged_hf


def _sidecar_for_hf(
    tensors: Mapping[str, torch.Tensor], merged: set[str], hf_config: Any, applied: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The sidecar ``layerfreeze.export.export_merged`` writes for the same plan on the HF model:
    its tensors (adapters not merged) and its ``plan.json`` content.

    The plan is applied to the HF model built on the meta device (no memory), so the adapter
    names, shapes and the sidecar plan come from the HF policies themselves; the megatron
    tensors must match them exactly.
    """
    from transformers import AutoModelForCausalLM

    from layerfreeze.apply import adapter_param_names, apply_plan
    from layerfreeze.export import fully_merged_policies, sidecar_plan_json
    from layerfreeze.policies.new_rows import PARAM as NEW_ROWS_PARAM

    install = [p for p, _ in applied.installed if p != applied.plan]
    config = copy.deepcopy(hf_config)  # the prefix policy repoints the attention implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    try:
        hf_applied = apply_plan(model, applied.plan, install=install)
    except ValueError as e:
        raise ValueError(
            f"plan {applied.plan}: does not apply to the Hugging Face {config.model_type} model, "
            f"so the trained adapters have no Hugging Face form for the export's sidecar: {e}"
        ) from None
    params = dict(model.named_parameters())
    # new_rows are merged into the full weights on both engines (no sidecar tensor)
    expected = {n for n in adapter_param_names(model) if not n.endswith(f".{NEW_ROWS_PARAM}")}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    wrong = [
        f"{n} {tuple(t.shape)} vs {tuple(params[n].shape)}"
        for n, t in tensors.items()
        if n in params and tuple(t.shape) != tuple(params[n].shape)
    ]
    if missing or extra or wrong:
        raise ValueError(
            "the megatron adapters do not match those the plan creates on the Hugging Face "
            f"model: not exported {missing[:6]}, no Hugging Face parameter {extra[:6]}, "
            f"shapes (megatron vs HF) {wrong[:6]}; the export cannot represent them."
        )
    # (layer, policy) pairs whose every adapter parameter is merged: as in export_merged.
    merged_layers = fully_merged_policies(
        hf_applied, hf_applied.layout.layers, sorted(expected), merged
    )
    meta = sidecar_plan_json(hf_applied, merged_layers)
    sidecar = {n: t for n, t in tensors.items() if n not in merged}
    return sidecar, meta


def gather_hf_sidecar(
    model: torch.nn.Module | Sequence[torch.nn.Module], hf_config: Any, applied: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The export sidecar of a TP/PP-distributed model in HF naming, on global rank 0.

    A collective: every rank of the job calls it. The adapters that are not merged into the
    base weights (gated LoRA, prefixes, their gates) are gathered on rank 0 (TP shards joined,
    layers by global index) and renamed to the parameters the same plan creates on the HF
    model: the fused ``linear_qkv`` / ``linear_fc1`` LoRA becomes one LoRA per HF projection
    (``A`` copied, ``B`` split into the projections' rows), the sub-blocks' gates and the
    prefix adapters keep their names under ``self_attn`` / ``mlp``. Loading the exported
    checkpoint with ``from_pretrained`` and then ``layerfreeze.export.load_trainable(model,
    dir)`` restores the adapted model.

    Args:
        model: this rank's ``GPTModel`` (possibly wrapped) or its virtual-pipeline chunks.
        hf_config: the model's HF config.
        applied: the ``AppliedPlan`` of the megatron model (its plan and installed plans).

    Returns:
        ``(sidecar tensors, plan.json content)`` on global rank 0, None elsewhere.

    Raises:
        ValueError: on every rank, when an adapter has no HF counterpart (the layer and the
            parameter are named): nothing is dropped silently.
    """
    import torch.distributed as dist

    chunks = _chunks(model)
    entries, problems = _local_adapters(chunks)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if not distributed:
        payloads: list[Any] = [(0, entries, problems)]
    else:
        from megatron.core import parallel_state as ps

        replica0 = ps.get_data_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
        mine = (_tp()[0], entries, problems) if replica0 else None
        payloads = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, payloads, dst=0)
    result, error, failure = None, None, None
    if not distributed or dist.get_rank() == 0:
        try:
            tensors, merged = _assemble_adapters([p for p in payloads if p is not None], hf_config)
            result = _sidecar_for_hf(tensors, merged, hf_config, applied)
        except Exception as e:  # reported on every rank below, then raised
            error, failure = f"export sidecar: {e}", e
    if distributed:  # every rank fails together, none waits at a later collective
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if failure is not None and not isinstance(failure, ValueError):
        raise failure
    if error is not None:
        raise ValueError(error) from None
    return result
