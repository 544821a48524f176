"""Weights between Hugging Face and megatron-core layouts for Llama-style models: the pure
tensor mapping per architecture, and loading an HF checkpoint into a built model.

* :func:`hf_to_megatron`: the state dict of one tensor-parallel rank of one pipeline stage, from a
  full HF state dict (pure tensor code). :func:`load_hf_weights` loads an HF directory or state
  dict into a built model, each rank reading only the tensors it holds.
* :func:`megatron_to_hf`: the reverse, from the TP shards of one stage (pure); the distributed
  gather and the files are :mod:`~layerfreeze.engines.megatron.hf_export`'s.

Layouts (megatron-core 0.16.1, ``transformer/attention.py::SelfAttention``):

* ``linear_qkv.weight`` rows are grouped by query group ``g``: the ``heads / groups`` query heads
  of ``g``, then the key head of ``g``, then its value head. Tensor parallelism gives rank ``r``
  the ``r``-th contiguous row block (whole groups when ``groups % tp == 0``).
* ``linear_fc1.weight`` of the gated MLP: each rank's rows are ``[gate_r; up_r]`` (``MLP`` chunks
  its local output in two), so the full matrix is not ``[gate; up]`` once ``tp > 1``.
* Embeddings and output layer are split by vocabulary rows; the vocabulary is padded with zero
  rows to a multiple of ``make_vocab_size_divisible_by * tp`` (Megatron-LM's rule) and the padding
  is stripped on the way back. A padded row gives a logit of 0 (as in Megatron-LM).
* Layers are numbered globally in HF (``model.layers.{i}``) and per stage in megatron
  (``decoder.layers.{j}``, with ``layer_number = i + 1`` global).
* The Transformer Engine spec (``megatron.transformer_impl: transformer_engine``) names the
  same tensors differently: its layer norms are fused into the following linear
  (:data:`TE_FUSED_NORMS`), and its TE modules add ``_extra_state`` entries (FP8 metadata, an
  empty tensor without FP8) that HF has no counterpart for. The mapping above is written for
  local-spec names; :func:`to_transformer_impl` / :func:`to_local_spec` rename (pure functions of
  the names), :func:`load_hf_weights` and the export apply them to a TE-spec model.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from layerfreeze.engines.common import unwrap_module
from layerfreeze.engines.megatron.convert import (
    _BACKEND_ATTR,
    _HF_PATH_ATTR,
    Backend,
    _check_tp,
    _geometry,
    _resolve_backend,
    _where,
    megatron_config_kwargs,
    padded_vocab_size,
)
from layerfreeze.utils.logging import get_logger, log_rank0

__all__ = [
    "TE_FUSED_NORMS",
    "to_local_spec",
    "to_transformer_impl",
    "transformer_impl_of",
    "hf_keys_for",
    "hf_to_megatron",
    "megatron_to_hf",
    "load_hf_state_dict",
    "load_hf_weights",
]

logger = get_logger(__name__)


# ---------------------------------------------------------------------------------------------
# Local spec <-> Transformer Engine spec names

#: Local-spec layer norms (names relative to ``decoder.layers.{j}.``) -> where the Transformer
#: Engine spec keeps them. megatron-core 0.16.1 ``models/gpt/gpt_layer_specs.py``
#: (``get_gpt_layer_with_transformer_engine_spec``, l.271-291 and ``get_mlp_module_spec_for_backend``
#: l.495-497): ``linear_qkv`` and the dense MLP's ``linear_fc1`` are
#: ``TELayerNormColumnParallelLinear``, ``input_layernorm`` is left out (IdentityOp) and
#: ``pre_mlp_layernorm`` is ``IdentityOp`` without experts. That wrapper subclasses TE's
#: ``LayerNormLinear`` (``extensions/transformer_engine.py`` l.711), which registers the norm as
#: ``layer_norm_weight`` and, for LayerNorm only, ``layer_norm_bias`` (TransformerEngine
#: ``transformer_engine/pytorch/module/layernorm_linear.py`` l.1449-1465 at d0067d0); its
#: ``weight`` / ``bias`` keep the local names (l.1491-1492; no ``bias`` entry when ``bias=False``,
#: l.1568-1571). The final norm is ``TENorm`` (a TE ``RMSNorm`` / ``LayerNorm`` with ``weight``,
#: ``bias``), the same names as the local spec's ``decoder.final_layernorm``.
TE_FUSED_NORMS: dict[str, str] = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}
_TE_TO_LOCAL = {te: local for local, te in TE_FUSED_NORMS.items()}
_LAYER_NAME = re.compile(r"^(?P<layer>(?:.*?\.)?layers\.\d+\.)(?P<rel>.+)$")
_EXTRA_STATE = "_extra_state"


def _split_layer_name(name: str) -> tuple[str, str] | None:
    m = _LAYER_NAME.match(name)
    return (m["layer"], m["rel"]) if m else None


def to_transformer_impl(
    state_dict: Mapping[str, Any], transformer_impl: str
) -> dict[str, Any]:
    """Rename a local-spec megatron state dict for ``transformer_impl`` (pure; values kept).

    Args:
        state_dict: local-spec names (any prefix before ``layers.{j}.``) -> values.
        transformer_impl: ``local`` (unchanged copy) or ``transformer_engine`` (the fused norms
            of :data:`TE_FUSED_NORMS`; every other name is the same in both specs).

    Returns:
        A new dict. TE's ``_extra_state`` entries are not made up: a TE model's own ones stay
        (``load_state_dict(strict=False)`` or a parameter-only copy, as :func:`load_hf_weights`
        does).

    Raises:
        ValueError: an unknown ``transformer_impl``.
    """
    if transformer_impl == "local":
        return dict(state_dict)
    if transformer_impl != "transformer_engine":
        raise ValueError(
            f"transformer_impl: must be 'local' or 'transformer_engine', got {transformer_impl!r}."
        )
    out: dict[str, Any] = {}
    for name, value in state_dict.items():
        parts = _split_layer_name(name)
        if parts and parts[1] in TE_FUSED_NORMS:
            name = parts[0] + TE_FUSED_NORMS[parts[1]]
        out[name] = value
    return out


def to_local_spec(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename a megatron state dict of either spec to local-spec names (pure; values kept).

    Transformer Engine names of fused norms become ``input_layernorm`` / ``pre_mlp_layernorm``
    names, TE's ``_extra_state`` entries are dropped (no HF counterpart; without FP8 they hold an
    empty tensor), everything else is unchanged. A local-spec dict comes back equal.
    """
    out: dict[str, Any] = {}
    for name, value in state_dict.items():
        if name == _EXTRA_STATE or name.endswith("." + _EXTRA_STATE):
            continue
        parts = _split_layer_name(name)
        if parts and parts[1] in _TE_TO_LOCAL:
            name = parts[0] + _TE_TO_LOCAL[parts[1]]
        out[name] = value
    return out


def transformer_impl_of(names: Iterable[str]) -> str:
    """``transformer_engine`` when ``names`` (a megatron state dict's) hold a TE fused-norm
    name, else ``local`` (pure; works for models built anywhere, e.g. a Megatron-LM script)."""
    for name in names:
        parts = _split_layer_name(name)
        if parts and parts[1] in _TE_TO_LOCAL:
            return "transformer_engine"
    return "local"


def _qkv_full(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, hd: int):
    """HF q/k/v rows (weight ``[out, in]`` or bias ``[out]``) -> megatron's grouped QKV rows."""
    per = heads // groups
    tail = q.shape[1:]
    q = q.reshape(groups, per * hd, *tail)
    k = k.reshape(groups, hd, *tail)
    v = v.reshape(groups, hd, *tail)
    return torch.cat([q, k, v], dim=1).reshape(groups * (per + 2) * hd, *tail)


def _qkv_split(qkv: torch.Tensor, heads: int, groups: int, hd: int):
    """Inverse of :func:`_qkv_full`: megatron's grouped QKV rows -> HF q, k, v rows."""
    per = heads // groups
    tail = qkv.shape[1:]
    qkv = qkv.reshape(groups, (per + 2) * hd, *tail)
    q, k, v = torch.split(qkv, [per * hd, hd, hd], dim=1)
    return (
        q.reshape(heads * hd, *tail),
        k.reshape(groups * hd, *tail),
        v.reshape(groups * hd, *tail),
    )


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] > rows:
        raise ValueError(f"vocabulary of {t.shape[0]} rows exceeds the padded size {rows}.")
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], dim=0)


def _hf_layer_keys(hf_config: Any, i: int) -> list[str]:
    p = f"model.layers.{i}."
    keys = [
        p + "input_layernorm.weight",
        p + "post_attention_layernorm.weight",
        p + "self_attn.q_proj.weight",
        p + "self_attn.k_proj.weight",
        p + "self_attn.v_proj.weight",
        p + "self_attn.o_proj.weight",
        p + "mlp.gate_proj.weight",
        p + "mlp.up_proj.weight",
        p + "mlp.down_proj.weight",
    ]
    if hf_config.model_type == "qwen2":
        keys += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
    return keys


def hf_keys_for(
    hf_config: Any, layers: Iterable[int], pre_process: bool, post_process: bool
) -> list[str]:
    """The HF state-dict names a stage holding global ``layers`` needs."""
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    keys = []
    if pre_process or (post_process and tied):
        keys.append("model.embed_tokens.weight")
    for i in layers:
        keys += _hf_layer_keys(hf_config, i)
    if post_process:
        keys.append("model.norm.weight")
        if not tied:
            keys.append("lm_head.weight")
    return keys


def _get(sd: Mapping[str, torch.Tensor], key: str, hf_config: Any) -> torch.Tensor:
    try:
        return sd[key]
    except KeyError:
        raise KeyError(
            f"{_where(hf_config)}Hugging Face state dict has no {key!r} (a "
            f"{hf_config.model_type} checkpoint with {hf_config.num_hidden_layers} layers is "
            "expected)."
        ) from None


def hf_to_megatron(
    hf_state_dict: Mapping[str, torch.Tensor],
    hf_config: Any,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    layers: Sequence[int] | None = None,
    pre_process: bool = True,
    post_process: bool = True,
    padded_vocab: int | None = None,
    make_vocab_size_divisible_by: int = 128,
    transformer_impl: str = "local",
) -> dict[str, torch.Tensor]:
    """One TP rank's megatron state dict of one pipeline stage, from HF tensors.

    Args:
        hf_state_dict: HF names -> full tensors (at least those of this stage).
        hf_config: the model's HF config.
        tp_rank: this tensor-parallel rank.
        tp_size: tensor-parallel size.
        layers: the global (0-based) indices of the stage's layers, in local order; default all.
        pre_process: the stage holds the embeddings.
        post_process: the stage holds the final norm and output layer (with tied embeddings
            and no ``pre_process``, its ``output_layer.weight`` is a copy of the embeddings,
            as megatron keeps it on the last stage).
        padded_vocab: the model's (padded) vocabulary; default from
            :func:`padded_vocab_size` with ``make_vocab_size_divisible_by``.
        make_vocab_size_divisible_by: vocabulary padding unit.
        transformer_impl: the layer spec whose names to use: ``local`` or
            ``transformer_engine`` (:func:`to_transformer_impl`; no ``_extra_state``).

    Returns:
        Megatron names (``decoder.layers.{local}...``) -> tensors (views or new tensors; clone
        before mutating).

    Raises:
        ValueError: unsupported architecture, or a TP size that does not divide the heads/MLP.
        KeyError: a needed HF tensor is missing (named).
    """
    megatron_config_kwargs(hf_config)  # refuses unsupported architectures and features
    _check_tp(hf_config, tp_rank, tp_size)
    heads, groups, hd = _geometry(hf_config)
    layers = list(range(hf_config.num_hidden_layers)) if layers is None else list(layers)
    vocab = padded_vocab or padded_vocab_size(
        hf_config.vocab_size, tp_size, make_vocab_size_divisible_by
    )
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))

    def g(key: str) -> torch.Tensor:
        return _get(hf_state_dict, key, hf_config)

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.chunk(tp_size, dim=0)[tp_rank]

    def cols(t: torch.Tensor) -> torch.Tensor:
        return t.chunk(tp_size, dim=1)[tp_rank]

    out: dict[str, torch.Tensor] = {}
    if pre_process:
        out["embedding.word_embeddings.weight"] = rows(
            _pad_rows(g("model.embed_tokens.weight"), vocab)
        )
    for local, i in enumerate(layers):
        if not 0 <= i < hf_config.num_hidden_layers:
            raise ValueError(
                f"layers: global layer {i} is out of range for a {hf_config.num_hidden_layers}-layer "
                f"model (valid 0-{hf_config.num_hidden_layers - 1})."
            )
        p, m = f"model.layers.{i}.", f"decoder.layers.{local}."
        out[m + "input_layernorm.weight"] = g(p + "input_layernorm.weight")
        out[m + "pre_mlp_layernorm.weight"] = g(p + "post_attention_layernorm.weight")
        qkv = [g(p + f"self_attn.{x}_proj.weight") for x in "qkv"]
        out[m + "self_attention.linear_qkv.weight"] = rows(_qkv_full(*qkv, heads, groups, hd))
        if hf_config.model_type == "qwen2":
            qkv_b = [g(p + f"self_attn.{x}_proj.bias") for x in "qkv"]
            out[m + "self_attention.linear_qkv.bias"] = rows(_qkv_full(*qkv_b, heads, groups, hd))
        out[m + "self_attention.linear_proj.weight"] = cols(g(p + "self_attn.o_proj.weight"))
        gate, up = g(p + "mlp.gate_proj.weight"), g(p + "mlp.up_proj.weight")
        out[m + "mlp.linear_fc1.weight"] = torch.cat([rows(gate), rows(up)], dim=0)
        out[m + "mlp.linear_fc2.weight"] = cols(g(p + "mlp.down_proj.weight"))
    if post_process:
        out["decoder.final_layernorm.weight"] = g("model.norm.weight")
        if not tied:
            out["output_layer.weight"] = rows(_pad_rows(g("lm_head.weight"), vocab))
        elif not pre_process:
            out["output_layer.weight"] = rows(_pad_rows(g("model.embed_tokens.weight"), vocab))
    return to_transformer_impl(out, transformer_impl)


def _megatron_layer_names(hf_config: Any) -> list[str]:
    """Parameter names of one megatron (local spec) layer, relative to ``decoder.layers.{j}.``."""
    names = [
        "input_layernorm.weight",
        "pre_mlp_layernorm.weight",
        "self_attention.linear_qkv.weight",
        "self_attention.linear_proj.weight",
        "mlp.linear_fc1.weight",
        "mlp.linear_fc2.weight",
    ]
    if hf_config.model_type == "qwen2":
        names.append("self_attention.linear_qkv.bias")
    return names


def _megatron_layer_to_hf(
    shards: Sequence[Mapping[str, torch.Tensor]], hf_config: Any, local: int, i: int
) -> dict[str, torch.Tensor]:
    heads, groups, hd = _geometry(hf_config)
    m, p = f"decoder.layers.{local}.", f"model.layers.{i}."

    def get(sd, name):
        try:
            return sd[m + name]
        except KeyError:
            raise KeyError(f"megatron state dict has no {m + name!r} (global layer {i}).") from None

    def cat(name: str, dim: int) -> torch.Tensor:
        return torch.cat([get(sd, name) for sd in shards], dim=dim)

    out = {
        p + "input_layernorm.weight": get(shards[0], "input_layernorm.weight"),
        p + "post_attention_layernorm.weight": get(shards[0], "pre_mlp_layernorm.weight"),
        p + "self_attn.o_proj.weight": cat("self_attention.linear_proj.weight", 1),
        p + "mlp.down_proj.weight": cat("mlp.linear_fc2.weight", 1),
    }
    q, k, v = _qkv_split(cat("self_attention.linear_qkv.weight", 0), heads, groups, hd)
    out.update(
        {
            p + "self_attn.q_proj.weight": q,
            p + "self_attn.k_proj.weight": k,
            p + "self_attn.v_proj.weight": v,
        }
    )
    if hf_config.model_type == "qwen2":
        qb, kb, vb = _qkv_split(cat("self_attention.linear_qkv.bias", 0), heads, groups, hd)
        out.update(
            {
                p + "self_attn.q_proj.bias": qb,
                p + "self_attn.k_proj.bias": kb,
                p + "self_attn.v_proj.bias": vb,
            }
        )
    halves = [get(sd, "mlp.linear_fc1.weight").chunk(2, dim=0) for sd in shards]
    out[p + "mlp.gate_proj.weight"] = torch.cat([h[0] for h in halves], dim=0)
    out[p + "mlp.up_proj.weight"] = torch.cat([h[1] for h in halves], dim=0)
    return out


def _vocab_cat(shards: Sequence[Mapping[str, torch.Tensor]], name: str, vocab: int) -> torch.Tensor:
    try:
        full = torch.cat([sd[name] for sd in shards], dim=0)
    except KeyError:
        raise KeyError(f"megatron state dict has no {name!r}.") from None
    return full[:vocab]


def megatron_to_hf(
    tp_shards: Sequence[Mapping[str, torch.Tensor]],
    hf_config: Any,
    *,
    layers: Sequence[int] | None = None,
    pre_process: bool = True,
    post_process: bool = True,
) -> dict[str, torch.Tensor]:
    """HF tensors of one pipeline stage, from the megatron state dicts of all its TP ranks.

    The stages' results are disjoint; their union is the model's HF state dict (with tied
    embeddings, take ``model.embed_tokens.weight`` from the first stage).

    Args:
        tp_shards: the stage's megatron state dicts, in TP-rank order (local or Transformer
            Engine spec names: :func:`to_local_spec` is applied first).
        hf_config: the model's HF config.
        layers: global indices of the stage's local layers, in order; default ``0..n-1`` for the
            ``n`` layers found in the shards.
        pre_process: the stage holds the embeddings.
        post_process: the stage holds the final norm and the output layer.

    Returns:
        HF names -> full tensors (vocabulary padding stripped).
    """
    megatron_config_kwargs(hf_config)
    if not tp_shards:
        raise ValueError("tp_shards: empty; pass the state dict of every TP rank of the stage.")
    tp_shards = [to_local_spec(sd) for sd in tp_shards]
    if layers is None:
        n = len({k.split(".")[2] for k in tp_shards[0] if k.startswith("decoder.layers.")})
        layers = list(range(n))
    vocab = hf_config.vocab_size
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    out: dict[str, torch.Tensor] = {}
    if pre_process:
        out["model.embed_tokens.weight"] = _vocab_cat(
            tp_shards, "embedding.word_embeddings.weight", vocab
        )
    for local, i in enumerate(layers):
        out.update(_megatron_layer_to_hf(tp_shards, hf_config, local, i))
    if post_process:
        out["model.norm.weight"] = tp_shards[0]["decoder.final_layernorm.weight"]
        if not tied:
            out["lm_head.weight"] = _vocab_cat(tp_shards, "output_layer.weight", vocab)
    return out


# ---------------------------------------------------------------------------------------------
# Reading HF checkpoints and loading them into a built model


def _safetensors_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> file holding it, for a directory with safetensors (sharded or not)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {k: path / f for k, f in weight_map.items()}
    single = path / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    raise FileNotFoundError(
        f"{path}: no model.safetensors or model.safetensors.index.json; save the HF model with "
        "save_pretrained(..., safe_serialization=True)."
    )


def load_hf_state_dict(
    path: str | os.PathLike, keys: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Read ``keys`` (default all) from an HF safetensors checkpoint directory, on the CPU.

    Raises:
        FileNotFoundError: no safetensors files in ``path``.
        KeyError: a requested tensor is not in the checkpoint (named).
    """
    path = Path(path)
    where = _safetensors_files(path)
    wanted = list(where) if keys is None else list(keys)
    by_file: dict[Path, list[str]] = {}
    for k in wanted:
        if k not in where:
            raise KeyError(f"{path}: the checkpoint has no tensor {k!r}.")
        by_file.setdefault(where[k], []).append(k)
    out: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for k in names:
                out[k] = f.get_tensor(k)
    return out


def _chunks(model: Any) -> list[torch.nn.Module]:
    return [
        unwrap_module(m, stop_at="decoder")
        for m in (model if isinstance(model, (list, tuple)) else [model])
    ]


def _stage_info(chunk: torch.nn.Module) -> tuple[list[int], bool, bool]:
    """(global layer indices, pre_process, post_process) of one model chunk."""
    layers = [layer.layer_number - 1 for layer in chunk.decoder.layers]
    return layers, bool(chunk.pre_process), bool(chunk.post_process)


def _tp() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 1
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def _backend_of(chunks: Sequence[torch.nn.Module], backend: Backend, hf_path: Any = None) -> str:
    if backend != "auto":
        return _resolve_backend(backend, hf_path or getattr(chunks[0], _HF_PATH_ATTR, None))
    return getattr(chunks[0], _BACKEND_ATTR, "layerfreeze")


def load_hf_weights(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    hf_config: Any = None,
    *,
    backend: Backend = "auto",
) -> None:
    """Copy HF weights into a built megatron model (this rank's chunks), in place.

    Each rank reads only the tensors its layers and TP slice need. Every parameter of the model
    must be covered (adapters installed later are not; load before applying a plan).

    Args:
        model: a ``GPTModel`` (possibly wrapped) or the list of virtual-pipeline chunks.
        source: an HF checkpoint directory (safetensors) or an HF state dict.
        hf_config: the HF config; default read from ``source`` when it is a directory.
        backend: "auto" uses the converter that built the model (see
            :func:`build_gpt_from_hf_config`); "layerfreeze" or "bridge" force one.

    Raises:
        ValueError: the model's parameters and the converted tensors differ (names listed).
    """
    chunks = _chunks(model)
    if hf_config is None:
        if isinstance(source, Mapping):
            raise ValueError("hf_config: required when source is a state dict.")
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(str(source))
    hf_dir = None if isinstance(source, Mapping) else source
    if _backend_of(chunks, backend, hf_dir) == "bridge":  # pragma: no cover - needs Bridge
        if isinstance(source, Mapping):
            raise ValueError("backend='bridge' loads from an HF directory, got a state dict.")
        from megatron.bridge import AutoBridge

        AutoBridge.from_hf_pretrained(str(source)).load_hf_weights(chunks, hf_path=str(source))
        return
    tp_rank, tp_size = _tp()
    for chunk in chunks:
        layers, pre, post = _stage_info(chunk)
        impl = transformer_impl_of(n for n, _ in chunk.named_parameters())
        keys = hf_keys_for(hf_config, layers, pre, post)
        if isinstance(source, Mapping):
            hf_sd = source
        else:
            hf_sd = load_hf_state_dict(source, keys)
        sd = hf_to_megatron(
            hf_sd,
            hf_config,
            tp_rank=tp_rank,
            tp_size=tp_size,
            layers=layers,
            pre_process=pre,
            post_process=post,
            padded_vocab=chunk.vocab_size,
            transformer_impl=impl,
        )
        _copy_into(chunk, sd)
    log_rank0(logger, "loaded Hugging Face weights into %d megatron chunk(s)", len(chunks))


def _copy_into(chunk: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    params = {
        k: v
        for k, v in chunk.state_dict(keep_vars=True).items()
        if not k.endswith("_extra_state") and isinstance(v, torch.Tensor)
    }
    missing = sorted(set(params) - set(sd))
    unexpected = sorted(set(sd) - set(params))
    if missing or unexpected:
        raise ValueError(
            "megatron model and converted HF weights differ: "
            f"not converted {missing[:6]}{'...' if len(missing) > 6 else ''}, "
            f"not in the model {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}. Load HF "
            "weights into a model built by build_gpt_from_hf_config before applying a plan."
        )
    with torch.no_grad():
        for k, p in params.items():
            src = sd[k]
            if tuple(src.shape) != tuple(p.shape):
                raise ValueError(
                    f"{k}: converted HF tensor has shape {tuple(src.shape)}, the model's is "
                    f"{tuple(p.shape)}; was the model built for this HF config and TP size?"
                )
            p.copy_(src)
